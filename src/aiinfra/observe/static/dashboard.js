// aiinfra dashboard: polls /api/data and draws every series with uPlot (vendored beside this file).
"use strict";

const WIDTH = 420, HEIGHT = 200;
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
window.aiinfraCharts = {};   // id -> uPlot instance (the browser test reads their data)
window.aiinfraHeatmaps = {}; // id -> {ranks, steps}

function el(tag, attrs, parent) {
  const node = document.createElement(tag);
  Object.assign(node, attrs || {});
  if (parent) parent.appendChild(node);
  return node;
}

function section(id, title, note) {
  let node = document.getElementById(id);
  if (!node) {
    node = el("section", {id: id}, document.getElementById("sections"));
    el("h2", {textContent: title}, node);
    el("p", {className: "note"}, node);
    el("div", {className: "grid"}, node);
  }
  node.querySelector(".note").textContent = note || "";
  return node.querySelector(".grid");
}

// One line chart: `series` is [{label, values, dash, points}], x the shared x values.
function chart(grid, id, title, x, series, opts) {
  opts = opts || {};
  const data = [x, ...series.map(s => s.values)];
  const existing = window.aiinfraCharts[id];
  if (existing && existing.series.length === data.length) {
    existing.setData(data);
    return existing;
  }
  if (existing) { existing.destroy(); document.getElementById(id).remove(); }
  const panel = el("div", {className: "panel", id: id}, grid);
  el("h3", {textContent: title}, panel);
  const config = {
    width: WIDTH, height: HEIGHT,
    scales: {x: {time: !!opts.time}, y: opts.ratio ? {range: [0, 1]} : {}},
    axes: [{}, {size: 75, values: opts.format ? (u, ticks) => ticks.map(opts.format) : undefined}],
    series: [{label: opts.time ? "time" : "step"}, ...series.map((s, i) => ({
      label: s.label, stroke: s.color || COLORS[i % COLORS.length], width: s.points ? 0 : 1.5,
      dash: s.dash, spanGaps: true,
      points: s.points ? {show: true, size: 8, fill: s.color || COLORS[i % COLORS.length]} : {show: false},
    }))],
  };
  const plot = new uPlot(config, data, panel);
  window.aiinfraCharts[id] = plot;
  return plot;
}

function constant(x, value) { return x.map(() => (value === null || value === undefined) ? null : value); }

// Per-rank compute time per step, coloured by its ratio to that step's fastest rank (a straggler is a red row).
function heatmap(grid, id, title, matrix, steps) {
  let panel = document.getElementById(id);
  if (!panel) {
    panel = el("div", {className: "panel heatmap", id: id}, grid);
    el("h3", {textContent: title}, panel);
    el("canvas", {width: WIDTH, height: HEIGHT}, panel);
    el("div", {className: "note"}, panel);
  }
  const canvas = panel.querySelector("canvas"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const ranks = matrix.length ? matrix[matrix.length - 1].length : 0;
  const shown = matrix.slice(-200), shownSteps = steps.slice(-200);
  if (ranks && shown.length) {
    const left = 40, cellW = (canvas.width - left) / shown.length, cellH = (canvas.height - 16) / ranks;
    shown.forEach((row, i) => {
      const fastest = Math.min(...row.filter(v => v > 0)) || 1;
      row.forEach((value, rank) => {
        const ratio = Math.min(Math.max(value / fastest, 1), 3);  // 1: fastest .. 3 or more: red
        const t = (ratio - 1) / 2;
        ctx.fillStyle = `rgb(${Math.round(255 * t + 200 * (1 - t))},${Math.round(230 * (1 - t))},${Math.round(120 * (1 - t))})`;
        ctx.fillRect(left + i * cellW, rank * cellH, Math.ceil(cellW), Math.ceil(cellH) - 1);
      });
    });
    ctx.fillStyle = "#333"; ctx.font = "11px sans-serif";
    for (let rank = 0; rank < ranks; rank++) ctx.fillText(`rank ${rank}`, 0, rank * cellH + cellH / 2 + 4);
    ctx.fillText(`steps ${shownSteps[0]}..${shownSteps[shownSteps.length - 1]}`, left, canvas.height - 3);
  }
  panel.querySelector(".note").textContent = "compute time / the step's fastest rank: yellow 1x .. red 3x";
  window.aiinfraHeatmaps[id] = {ranks: ranks, steps: shown.length};
}

const pct = v => (100 * v).toFixed(1) + "%";
const ms = v => (1000 * v).toFixed(v < 0.01 ? 2 : 0) + " ms";
const mib = v => (v / 2 ** 20).toFixed(0) + " MiB";

function drawRun(run, index) {
  const id = `run${index}`;
  const last = run.straggler_rank.length ? run.straggler_rank[run.straggler_rank.length - 1] : null;
  const grid = section(id, `training: ${run.name}`,
    `${run.path}; ${run.step.length} steps; ${run.ranks} rank(s); straggler: ${last === null ? "none" : "rank " + last}` +
    `; prediction: ${run.prediction_source}`);
  const x = run.step;
  chart(grid, `${id}-loss`, "loss (nats/token)", x, [
    {label: "train", values: run.loss}, {label: "validation", values: run.val_loss, points: true}]);
  chart(grid, `${id}-tps`, "tokens/s", x, [{label: "tokens/s", values: run.tokens_per_s}]);
  chart(grid, `${id}-mfu`, "MFU", x, [{label: "MFU", values: run.mfu}], {format: pct});
  const ckpt = new Set(run.events.checkpoint), restart = new Set(run.events.restart);
  chart(grid, `${id}-step`, "step time: measured p50/p99, planner's prediction, checkpoints, restarts", x, [
    {label: "p50", values: run.step_time_p50_s}, {label: "p99", values: run.step_time_p99_s},
    {label: "predicted", values: constant(x, run.predicted_step_time_s), dash: [6, 4], color: "#555"},
    {label: "checkpoint", values: x.map((s, i) => ckpt.has(s) ? run.step_time_p50_s[i] : null), points: true, color: "#2ca02c"},
    {label: "restart", values: x.map((s, i) => restart.has(s) ? run.step_time_p50_s[i] : null), points: true, color: "#000"},
  ], {format: ms});
  heatmap(grid, `${id}-heat`, "per-rank compute time (stragglers)", run.rank_compute_s, x);
  const memory = [];
  for (let rank = 0; rank < run.ranks; rank++) {
    memory.push({label: `rank ${rank}`, values: run.rank_memory_bytes.map(row => row[rank] === undefined ? null : row[rank])});
  }
  chart(grid, `${id}-mem`, "peak memory per rank", x, memory, {format: mib});
}

function drawScrape(scrape, index) {
  const id = `scrape${index}`;
  const what = scrape.kind === "route" ? "gateway" : "server";
  const grid = section(id, `${what}: ${scrape.url}`, scrape.error ? `last scrape failed: ${scrape.error}` : "");
  const x = scrape.t || [];
  if (!x.length) return;
  chart(grid, `${id}-rate`, "requests/s", x, [{label: "requests/s", values: scrape.request_rate}], {time: true});
  chart(grid, `${id}-ttft`, "time to first token p50/p99 and SLO", x, [
    {label: "p50", values: scrape.ttft_p50_s}, {label: "p99", values: scrape.ttft_p99_s},
    {label: "SLO", values: constant(x, scrape.ttft_slo_s), dash: [6, 4], color: "#555"}], {time: true, format: ms});
  if (scrape.kind === "serve") {
    chart(grid, `${id}-itl`, "inter-token latency p50/p99 and SLO", x, [
      {label: "p50", values: scrape.itl_p50_s}, {label: "p99", values: scrape.itl_p99_s},
      {label: "SLO", values: constant(x, scrape.itl_slo_s), dash: [6, 4], color: "#555"}], {time: true, format: ms});
    chart(grid, `${id}-queue`, "running and waiting requests", x, [
      {label: "running", values: scrape.running}, {label: "waiting", values: scrape.waiting}], {time: true});
    chart(grid, `${id}-kv`, "KV-cache use", x, [{label: "KV use", values: scrape.kv_cache_usage_ratio}],
      {time: true, format: pct, ratio: true});
  } else {
    chart(grid, `${id}-queue`, "outstanding requests, healthy backends", x, [
      {label: "outstanding", values: scrape.running}, {label: "backends up", values: scrape.backends_up},
      {label: "backends", values: scrape.backends_total, dash: [6, 4]}], {time: true});
    let health = document.getElementById(`${id}-health`);
    if (!health) {
      health = el("div", {className: "panel backends", id: `${id}-health`}, grid);
    }
    health.replaceChildren(el("h3", {textContent: "backend health"}));
    for (const [name, up] of Object.entries(scrape.backend_health)) {
      el("span", {className: up ? "up" : "down", textContent: `${name}: ${up ? "up" : "down"}`}, health);
    }
  }
  chart(grid, `${id}-cache`, scrape.kind === "serve" ? "prefix-cache hit ratio (tokens)" : "semantic-cache hit ratio",
    x, [{label: "hit ratio", values: scrape.cache_hit_ratio}], {time: true, format: pct, ratio: true});
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/api/data");
    const data = await response.json();
    data.runs.forEach(drawRun);
    data.scrapes.forEach(drawScrape);
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    setTimeout(refresh, 1000 * data.interval_s);
  } catch (error) {
    status.textContent = `dashboard unreachable (${error.message}); retrying`;
    setTimeout(refresh, 5000);
  }
}

refresh();

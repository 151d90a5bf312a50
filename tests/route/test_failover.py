"""Failover with real processes: three `aiinfra serve` backends behind `aiinfra route`, a steady load of streaming
greedy requests through the real `openai` client, and one backend SIGKILLed mid-run (its engine process too).

Zero client requests may fail, including the streams that were mid-answer on the killed backend, and every answer
must equal what a healthy backend gives for the same prompt. The dead backend is marked down by the next health
check and back in service by the second check after it restarts.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from openai import OpenAI

from .conftest import MODEL, Process, backend_process, free_ports, gateway_process, write_fleet

HEALTH_INTERVAL_S = 0.5
MID_STREAM = 'aiinfra_route_failovers_total{phase="mid_stream"}'
MAX_TOKENS = 400  # long enough that the victim is still generating when it is killed (a fast engine finishes 160 first)
PROMPTS = [f"def function_{i}(value):\n    return value * {i}" for i in range(8)]
# Polling, scheduling and a loaded 2-core CI machine add to the health interval; this bounds how much.
SLACK_S = 1.5


def reference_answers(backend: Process) -> tuple[dict[str, str], dict[str, str]]:
    """What a healthy backend answers to each prompt, asked directly: completions and chat, all at once (the
    engine batches them, as it batches the load through the gateway)."""
    client = OpenAI(base_url=f"{backend.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def completion(prompt: str) -> str:
        return client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True},
        ).choices[0].text

    def chat(prompt: str) -> str:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True},
        ).choices[0].message.content

    with ThreadPoolExecutor(max_workers=2 * len(PROMPTS)) as pool:
        completions, chats = pool.map(completion, PROMPTS), pool.map(chat, PROMPTS)  # both submitted at once
        return dict(zip(PROMPTS, completions)), dict(zip(PROMPTS, chats))


def stream_one(client: OpenAI, prompt: str, chat: bool) -> tuple[str, str | None]:
    """One streamed answer through the gateway: its text and finish reason."""
    if chat:
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].choices[0].finish_reason
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].choices[0].finish_reason


def backend_status(gateway: Process, name: str) -> dict:
    return httpx.get(gateway.url + "/health", timeout=5).json()["backends"][name]


def metric(gateway: Process, name: str) -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def wait_for(condition, timeout_s: float, step_s: float = 0.02) -> float:
    """Seconds until `condition()` held (bounded wait)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "condition not met in time"
        time.sleep(step_s)
    return time.monotonic() - start


def test_failover_sigkill_mid_stream_loses_no_request_and_answers_stay_exact(
        model_folder: Path, tmp_path: Path, processes: list[Process]) -> None:
    ports = free_ports(4)
    backends = [backend_process(model_folder, ports[i], tmp_path / f"b{i}.log") for i in range(3)]
    processes += [backend.start() for backend in backends]
    for backend in backends:
        backend.wait_healthy()
    fleet = write_fleet(tmp_path / "fleet.toml", backends,
                        f'policy = "least_outstanding"\nhealth_interval_s = {HEALTH_INTERVAL_S}\nmax_retries = 3')
    gateway = gateway_process(fleet, ports[3], tmp_path / "gateway.log").start()
    processes.append(gateway)
    gateway.wait_healthy()
    completions, chats = reference_answers(backends[0])

    client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
    jobs = [(PROMPTS[i % len(PROMPTS)], i % 2 == 1) for i in range(48)]
    results: list[tuple[str, bool, str, str | None] | BaseException] = []
    lock = threading.Lock()

    def run(job: tuple[str, bool]) -> None:
        prompt, chat = job
        try:
            text, finish = stream_one(client, prompt, chat)
            outcome: tuple[str, bool, str, str | None] | BaseException = (prompt, chat, text, finish)
        except BaseException as error:  # noqa: BLE001 - every failure is counted, none may happen
            outcome = error
        with lock:
            results.append(outcome)

    victim = backends[1]
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        # Kill the victim while its engine is generating for streams in flight, a few requests into the run.
        wait_for(lambda: len(results) >= 6 and backend_status(gateway, "b1")["outstanding"] >= 2
                 and httpx.get(victim.url + "/health", timeout=5).json()["running"] >= 2, 120, step_s=0.005)
        victim.kill()
        down_after_s = wait_for(lambda: not backend_status(gateway, "b1")["up"], 30)
        for future in futures:
            future.result()
    failed = [result for result in results if isinstance(result, BaseException)]
    assert not failed, f"{len(failed)} client requests failed: {failed[:3]}"
    assert len(results) == len(jobs)
    for prompt, chat, text, finish in results:  # type: ignore[misc]
        assert finish == "length"
        assert text == (chats if chat else completions)[prompt], f"answer differs for {prompt!r} (chat={chat})"
    assert metric(gateway, MID_STREAM) >= 1, "no stream was cut"
    assert down_after_s <= HEALTH_INTERVAL_S + SLACK_S, f"marked down {down_after_s:.2f} s after the kill"

    victim.start()
    victim.wait_healthy()
    up_after_s = wait_for(lambda: backend_status(gateway, "b1")["up"], 30)
    assert up_after_s <= 2 * HEALTH_INTERVAL_S + SLACK_S, f"back in service {up_after_s:.2f} s after its restart"
    print(f"\nkill -> marked down: {down_after_s:.3f} s; restart -> in service: {up_after_s:.3f} s; "
          f"mid-stream failovers: {metric(gateway, MID_STREAM):.0f}")

"""What a training row of the shared schema means where it leaves a column empty: the data-parallel degree the
other degrees leave, the framework's documented sharding, and the shape of the one published configuration that
agrees with what the row does state."""

import pytest

from aiinfra.plan.errors import PlanError
from aiinfra.plan.frameworks import FRAMEWORKS, framework_facts
from aiinfra.plan.known_models import named_model
from aiinfra.plan.runs import RowNotRepresentable, setup_from_row, spec_from_row
from aiinfra.plan.validation import fitted_setup, load_training_runs, validate_training


def _row(run_id: str) -> dict[str, str]:
    return next(row for row in load_training_runs() if row["id"] == run_id)


def test_an_empty_dp_is_the_devices_the_model_parallel_degrees_leave() -> None:
    row = _row("bridge2606-qwen3-235b-gb200x256-mxfp8")  # 256 GB200, TP1 PP8: dp 32
    stated = setup_from_row(row).layout
    derived = setup_from_row({**row, "dp": ""}).layout
    assert derived.dp == stated.dp == 256 // (stated.tp * stated.pp * stated.cp)
    with pytest.raises(RowNotRepresentable, match="tp x pp x cp = 24 does not divide n_devices = 256"):
        setup_from_row({**row, "dp": "", "tp": "3"})


@pytest.mark.parametrize(("framework", "stage"), [
    ("megatron", 1), ("megatron-2021", 0), ("deepspeed", 0), ("torchtitan", 3), ("pytorch-fsdp", 3),
    ("llm-foundry", 3), ("jax", 3),
])
def test_an_empty_sharding_is_the_frameworks_default(framework: str, stage: int) -> None:
    row = {**_row("bridge2511-llama3-8b-h100x8-fsdp"), "framework": framework, "sharding": ""}
    assert FRAMEWORKS[framework].default_sharding in ("none", "zero1", "fsdp")
    assert setup_from_row(row).layout.zero_stage == stage


def test_a_run_whose_default_sharding_cannot_fit_sharded_everything() -> None:
    # Llama 3 70B on 64 GB200 under Megatron-FSDP: with the recipes' default ZeRO-1 it needs ~420 GiB a device.
    row = {**_row("bridge2511-llama3-70b-gb200x64-fsdp"), "sharding": ""}
    assert setup_from_row(row).layout.zero_stage == 1
    _, layout = fitted_setup(setup_from_row(row))
    assert layout.zero_stage == 3 and layout.dp_shard == layout.dp
    # Stated, the sharding is kept: a stated ZeRO-1 that cannot fit is reported as not fitting.
    with pytest.raises(RowNotRepresentable, match="does not fit"):
        fitted_setup(setup_from_row({**row, "sharding": "zero1"}))


def test_an_empty_shape_cell_comes_from_the_one_published_configuration_that_agrees() -> None:
    row = _row("bridge2511-llama3-8b-h100x8-fsdp")  # llama, 8B, 32 layers of 4096, vocab 128256
    assert spec_from_row({**row, "vocab": ""}).vocab_size == 128256
    # 32 layers of 4096 at 6.74B is Llama 2 7B: its 32000-token vocabulary and 11008-wide MLP.
    llama2 = {**row, "params_b": "6.74", "vocab": "", "ffn": "", "kv_heads": ""}
    spec = spec_from_row(llama2)
    assert (spec.vocab_size, spec.ffn_dim, spec.n_kv_heads) == (32000, 11008, 32)
    # Llama 2 70B (vocab 32000) and Llama 3 70B (128256) share 80 layers of 8192 within 3% of each other's
    # parameters: which one a row means is not guessed.
    seventy = {**_row("bridge2511-llama3-70b-gb200x64-fsdp"), "vocab": ""}
    with pytest.raises(RowNotRepresentable, match="vocab not stated"):
        spec_from_row(seventy)


def test_an_empty_experts_per_token_comes_from_the_published_configuration() -> None:
    row = _row("bridge260401-qwen3-30b-b200x8-mxfp8")  # Qwen3 30B-A3B: 128 experts, top-8
    assert spec_from_row({**row, "experts_per_token": ""}) == spec_from_row(row)


@pytest.mark.parametrize("text", ["", "abc", "0", "-5", "inf"])
def test_a_published_value_that_is_not_a_positive_number_is_not_run(text: str) -> None:
    with pytest.raises(RowNotRepresentable, match=f"value={text!r}: expected the published figure"):
        setup_from_row({**_row("bridge2511-llama3-8b-h100x8-fsdp"), "value": text})


@pytest.mark.parametrize(("column", "text", "message"), [
    ("micro_batch", "0", "micro_batch='0': expected a whole number >= 1"),
    ("ep", "0", "ep='0': expected a whole number >= 1"),
    ("heads", "2.5", "heads='2.5': expected a whole number >= 1"),
    ("hidden", "abc", "hidden='abc' is not a number"),
    ("experts", "abc", "experts='abc' is not a number"),
    ("params_b", "-8", "params_b='-8': expected a positive number"),
])
def test_a_bad_training_cell_is_a_row_not_run_with_its_column(column: str, text: str, message: str) -> None:
    with pytest.raises(RowNotRepresentable, match=message):
        fitted_setup(setup_from_row({**_row("bridge2511-llama3-8b-h100x8-fsdp"), column: text}))


def test_mxfp8_and_nvfp4_are_the_schemas_fp8_and_fp4() -> None:
    row = _row("bridge260401-qwen3-30b-b200x8-mxfp8")
    assert setup_from_row({**row, "precision": "MXFP8"}).settings == setup_from_row(row).settings
    assert setup_from_row({**row, "precision": "nvfp4"}).settings.precision == "fp4"


@pytest.mark.parametrize(("name", "word"), [
    ("NeMo", "megatron"), ("Megatron-Bridge", "megatron"), ("Megatron-LM", "megatron"), ("MaxText", "jax"),
    ("Composer", "llm-foundry"), ("torchtitan", "torchtitan"), ("", "in-house"),
])
def test_a_framework_is_named_by_a_product_it_covers(name: str, word: str) -> None:
    assert FRAMEWORKS[word] is framework_facts(name)


@pytest.mark.parametrize(("spelling", "framework"), [
    ("NVIDIA NeMo 2.0", "megatron"), ("Megatron-LM v0.9", "megatron"), ("JAX/MaxText", "jax"),
    ("MaxText (JAX)", "jax"), ("torchtitan (FSDP2)", "torchtitan"), ("FSDP2", "pytorch-fsdp"),
    ("MosaicML Composer", "llm-foundry"), ("DeepSpeed ZeRO-3", "deepspeed"), ("megatron-2021", "megatron-2021"),
    ("Megatron-DeepSpeed", "megatron-deepspeed"), ("", "in-house"), ("NeMo Megatron", "megatron"),
    ("DeepSpeed-Megatron", "megatron-deepspeed"), ("Primus-Megatron", "megatron"),
    ("AMD Primus (Megatron)", "megatron"), ("Primus-Torchtitan", "torchtitan"), ("fms-fsdp", "pytorch-fsdp"),
    ("torch FSDP", "pytorch-fsdp"), ("NeMo Framework", "megatron"), ("llmfoundry", "llm-foundry"),
    ("MosaicML", "llm-foundry"),
])
def test_a_framework_as_tables_print_it_is_the_schema_word(spelling: str, framework: str) -> None:
    assert framework_facts(spelling).name == framework


def test_a_zero_stage_named_with_the_framework_is_the_sharding_an_empty_cell_means() -> None:
    row = {**_row("bridge2511-llama3-8b-h100x8-fsdp"), "sharding": ""}
    assert setup_from_row({**row, "framework": "DeepSpeed ZeRO-3"}).layout.zero_stage == 3
    assert setup_from_row({**row, "framework": "DeepSpeed ZeRO stage 2"}).layout.zero_stage == 2
    assert setup_from_row({**row, "framework": "DeepSpeed"}).layout.zero_stage == 0
    # A stated sharding wins over the framework cell's words.
    assert setup_from_row({**row, "framework": "DeepSpeed ZeRO-3", "sharding": "zero1"}).layout.zero_stage == 1


def test_an_unknown_framework_names_the_words() -> None:
    for name in ("colossalai", "pytorch", "Megatron/DeepSpeed"):  # unknown, or two frameworks at once
        with pytest.raises(PlanError, match=f"framework={name!r}: expected one of megatron"):
            framework_facts(name)


def test_no_corrupted_cell_escapes_as_anything_but_a_row_not_run() -> None:
    """Every column of a sample of rows, set to zero, a fraction, a negative, a word and empty: the row either runs
    or raises PlanError (one line, not run), never another exception."""
    from aiinfra.plan.runs import predicted_metric
    from aiinfra.plan.step import step_breakdown

    rows = load_training_runs()[::12]
    columns = [c for c in rows[0] if c not in ("id", "source", "notes")]
    ran = refused = 0
    for row in rows:
        for column in columns:
            for text in ("0", "2.5", "-1", "abc", ""):
                try:
                    setup = setup_from_row({**row, column: text})
                    step = step_breakdown(setup.spec, setup.settings, setup.layout, setup.cluster)
                    assert predicted_metric(setup, step) > 0
                    ran += 1
                except PlanError:
                    refused += 1
    assert ran and refused


def test_a_csv_without_a_column_runs_its_rows_or_says_why(tmp_path) -> None:
    import csv

    from aiinfra.plan.validation import TRAINING_RUNS_CSV, validate_training

    rows = load_training_runs()
    for missing in ("hardware", "framework", "vp"):
        path = tmp_path / f"without-{missing}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[c for c in rows[0] if c != missing], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        ran, not_run = validate_training(path)
        assert len(ran) + len(not_run) == len(rows)
        if missing == "hardware":
            # Every row that got as far as its hardware says so (the three table rows not run stop earlier).
            assert not ran and sum("unknown hardware ''" in item.reason for item in not_run) >= len(rows) - 3
    assert TRAINING_RUNS_CSV.exists()


SHAPE_AND_COUNTS = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "params_b", "active_params_b", "experts",
                    "experts_per_token")


@pytest.mark.parametrize(("run_id", "checkpoint", "kept"), [
    ("titan-llama2-70b-a100x64", "meta-llama/Llama-2-70b-hf", ()),
    ("bridge260401-qwen3-30b-b200x8-mxfp8", "Qwen/Qwen3-30B-A3B", ()),
    ("bridge2509-dsv3-h100x1024", "deepseek-ai/DeepSeek-V3", ()),
    # The row gives the tokenizer's 262144 entries; config.json pads the embedding to 262208. A stated cell wins.
    ("tpurec-v6e-gemma3-12b-256-32k", "google/gemma-3-12b-pt", ("vocab",)),
])
def test_a_checkpoint_name_in_the_model_cell_is_its_family_and_shape(run_id: str, checkpoint: str,
                                                                     kept: tuple[str, ...]) -> None:
    row = _row(run_id)
    named = {**row, "model": checkpoint, **dict.fromkeys(set(SHAPE_AND_COUNTS) - set(kept), "")}
    stated, by_name = setup_from_row(row), setup_from_row(named)
    assert by_name.spec == stated.spec
    assert (by_name.settings, by_name.layout) == (stated.settings, stated.layout)


def test_a_family_word_never_stands_for_the_one_checkpoint_it_begins() -> None:
    # "nemotron" begins only nemotron-4-340b in the catalog; as a family word it keeps the 15B row's own shape, and a
    # blank vocabulary stays unknown rather than becoming the 340B's.
    assert named_model("nemotron") is None and named_model("nemotron-4-340b")["family"] == "nemotron"
    row = _row("nemo2502-nemotron4-15b-b200x64")
    assert setup_from_row(row).spec.num_params() < 20e9
    with pytest.raises(RowNotRepresentable, match="vocab not stated"):
        setup_from_row({**row, "vocab": ""})


MOE_CELLS = {"experts": "", "experts_per_token": "", "active_params_b": ""}


@pytest.mark.parametrize("run_id", [
    "bridge2606-qwen3-235b-gb200x256-mxfp8",  # EP 32 says sparse
    "tpurec-v5p-dsv3-671b-512",  # no EP: DeepSeek's only published 671B configurations are sparse
])
def test_a_sparse_row_with_its_expert_cells_empty_takes_the_published_experts(run_id: str) -> None:
    row = _row(run_id)
    stated = spec_from_row(row)
    blank = spec_from_row({**row, **MOE_CELLS})
    assert blank.n_experts > 1
    assert (blank.n_experts, blank.experts_per_token, blank.ffn_dim) == (
        stated.n_experts, stated.experts_per_token, stated.ffn_dim)
    assert blank.num_params(active_only=True) == stated.num_params(active_only=True)
    # Without its parameter counts either, the shape it states (with its experts per token, which say it is sparse)
    # names the configuration, and its counts with it.
    uncounted = spec_from_row({**row, **MOE_CELLS, "experts_per_token": row["experts_per_token"], "params_b": ""})
    assert uncounted.num_params() == stated.num_params()


def test_a_dense_count_of_a_family_with_sparse_releases_stays_dense() -> None:
    row = _row("deepseek67b-gpuh-per-T")  # DeepSeek LLM 67B: dense, beside the sparse V2 and V3
    assert spec_from_row(row).n_experts in (0, 1)
    assert spec_from_row({**row, "layers": "", "hidden": ""}).n_layers == 95


def test_a_row_that_is_sparse_by_its_counts_but_names_no_experts_says_so() -> None:
    row = {**_row("bridge2606-qwen3-235b-gb200x256-mxfp8"), **MOE_CELLS, "model": "newmoe", "active_params_b": "22"}
    with pytest.raises(RowNotRepresentable, match="experts not stated for a mixture-of-experts row"):
        spec_from_row(row)


@pytest.mark.parametrize("column", ["tp", "pp"])
def test_the_one_empty_model_parallel_degree_is_what_the_devices_leave(column: str) -> None:
    row = _row("bridge260401-llama3-70b-gb200x64-nvfp4")  # 64 GB200: TP2 PP4 DP8
    stated = setup_from_row(row).layout
    derived = setup_from_row({**row, column: ""}).layout
    assert (derived.tp, derived.pp, derived.dp) == (stated.tp, stated.pp, stated.dp) == (2, 4, 8)
    # With both empty the split of the 64 devices over tp and pp is not guessed.
    with pytest.raises(RowNotRepresentable, match="tp x pp x dp x cp = 8 but n_devices = 64"):
        setup_from_row({**row, "tp": "", "pp": ""})


def test_an_empty_device_count_is_the_product_of_the_stated_degrees() -> None:
    row = _row("bridge2606-qwen3-235b-gb200x256-mxfp8")
    assert setup_from_row({**row, "n_devices": ""}).cluster.n_devices == 256
    with pytest.raises(RowNotRepresentable, match="n_devices not stated"):
        setup_from_row({**row, "n_devices": "", "dp": ""})


def test_a_spreadsheet_export_reads_as_the_table_does(tmp_path) -> None:
    """A byte-order mark, CRLF line ends, spaces and capitals in header names, thousands separators and an mfu
    written as a percentage are how spreadsheets and published tables write the cells: every row keeps its id and
    figure."""
    rows = [row for row in load_training_runs() if row["metric"] == "mfu"][:4]
    header = [f" {name} " if name == "value" else name.title() if name == "hardware" else name for name in rows[0]]
    lines = [",".join(header)]
    for row in rows:
        cells = dict(row)
        cells["value"] = f"{100 * float(row['value']):g}%"
        cells["global_batch_seqs"] = f'"{int(row["global_batch_seqs"]):,}"' if row["global_batch_seqs"] else ""
        lines.append(",".join(cells[name] if name in ("value", "global_batch_seqs") else
                              '"' + cells[name].replace('"', '""') + '"' for name in rows[0]))
    exported = tmp_path / "export.csv"
    exported.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
    plain, _ = validate_training()
    read, not_run = validate_training(exported)
    assert not not_run
    expected = {row.run_id: row for row in plain}
    for row in read:
        assert row.run_id in expected
        assert row.published == pytest.approx(expected[row.run_id].published)
        assert row.predicted == pytest.approx(expected[row.run_id].predicted)


@pytest.mark.parametrize(("value", "message"), [
    ("46.2", "an mfu is a fraction of the peak, at most 1"), ("1,5", "is not a number|expected the published"),
])
def test_an_mfu_above_one_or_a_decimal_comma_is_not_guessed(value: str, message: str) -> None:
    row = {**next(row for row in load_training_runs() if row["metric"] == "mfu"), "value": value}
    with pytest.raises(RowNotRepresentable, match=message):
        setup_from_row(row)


@pytest.mark.parametrize(("spelling", "precision"), [
    ("BF16", "bf16"), ("bfloat16", "bf16"), ("bf16-mixed", "bf16"), ("AMP bf16", "bf16"), ("float16", "fp16"),
    ("MXFP8", "fp8"), ("FP8 (delayed scaling)", "fp8"), ("fp8_e4m3", "fp8"), ("FP8 current scaling", "fp8"),
    ("NVFP4", "fp4"), ("MXFP4", "fp4"), ("W4A16", "int4-weights"), ("INT4 AWQ", "int4-weights"),
    ("int8 weight-only", "int8-weights"), ("", "bf16"), ("tf32", "tf32"),
])
def test_a_precision_as_tables_print_it_is_the_schema_word(spelling: str, precision: str) -> None:
    from aiinfra.plan.cells import row_precision

    assert row_precision({"precision": spelling}) == precision


@pytest.mark.parametrize(("spelling", "stage", "hybrid"), [
    ("FSDP", 3, False), ("ZeRO-3", 3, False), ("ZeRO stage 2", 2, False), ("FULL_SHARD", 3, False),
    ("SHARD_GRAD_OP", 2, False), ("NO_SHARD", 0, False), ("DDP", 0, False), ("distributed optimizer", 1, False),
    ("ZeRO-1 (distributed optimizer)", 1, False), ("HYBRID_SHARD", 3, True), ("HSDP", 3, True),
])
def test_a_sharding_as_frameworks_name_it_is_the_schema_word(spelling: str, stage: int, hybrid: bool) -> None:
    row = _row("bridge2511-llama3-8b-h100x8-fsdp") | {"n_devices": "64", "dp": "64"}
    layout = setup_from_row({**row, "sharding": spelling}).layout
    assert layout.zero_stage == stage
    # HYBRID_SHARD shards inside the 8-GPU NVLink domain and replicates across the 8 nodes.
    assert (layout.dp_shard, layout.dp_replicate) == ((8, 8) if hybrid else (64, 1) if stage else (1, 64))


@pytest.mark.parametrize(("spelling", "recompute"), [
    ("FULL", "full"), ("full activation checkpointing", "full"), ("gradient checkpointing", "full"),
    ("nothing_saveable", "full"), ("SAC", "selective"), ("per-op SAC", "selective"), ("core_attn", "selective"),
    ("save_dot_except_mlp", "selective"), ("minimal_offloaded", "selective"), ("off", "none"), ("false", "none"),
])
def test_a_recompute_as_frameworks_name_it_is_the_schema_word(spelling: str, recompute: str) -> None:
    row = _row("bridge2511-llama3-8b-h100x8-fsdp")
    assert setup_from_row({**row, "recompute": spelling}).layout.recompute == recompute
    with pytest.raises(RowNotRepresentable, match="recompute='fullish': expected none, selective or full"):
        setup_from_row({**row, "recompute": "fullish"})


def test_a_hardware_cell_that_counts_its_parts_gives_the_device_count() -> None:
    from aiinfra.plan.cells import with_counted_hardware

    assert with_counted_hardware({"hardware": "8x H100", "n_devices": ""}) == {"hardware": "H100", "n_devices": "8"}
    assert with_counted_hardware({"hardware": "H200 x 8", "n_devices": ""})["n_devices"] == "8"
    # A stated count wins: "8xH100" then names the node type of a larger run.
    assert with_counted_hardware({"hardware": "8xH100", "n_devices": "64"}) == {"hardware": "H100", "n_devices": "64"}
    for part in ("h100-sxm-80gb", "MI300X", "v5p-1024", "GB200 NVL72"):  # no count, or a slice size
        assert with_counted_hardware({"hardware": part, "n_devices": ""})["hardware"] == part
    row = _row("bridge2511-llama3-8b-h100x8-fsdp")
    counted = setup_from_row({**row, "hardware": "8x H100", "n_devices": "", "dp": ""})
    assert counted.cluster.n_devices == 8 and counted.cluster.accelerator.id == "h100-sxm-80gb"
    # With dp stated, the degrees give the count and the hardware cell's count names a node.
    staged = setup_from_row({**_row("bridge2606-qwen3-235b-gb200x256-mxfp8"), "hardware": "4x GB200", "n_devices": ""})
    assert staged.cluster.n_devices == 256


@pytest.mark.parametrize(("family", "rope", "bias", "tied", "vocab"), [
    ("mpt", False, False, True, 50432), ("bloom", False, True, True, 250880), ("opt", False, True, True, 50272),
    ("falcon", True, False, False, 65024), ("gpt-j", True, True, False, 50400), ("gpt-neox", True, True, False, 0),
])
def test_a_pre_llama_family_word_is_its_published_architecture(family: str, rope: bool, bias: bool, tied: bool,
                                                                vocab: int) -> None:
    """MPT, BLOOM, OPT, Falcon, GPT-J and GPT-NeoX rows are 2-matrix LayerNorm models with a 4 x hidden MLP when the
    row leaves `ffn` empty, not Llama-style SwiGLU ones; positions, biases, tying and vocabulary as each publishes."""
    row = {"model": family, "layers": "32", "hidden": "4096", "heads": "32", "seq_len": "2048",
           "vocab": "" if vocab else "50432"}
    spec = spec_from_row(row)
    assert (spec.mlp, spec.norm, spec.ffn_dim) == ("gelu", "layernorm", 4 * 4096)
    assert (spec.position == "rope", spec.bias, spec.tie_embeddings) == (rope, bias, tied)
    assert spec.vocab_size == (vocab or 50432)
    llama = spec_from_row({**row, "model": "llama", "ffn": str(4 * 4096), "vocab": "50432"})
    assert spec.num_params() < llama.num_params()  # two matrices of 4h, not three

"""Local attention layers (sliding windows, Llama 4's chunks) read fewer keys: the counts against hand sums, and
what training and serving steps take from them."""

from dataclasses import replace

import pytest

from aiinfra.plan.attention_span import causal_pairs, mean_keys
from aiinfra.plan.cluster import make_cluster
from aiinfra.plan.inference import ServeSettings, attended_context, decode_step_time_s, prompt_pairs
from aiinfra.plan.layout import TrainSettings
from aiinfra.plan.serve_rows import serve_models
from aiinfra.plan.step import FLASH_BLOCK, flash_tile_fraction


def test_keys_a_query_reads_by_hand() -> None:
    assert mean_keys(0, 4) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert mean_keys(0, 4, window=2) == pytest.approx((1 + 2 + 2 + 2) / 4)
    assert mean_keys(5, 9, window=2) == 2  # every position past the window reads it all
    assert mean_keys(0, 7, chunk=3) == pytest.approx((1 + 2 + 3 + 1 + 2 + 3 + 1) / 7)
    assert mean_keys(4, 6, chunk=3) == pytest.approx((2 + 3) / 2)  # positions 4 and 5: offsets 1 and 2
    assert causal_pairs(4) == 10 and causal_pairs(4, window=2) == 7 and causal_pairs(6, chunk=3) == 12


def test_a_chunked_layer_computes_only_its_chunks_tiles() -> None:
    settings = TrainSettings(seq_len=16384, global_batch_seqs=8, attention_chunk=8192, chunk_layer_share=0.75)
    causal = 0.5 * (1 + FLASH_BLOCK / 16384)
    chunked = 0.5 * (1 + FLASH_BLOCK / 8192) * 8192 / 16384
    assert flash_tile_fraction(settings) == pytest.approx(0.25 * causal + 0.75 * chunked)
    # A sequence no longer than the chunk is one chunk: causal attention, nothing saved.
    assert flash_tile_fraction(replace(settings, seq_len=8192)) == flash_tile_fraction(
        TrainSettings(seq_len=8192, global_batch_seqs=8))


def test_serving_reads_the_window_or_the_chunk_on_local_layers() -> None:
    llama4 = ServeSettings(20000, 2000, **{k: v for k, v in serve_models()["llama-4-scout-17b-16e"].settings_fields()
                                            .items() if k in ("attention_chunk", "chunk_layer_share")})
    assert (llama4.attention_chunk, llama4.chunk_layer_share) == (8192, 0.75)
    # Outputs at 20000..21999 sit in the chunk from 16384: offsets 3616..5615, mean 4615.5, so 4616.5 keys.
    assert attended_context(llama4) == pytest.approx(0.25 * 21000 + 0.75 * 4616.5)
    gpt_oss = ServeSettings(1000, 1000, attention_window=128, window_layer_share=0.5)
    assert attended_context(gpt_oss) == pytest.approx(0.5 * 1500 + 0.5 * 128)
    assert prompt_pairs(gpt_oss) == pytest.approx(0.5 * 1000 ** 2 / 2 + 0.5 * causal_pairs(1000, window=128))


def test_local_attention_never_slows_a_step() -> None:
    model = serve_models()["gpt-oss-120b"]
    cluster = make_cluster("h100-sxm-80gb", 8)
    for lengths in ((128, 128), (1000, 1000), (20000, 2000)):
        local = ServeSettings(*lengths, tp=8, **model.settings_fields())
        assert local.attention_window == 128
        global_only = replace(local, attention_window=0, window_layer_share=0.0)
        for batch in (1, 64, 512):
            assert decode_step_time_s(model.spec, cluster, local, batch) <= decode_step_time_s(
                model.spec, cluster, global_only, batch)


def test_an_engine_that_frees_local_blocks_holds_more_sequences() -> None:
    from aiinfra.plan.inference import held_kv_tokens

    window = ServeSettings(20000, 2000, attention_window=128, window_layer_share=0.5, trims_window_kv=True)
    assert held_kv_tokens(window) == pytest.approx(0.5 * 21000 + 0.5 * 128)
    assert held_kv_tokens(replace(window, trims_window_kv=False)) == 21000
    chunk = ServeSettings(20000, 2000, attention_chunk=8192, chunk_layer_share=0.75, trims_chunk_kv=True)
    assert held_kv_tokens(chunk) == pytest.approx(0.25 * 21000 + 0.75 * 8192)

    from aiinfra.plan.serve_rows import _predict_inference_row

    row = {"id": "x", "system": "vLLM", "model": "gpt-oss-20b", "hardware": "h100-sxm-80gb", "n_devices": "1",
           "tp": "1", "precision": "fp8", "input_tokens": "8000", "output_tokens": "8000", "max_batch": "4096",
           "metric": "output_tokens_per_s", "value": "1"}
    models = serve_models()
    vllm = _predict_inference_row(row, models)  # the hybrid KV cache manager frees what sliding layers left behind
    other = _predict_inference_row({**row, "system": "SomeEngine"}, models)
    assert vllm.limited_by == other.limited_by == "kv-cache"
    assert vllm.batch > 1.8 * other.batch

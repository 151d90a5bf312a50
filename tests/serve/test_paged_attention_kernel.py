"""The native decode-attention kernel (serve/kernels/paged_attention.cpp) against float64 attention over the same
paged cache, and the engine's fallback to its torch path where the kernel cannot be built."""

import os
import random

import pytest
import torch
import torch.nn.functional as F

from aiinfra.serve import kernels
from aiinfra.serve.runner import NativeDecodeAttention, native_decode_attention


@pytest.fixture(scope="module")
def kernel() -> NativeDecodeAttention:
    library = kernels.paged_decode_attention()
    if library is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the native paged-attention kernel did not build (is g++ installed?)")
        pytest.skip("no C++ compiler here: the native kernel cannot be built")
    return NativeDecodeAttention(library)


def reference(q, k_cache, v_cache, rows, tables, lengths) -> torch.Tensor:
    """float64 attention of each decode row over its context, gathered token by token."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(len(rows), q.shape[1], q.shape[2], dtype=torch.float64)
    for i, (row, table, length) in enumerate(zip(rows.tolist(), tables.tolist(), lengths.tolist())):
        slots = [(table[t // block_size], t % block_size) for t in range(length)]
        keys = torch.stack([k_cache[b, o] for b, o in slots]).double().transpose(0, 1)  # (kv_heads, length, dim)
        values = torch.stack([v_cache[b, o] for b, o in slots]).double().transpose(0, 1)
        query = q[row].double().unsqueeze(1)  # (heads, 1, dim)
        out[i] = F.scaled_dot_product_attention(query, keys, values, enable_gqa=q.shape[1] != kv_heads).squeeze(1)
    return out


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_decode_attention_equals_float64_attention(kernel, dtype, tolerance, heads, kv_heads, threads):
    rng = random.Random(heads * 10 + kv_heads)
    torch.manual_seed(0)
    block_size, dim, num_blocks = 4, 16, 64
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim).to(dtype)
    # A step's rows as the runner lays them out: 7 decode rows among prefill rows (q is a strided slice of the
    # fused q/k/v output), lengths 1, a block boundary (4, 8) and longer, tables of different widths.
    lengths = [1, 4, 5, 8, 13, 29, 40]
    rows = [0, 3, 4, 9, 10, 11, 15]
    blocks = rng.sample(range(num_blocks), sum(-(-n // block_size) for n in lengths))
    tables, used = [], 0
    for length in lengths:
        count = -(-length // block_size)
        tables.append(blocks[used : used + count])
        used += count
    widest = max(map(len, tables))
    table_tensor = torch.tensor([t + [0] * (widest - len(t)) for t in tables], dtype=torch.int32)
    fused = torch.randn(16, heads + 2 * kv_heads, dim).to(dtype)
    q = fused[:, :heads]
    out = torch.full((16, heads, dim), float("nan"), dtype=dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kernel(q, k_cache, v_cache, out, torch.tensor(rows, dtype=torch.int32), table_tensor,
               torch.tensor(lengths, dtype=torch.int32))
    finally:
        torch.set_num_threads(previous)
    expected = reference(q, k_cache, v_cache, torch.tensor(rows), table_tensor, torch.tensor(lengths))
    assert (out[rows].double() - expected).abs().max().item() < tolerance
    others = sorted(set(range(16)) - set(rows))
    assert out[others].isnan().all()  # rows that are not decodes are left for the prefill path


def test_without_a_compiler_auto_falls_back_and_native_is_refused(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("AIINFRA_KERNEL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(kernels, "find_compiler", lambda: None)
    kernels.paged_decode_attention.cache_clear()
    try:
        assert native_decode_attention("auto", torch.device("cpu"), torch.float32) is None
        assert "no C++ compiler" in caplog.text
        with pytest.raises(ValueError, match="attention_backend 'native'"):
            native_decode_attention("native", torch.device("cpu"), torch.float32)
    finally:
        kernels.paged_decode_attention.cache_clear()
    with pytest.raises(ValueError, match="expected auto, native or torch"):
        native_decode_attention("flash", torch.device("cpu"), torch.float32)
    # fp16 has no native kernel: auto keeps torch, native says why.
    assert native_decode_attention("auto", torch.device("cpu"), torch.float16) is None
    with pytest.raises(ValueError, match="fp32 or bf16"):
        native_decode_attention("native", torch.device("cpu"), torch.float16)


def test_a_failed_build_leaves_no_library_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("AIINFRA_KERNEL_CACHE", str(tmp_path))
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    if kernels.find_compiler() is None:
        pytest.skip("no C++ compiler here")
    with pytest.raises(RuntimeError, match="failed on broken.cpp"):
        kernels.build(broken)
    assert not list(tmp_path.rglob("*.so"))


def test_serve_refuses_an_unknown_attention_backend_by_name(tmp_path, monkeypatch):
    from typer import Typer
    from typer.testing import CliRunner

    from aiinfra.serve.commands import serve_command

    app = Typer()
    app.command("serve")(serve_command)
    app.command("other")(lambda: None)
    threads = torch.get_num_threads()
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--attention-backend", "flash"])
    assert result.exit_code == 2 and "--attention-backend 'flash': expected auto, native or torch" in result.output
    monkeypatch.setattr(kernels, "paged_decode_attention", lambda: None)
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--attention-backend", "native"])
    assert result.exit_code == 2 and "--attention-backend native: the kernel could not be built" in result.output
    torch.set_num_threads(threads)

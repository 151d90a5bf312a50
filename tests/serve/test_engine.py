"""The engine against the oracle: batched, paged, chunked, prefix-cached, preempted greedy decoding equals naive
full recomputation token for token; and the block manager's bookkeeping."""

import random

import pytest
import torch

from aiinfra.models.llama import Transformer
from aiinfra.models.sampling import sample
from aiinfra.serve.block_manager import BlockManager
from aiinfra.serve.engine import EngineConfig, LLMEngine
from aiinfra.serve.request import SamplingParams
from aiinfra.serve.runner import FusedLinear, choose_small_batch_paths
from aiinfra.spec import ModelSpec

SMALL = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=96)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelSpec(**SMALL)).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Mixed lengths (1 to 40 tokens), plus three prompts sharing a 21-token prefix (several full blocks)."""
    rng = random.Random(0)
    shared = [rng.randrange(97) for _ in range(21)]
    mixed = [[rng.randrange(97) for _ in range(length)] for length in (1, 2, 7, 16, 17, 33, 40, 5)]
    return mixed + [shared + [1, 2, 3], shared + [4], shared]


@pytest.fixture(scope="module")
def oracle(model: Transformer, prompts: list[list[int]]) -> list[list[int]]:
    return [sample(model, prompt, 24, temperature=0) for prompt in prompts]


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(enable_prefix_caching=False),
        EngineConfig(pack_weights=False),  # the modules' own matmuls instead of the fused oneDNN-packed ones
        EngineConfig(attention_backend="torch"),  # decode attention by gathering blocks and SDPA, not the kernel
        EngineConfig(block_size=4, max_num_batched_tokens=7),  # every prompt over 7 tokens is chunked
        EngineConfig(block_size=4),  # prefix caching of the shared prompt blocks
        EngineConfig(block_size=4, num_blocks=30, max_num_batched_tokens=16),  # too few blocks: preemption
        EngineConfig(block_size=8, num_blocks=13, max_num_seqs=3, max_num_batched_tokens=5),  # all of it at once
    ],
    ids=["plain", "unpacked-weights", "torch-attention", "chunked-prefill", "prefix-cache", "preemption", "everything"],
)
def test_greedy_engine_equals_full_recompute(model, prompts, oracle, config: EngineConfig) -> None:
    engine = LLMEngine(model, config)
    got = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    assert got == oracle
    # Every block is returned once all requests finish.
    assert engine.block_manager.usage == 0.0
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    if config.num_blocks == 30:
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("rows", [1, 2, 3, 17])
def test_fused_linear_equals_the_modules(rows: int) -> None:
    torch.manual_seed(0)
    modules = [torch.nn.Linear(32, 48), torch.nn.Linear(32, 16, bias=False)]
    x = torch.randn(rows, 32)
    with torch.inference_mode():
        # Computed before fusing: afterwards the modules' weights are views of the fused matrix.
        want = torch.cat([module(x) for module in modules], dim=-1)
        fused = FusedLinear(modules, rows_hint=8, pack=True)
        torch.testing.assert_close(fused(x), want)
        # ... and the modules still compute what they did.
        torch.testing.assert_close(torch.cat([module(x) for module in modules], dim=-1), want)


def test_small_batch_paths_are_measured_per_shape_and_both_compute_the_same(monkeypatch) -> None:
    torch.manual_seed(0)
    projections = [FusedLinear([torch.nn.Linear(64, 96, bias=False)], rows_hint=8, pack=True) for _ in range(3)]
    projections.append(FusedLinear([torch.nn.Linear(96, 64, bias=False)], rows_hint=8, pack=True))
    with torch.inference_mode():
        chosen = choose_small_batch_paths(projections, sweeps=1)
        assert set(chosen) == {(64, 96), (96, 64)} and set(chosen.values()) <= {1, 2, 3}
        assert [p.min_rows for p in projections[:3]] == [chosen[(64, 96)]] * 3  # one decision per shape
        # Whichever path a row count takes, the result is the same product.
        for rows in (1, 2, 3):
            x = torch.randn(rows, 64)
            for min_rows in (1, 3):
                projections[0].min_rows = min_rows
                torch.testing.assert_close(projections[0](x), x @ projections[0].weight_t)
    # A slower packed path is never chosen: with `mm` made free, every shape keeps mm below 3 rows.
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: a[:, :1] if a.shape[0] < 3 else real_mm(a, b))
    with torch.inference_mode():
        assert set(choose_small_batch_paths(projections, sweeps=1).values()) == {3}


def test_prefix_cache_hits_skip_prompt_tokens_and_keep_outputs(model, prompts, oracle) -> None:
    engine = LLMEngine(model, EngineConfig(block_size=4))
    shared_prompt = prompts[-1]
    assert engine.generate([shared_prompt], SamplingParams(max_tokens=24, temperature=0)) == [oracle[-1]]
    engine.add_request("again", prompts[-3], SamplingParams(max_tokens=24, temperature=0))
    tokens, cached = [], None
    while engine.has_unfinished():
        for output in engine.step():
            tokens += output.new_token_ids
            cached = output.num_cached_tokens
    assert tokens == oracle[-3]
    assert cached == 20  # five full blocks of the 21-token shared prefix


def test_requests_join_and_leave_the_running_batch(model, prompts, oracle) -> None:
    engine = LLMEngine(model, EngineConfig(block_size=4))
    engine.add_request("first", prompts[3], SamplingParams(max_tokens=24, temperature=0))
    outputs: dict[str, list[int]] = {"first": [], "late": []}
    steps = 0
    while engine.has_unfinished():
        if steps == 5:  # arrives while "first" is decoding
            engine.add_request("late", prompts[6], SamplingParams(max_tokens=24, temperature=0))
        for output in engine.step():
            outputs[output.request_id] += output.new_token_ids
        steps += 1
    assert outputs == {"first": oracle[3], "late": oracle[6]}


def test_abort_frees_blocks_at_once(model, prompts) -> None:
    engine = LLMEngine(model, EngineConfig(block_size=4))
    engine.add_request("gone", prompts[6], SamplingParams(max_tokens=24, temperature=0))
    engine.step()
    assert engine.block_manager.usage > 0
    engine.abort_request("gone")
    assert engine.block_manager.usage == 0.0


def test_seeded_sampling_matches_the_reference_sampler(model, prompts) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, seed=7)
    engine = LLMEngine(model, EngineConfig(block_size=4))
    got = engine.generate(prompts[:4], [params] * 4)
    want = [sample(model, prompt, 12, temperature=0.9, top_k=20, seed=7) for prompt in prompts[:4]]
    assert got == want


def test_stop_tokens_min_tokens_and_top_p(model, prompts, oracle) -> None:
    engine = LLMEngine(model, EngineConfig(), eos_token_id=oracle[4][3])
    stopped = engine.generate([prompts[4]], SamplingParams(max_tokens=24, temperature=0))[0]
    assert stopped == oracle[4][:3]  # the end-of-text token itself is not returned
    ignored = engine.generate([prompts[4]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert ignored == oracle[4]
    forced = engine.generate([prompts[4]], SamplingParams(max_tokens=24, temperature=0, min_tokens=5))[0]
    assert len(forced) >= 5 and oracle[4][3] not in forced[:5]
    # top_p so small that only the likeliest token survives: sampling becomes greedy.
    nucleus = engine.generate([prompts[0]], SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=1))[0]
    assert nucleus == oracle[0][:10]


def test_block_manager_refcounts_prefix_sharing_and_lru_eviction() -> None:
    manager = BlockManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    assert manager.allocate("a", 5)
    manager.cache_full_blocks("a", tokens, 5)
    shared = manager.find_cached_prefix(tokens[:4])
    assert shared == manager.block_table("a")[:2]
    assert manager.allocate("b", 5, shared)
    assert manager.ref_counts[shared[0]] == 2 and manager.num_free_blocks == 0
    assert not manager.allocate("c", 2)  # no room: the caller must preempt
    manager.free("a")
    manager.free("b")
    assert manager.usage == 0.0
    # Freed blocks stay findable until reused, and the last block of a sequence is evicted first.
    assert manager.find_cached_prefix(tokens[:4]) == shared
    assert manager.allocate("c", 2)
    assert manager.find_cached_prefix(tokens[:4]) == shared
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=2)


def test_engine_refuses_what_cannot_fit(model) -> None:
    engine = LLMEngine(model, EngineConfig())
    with pytest.raises(ValueError, match="context holds 96"):
        engine.add_request("long", [1] * 90, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="one full-context request"):
        LLMEngine(model, EngineConfig(block_size=4, num_blocks=10))

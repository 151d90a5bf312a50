import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from aiinfra.models import Transformer, apply_rotary, rotary_tables
from aiinfra.spec import ModelSpec, preset

SMALL = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(**SMALL),
        ModelSpec(**SMALL, tie_embeddings=True),
        ModelSpec(**{**SMALL, "n_kv_heads": 1}),
        ModelSpec(**SMALL, mlp="gelu", norm="layernorm", position="learned", bias=True),
        ModelSpec(**SMALL, n_experts=4, experts_per_token=2),
    ],
    ids=["llama", "tied", "mqa", "gpt", "moe"],
)
def test_attention_is_causal(spec: ModelSpec) -> None:
    torch.manual_seed(0)
    model = Transformer(spec).eval()
    tokens = torch.randint(0, spec.vocab_size, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, spec.vocab_size, (2, 8))
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_rotary_matches_reference_formula() -> None:
    head_dim, theta, seq = 8, 10000.0, 7
    x = torch.randn(1, 1, seq, head_dim, dtype=torch.float64)
    cos, sin = rotary_tables(head_dim, seq, theta)
    got = apply_rotary(x.float(), cos, sin).double()
    expected = torch.empty_like(x)
    half = head_dim // 2
    for position in range(seq):
        for i in range(half):
            angle = position * theta ** (-2 * i / head_dim)
            a, b = x[0, 0, position, i], x[0, 0, position, i + half]
            expected[0, 0, position, i] = a * math.cos(angle) - b * math.sin(angle)
            expected[0, 0, position, i + half] = b * math.cos(angle) + a * math.sin(angle)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    cos, sin = rotary_tables(16, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rotary(q, cos[m : m + 1], sin[m : m + 1]) * apply_rotary(k, cos[n : n + 1], sin[n : n + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "small", "1b", "llama3-8b", "llama3-70b", "llama3-405b", "gpt3-175b"])
def test_parameter_count_equals_torch(name: str) -> None:
    spec = preset(name)
    with torch.device("meta"):
        model = Transformer(spec)
    assert sum(p.numel() for p in model.parameters()) == spec.num_params()


def test_published_parameter_counts() -> None:
    # Llama 3 405B, 70B, 8B and GPT-3 175B as published (rounded).
    assert round(preset("llama3-8b").num_params() / 1e9, 2) == 8.03
    assert round(preset("llama3-70b").num_params() / 1e9, 1) == 70.6
    assert round(preset("llama3-405b").num_params() / 1e9) == 406
    assert round(preset("gpt3-175b").num_params() / 1e9, 1) == 174.6


@pytest.mark.parametrize(
    "spec",
    [
        preset("tiny"),
        ModelSpec(**SMALL, mlp="gelu", norm="layernorm", position="learned", bias=True, tie_embeddings=True),
        ModelSpec(**SMALL, n_experts=4, experts_per_token=2),
    ],
    ids=["tiny", "gpt", "moe"],
)
def test_training_flops_equal_torch_flop_counter(spec: ModelSpec) -> None:
    batch, seq = 2, 32
    model = Transformer(spec)
    tokens = torch.randint(0, spec.vocab_size, (batch, seq))
    # The math SDPA backend decomposes attention into matmuls that the flop counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    assert counter.get_total_flops() == spec.train_flops_per_token(seq) * batch * seq


def test_tied_embeddings_share_storage() -> None:
    model = Transformer(ModelSpec(**SMALL, tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight


def test_bad_shapes_are_rejected_with_their_names() -> None:
    with pytest.raises(ValueError, match="n_heads=5"):
        ModelSpec(dim=64, n_heads=5, n_kv_heads=5)
    with pytest.raises(ValueError, match="divisible by n_kv_heads=3"):
        ModelSpec(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="max_seq_len=32"):
        Transformer(ModelSpec(**SMALL))(torch.zeros(1, 33, dtype=torch.long))

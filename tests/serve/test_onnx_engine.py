"""The ONNX Runtime engine with its KV cache: torch's logits (fp32, prefill and every decode step), torch's tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aiinfra.checkpoint.export import export_onnx
from aiinfra.models.cached import CachedTransformer

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
sys.path.insert(0, str(Path(__file__).parents[1] / "checkpoint"))
from test_export import make_run  # noqa: E402  (the export tests' tiny run)

from aiinfra.serve.onnx_engine import OnnxEngine  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("onnx_engine")
    model = make_run(root / "run", "model.tie_embeddings=true")
    return model, OnnxEngine(export_onnx(root / "run", root / "onnx"))


def make_run_model():
    """A small random GQA model (2 KV heads for 4 query heads)."""
    from aiinfra.config import load_config
    from aiinfra.models import Transformer

    config = load_config(
        None,
        [
            "model.vocab_size=300",
            "model.dim=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.ffn_dim=128",
            "model.max_seq_len=32",
            "train.seq_len=32",
        ],
    )
    torch.manual_seed(3)
    return Transformer(config.model).eval()


def test_cached_module_equals_the_full_forward() -> None:
    model = make_run_model()
    cached = CachedTransformer(model)
    tokens = torch.randint(0, model.spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens)
        logits, *cache = cached(tokens[:, :7], *cached.empty_cache(2))
        torch.testing.assert_close(logits, full[:, :7], rtol=0, atol=1e-5)
        for position in range(7, 12):
            logits, *cache = cached(tokens[:, position : position + 1], *cache)
            torch.testing.assert_close(logits[:, 0], full[:, position], rtol=0, atol=1e-5)
        assert cache[0].shape == (2, model.spec.n_kv_heads, 12, model.spec.head_dim)


def test_onnx_logits_match_torch_at_prefill_and_every_decode_step(exported) -> None:
    model, engine = exported
    tokens = torch.randint(0, model.spec.vocab_size, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(tokens).numpy()
    logits, past = engine.forward(tokens[:, :9].numpy())
    assert np.abs(logits - full[:, :9]).max() < 1e-4
    for position in range(9, 20):
        logits, past = engine.forward(tokens[:, position : position + 1].numpy(), past)
        assert logits.shape == (3, 1, model.spec.vocab_size)
        assert np.abs(logits[:, 0] - full[:, position]).max() < 1e-4
    assert past[0].shape == (3, model.spec.n_kv_heads, 20, model.spec.head_dim)
    assert len(past) == 2 * model.spec.n_layers


def test_onnx_greedy_tokens_equal_torch_with_and_without_the_cache(exported) -> None:
    model, engine = exported
    prompt = [5, 17, 42, 8]
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    expected = tokens[len(prompt) :]
    assert engine.generate_ids(prompt, 20, use_cache=True, stop_at_eos=False) == expected
    assert engine.generate_ids(prompt, 20, use_cache=False, stop_at_eos=False) == expected
    assert isinstance(engine.generate("def ", 5), str)


def test_a_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    from aiinfra.config import ConfigError

    with pytest.raises(ConfigError, match="no model.onnx, tokenizer.json"):
        OnnxEngine(tmp_path)

"""Serving tests run torch on one thread: tiny matmuls gain nothing from two, and on a busy 2-core machine
two threads spin against other processes and run up to a hundred times slower."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aiinfra.serve.loading import ServedModel

from .server import running_server, tiny_served_model


@pytest.fixture(autouse=True)
def _single_threaded(one_torch_thread: None) -> None:
    """Every test here runs with `one_torch_thread` (tests/conftest.py)."""


@pytest.fixture(scope="module")
def served() -> ServedModel:
    """The tiny random model every HTTP test serves."""
    return tiny_served_model()


@pytest.fixture(scope="module")
def server(served: ServedModel):
    """`served` behind the HTTP API on a free port, for the module."""
    with running_server(served) as running:
        yield running


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder written by transformers (with the tiny model's tokenizer)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, eos_token_id=0, bos_token_id=0,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tiny_served_model().tokenizer.save(str(folder / "tokenizer.json"))
    return folder

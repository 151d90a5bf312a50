"""Fine-tuning from a Hugging Face Llama folder (`train.init_from`): the model shape from its config.json, the
corpus tokenized with its tokenizer.json, the weights from its safetensors, each rank reading only its own slices.

Checked: one process starts from exactly the folder's weights and computes transformers' logits; FSDP x 2 and
TP x 2 gather to the same weights bit for bit; a model.* setting that disagrees with the folder, and a folder
without config.json, are clear ConfigErrors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aiinfra.config import ConfigError, load_config
from aiinfra.data.tokenizer import END_OF_TEXT, train_tokenizer
from aiinfra.hf_format import hf_name_to_ours
from aiinfra.train import Trainer

LAYOUTS = {
    "fsdp": ["parallel.dp_shard=2", "train.micro_batch=4"],
    "tp": ["parallel.tp=2", "train.micro_batch=8"],
}


@pytest.fixture(scope="module")
def llama_folder(dist_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama written by transformers, with a tokenizer trained on the test corpus (its own vocabulary)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llama")
    texts = [path.read_text() for path in sorted(Path(dist_corpus).rglob("*.py"))]
    tokenizer = train_tokenizer(texts, 400)
    tokenizer.save(str(folder / "tokenizer.json"))
    eos = tokenizer.token_to_id(END_OF_TEXT)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rope_theta=10000.0,
        eos_token_id=eos, bos_token_id=eos, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def fine_tune_overrides(base: list[str], folder: Path) -> list[str]:
    return [item for item in base if not item.startswith("model.")] + [f"train.init_from={folder}"]


def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(folder / "model.safetensors"))
    return {hf_name_to_ours(name): tensor for name, tensor in weights.items() if hf_name_to_ours(name)}


def test_one_process_starts_from_the_folder_and_computes_transformers_logits(
    base: list[str], llama_folder: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    config = load_config(None, fine_tune_overrides(base, llama_folder))
    assert (config.model.dim, config.model.n_layers, config.model.ffn_dim) == (64, 2, 96)
    trainer = Trainer(config, run_dir=tmp_path / "run")
    expected = folder_weights(llama_folder)
    state = trainer.model.state_dict()
    assert expected.keys() <= state.keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())
    assert trainer.dataset.tokenizer.get_vocab() == trainer.dataset.tokenizer.from_file(
        str(llama_folder / "tokenizer.json")).get_vocab()
    reference = transformers.LlamaForCausalLM.from_pretrained(llama_folder).eval()
    ids = torch.randint(0, config.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = trainer.model.eval()(ids).float()
        theirs = reference(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    trainer.checkpoints.close()


def test_fsdp_and_tensor_parallel_read_their_shards_of_the_same_weights(
    base: list[str], llama_folder: Path, run_worker, tmp_path: Path
) -> None:
    run_worker(2, {"base": fine_tune_overrides(base, llama_folder), "layouts": LAYOUTS, "steps": 0,
                   "out": str(tmp_path)}, tmp_path)
    expected = folder_weights(llama_folder)
    for name in LAYOUTS:
        state = torch.load(tmp_path / f"{name}.pt", weights_only=False)["state"]
        assert all(torch.equal(state[key], tensor) for key, tensor in expected.items()), name


def test_a_model_setting_that_disagrees_with_the_folder_is_refused(base: list[str], llama_folder: Path,
                                                                    tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.dim=128"):
        load_config(None, [*fine_tune_overrides(base, llama_folder), "model.dim=128"])
    assert load_config(None, [*fine_tune_overrides(base, llama_folder), "model.dim=64"]).model.dim == 64
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(None, [*fine_tune_overrides(base, tmp_path)])

"""Knowledge distillation: the loss against a hand computation, the teacher's checks, and a distilled run's records."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aiinfra.checkpoint.run_dir import save_run
from aiinfra.config import Config, ConfigError, load_config
from aiinfra.data.dataset import prepare_dataset
from aiinfra.models import Transformer
from aiinfra.train import Trainer
from aiinfra.train.distill import distillation_loss


def softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(value / temperature) for value in row]
    return [value / sum(exps) for value in exps]


@pytest.mark.parametrize("alpha,temperature", [(0.5, 1.0), (0.3, 2.0), (1.0, 0.5)])
def test_kd_loss_equals_a_hand_computation(alpha: float, temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    teacher = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, 3), generator=generator)
    kl_sum, ce_sum, tokens = 0.0, 0.0, 0
    for b in range(2):
        for t in range(3):
            p = softmax(teacher[b, t].tolist(), temperature)
            q = softmax(student[b, t].tolist(), temperature)
            kl_sum += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
            ce_sum -= math.log(softmax(student[b, t].tolist(), 1.0)[int(targets[b, t])])
            tokens += 1
    kd_expected = temperature**2 * kl_sum / tokens
    ce_expected = ce_sum / tokens
    total, kd, ce = distillation_loss(student, teacher, targets, alpha, temperature)
    assert kd.item() == pytest.approx(kd_expected, rel=1e-6)
    assert ce.item() == pytest.approx(ce_expected, rel=1e-6)
    assert total.item() == pytest.approx(alpha * kd_expected + (1 - alpha) * ce_expected, rel=1e-6)


def test_kd_loss_at_alpha_zero_is_exactly_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 8, 32, generator=generator), torch.randn(4, 8, 32, generator=generator)
    targets = torch.randint(0, 32, (4, 8), generator=generator)
    total, kd, _ = distillation_loss(student, teacher, targets, 0.0, 2.0)
    assert torch.equal(total, F.cross_entropy(student.flatten(0, 1), targets.flatten()))
    assert kd.item() > 0  # the KD term is still computed (and logged) at alpha = 0
    # A student equal to its teacher has nothing left to learn from it.
    assert distillation_loss(teacher, teacher, targets, 1.0, 2.0)[1].item() == pytest.approx(0.0, abs=1e-6)


def make_teacher(config: Config, run_dir: Path, **spec_overrides) -> Transformer:
    """A finished run with random weights and the tokenizer of `config`'s data (what a teacher needs to be)."""
    data = config.data
    dataset = prepare_dataset(str(data.corpus), config.model.vocab_size, data.val_fraction, Path(data.cache_dir))
    teacher_config = config.model_copy(deep=True, update={"model": config.model.model_copy(update=spec_overrides)})
    torch.manual_seed(7)
    model = Transformer(teacher_config.model)
    run_dir.mkdir(parents=True)
    save_run(run_dir, model, teacher_config, dataset.tokenizer, {})
    return model


def test_distilled_steps_log_both_terms_and_leave_the_teacher_frozen(tiny_config: Config, tmp_path: Path) -> None:
    teacher = make_teacher(tiny_config, tmp_path / "teacher", dim=96, n_layers=3)
    config = tiny_config.model_copy(deep=True)
    config.distill.teacher, config.distill.alpha = str(tmp_path / "teacher"), 0.25
    trainer = Trainer(config, run_dir=tmp_path / "student")
    before = {name: tensor.clone() for name, tensor in trainer.distiller.teacher.state_dict().items()}
    metrics = [trainer.train_step() for _ in range(2)]
    for step in metrics:
        assert step["loss"] == pytest.approx(0.25 * step["kd_loss"] + 0.75 * step["ce_loss"], rel=1e-5)
        assert step["kd_loss"] > 0
    after = trainer.distiller.teacher.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not trainer.distiller.teacher.training
    assert all(not parameter.requires_grad for parameter in trainer.distiller.teacher.parameters())
    assert sum(p.numel() for p in trainer.distiller.teacher.parameters()) == teacher.spec.num_params()
    # Validation stays plain cross-entropy: the figure a plain run reports for the same weights.
    val_loss = trainer.evaluate()
    trainer.distiller = None
    assert trainer.evaluate() == val_loss


def test_a_teacher_with_another_vocabulary_is_refused(tiny_config: Config, tmp_path: Path) -> None:
    make_teacher(tiny_config, tmp_path / "teacher")
    config = tiny_config.model_copy(deep=True)
    config.distill.teacher = str(tmp_path / "teacher")
    config.model = config.model.model_copy(update={"vocab_size": 400})
    with pytest.raises(ConfigError, match="the student must use the teacher's tokenizer"):
        Trainer(config, run_dir=tmp_path / "student")
    config.distill.teacher = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="distill.teacher=.*nowhere.*is it a finished run"):
        Trainer(config, run_dir=tmp_path / "student2")


def test_distillation_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="distill.alpha"):
        load_config(None, ["distill.alpha=1.5"])
    with pytest.raises(ConfigError, match="distill.temperature"):
        load_config(None, ["distill.temperature=0"])
    with pytest.raises(ConfigError, match="distill.teacher with parallel.pp=2"):
        load_config(None, ["distill.teacher=runs/x", "parallel.pp=2", "model.tie_embeddings=false"])

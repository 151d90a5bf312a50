"""Knowledge distillation: a frozen teacher run's soft targets beside the student's cross-entropy.

    loss = alpha * T^2 * KL(p_teacher(T) || p_student(T)) + (1 - alpha) * cross-entropy

per token (the KL summed over the vocabulary) and averaged over tokens, as torchtune's KD recipe (forward KL,
kd_ratio = alpha); the T^2 factor (Hinton et al. 2015) keeps the soft term's gradients the same size whatever T.
The teacher is a finished run directory loaded whole on every rank (never wrapped in DDP or FSDP: it has no
gradients to reduce), frozen, in eval mode, run forward only on the rank's own micro-batch in the training dtype.
The student must use the teacher's tokenizer: the same vocabulary, token for token.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from aiinfra.checkpoint.run_dir import load_run
from aiinfra.config import Config, ConfigError
from aiinfra.models import Transformer


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, alpha: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, kd, ce): the weighted loss, the T^2-scaled KL term and the cross-entropy, each a mean over tokens,
    computed in fp32 whatever the compute dtype. At alpha = 0 the total is exactly the cross-entropy."""
    student = student_logits.flatten(0, 1).float()
    teacher = teacher_logits.flatten(0, 1).float()
    ce = F.cross_entropy(student, targets.flatten())
    # batchmean over the flattened (tokens, vocab) rows: the KL summed over the vocabulary, averaged over tokens.
    kd = (
        F.kl_div(
            F.log_softmax(student / temperature, dim=-1),
            F.log_softmax(teacher / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )
    return alpha * kd + (1 - alpha) * ce, kd, ce


def load_teacher(config: Config, tokenizer: Tokenizer, device: torch.device) -> Transformer:
    """The teacher of `config.distill.teacher`, frozen and in eval mode on `device`; a ConfigError if it is not a
    finished run, uses another tokenizer than the student's data (`tokenizer`), or is too short for train.seq_len."""
    run_dir = config.distill.teacher
    origin = f"distill.teacher={run_dir!r}"
    try:
        run = load_run(Path(run_dir), device)
    except ConfigError as error:
        raise ConfigError(f"{origin}: {error}") from None
    teacher_vocab, student_vocab = run.config.model.vocab_size, config.model.vocab_size
    if teacher_vocab != student_vocab:
        raise ConfigError(
            f"{origin}: the teacher's vocabulary has {teacher_vocab} entries, model.vocab_size={student_vocab}: the "
            f"student must use the teacher's tokenizer (set model.vocab_size={teacher_vocab})"
        )
    if run.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"{origin}: the teacher's tokenizer differs from the one of data.corpus={config.data.corpus!r}: train the "
            f"student on the teacher's corpus ({run.config.data.corpus!r}) with its vocab_size ({teacher_vocab})"
        )
    if run.config.model.max_seq_len < config.train.seq_len:
        raise ConfigError(
            f"{origin}: the teacher's max_seq_len={run.config.model.max_seq_len} is shorter than "
            f"train.seq_len={config.train.seq_len}"
        )
    model = run.model.to(device).eval()
    model.requires_grad_(False)
    return model


class Distiller:
    """The student's loss under distillation: `teach(inputs)` runs the teacher on a micro-batch, and the next
    `loss_from_logits` call uses its logits (then drops them). A call with no logits pending is plain cross-entropy:
    validation, so that a distilled run and a plain one report the same figure."""

    def __init__(self, teacher: Transformer, alpha: float, temperature: float, autocast_dtype: torch.dtype | None):
        self.teacher = teacher
        self.alpha, self.temperature = alpha, temperature
        self.autocast_dtype = autocast_dtype
        self._teacher_logits: torch.Tensor | None = None
        self._terms: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def teach(self, inputs: torch.Tensor) -> None:
        """Run the teacher forward on `inputs` (this rank's micro-batch), in the training dtype."""
        device_type = inputs.device.type
        autocast = (
            torch.autocast(device_type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            self._teacher_logits = self.teacher(inputs)

    def loss_from_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._teacher_logits is None:
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        total, kd, ce = distillation_loss(logits, self._teacher_logits, targets, self.alpha, self.temperature)
        self._teacher_logits = None
        self._terms.append((kd.detach(), ce.detach()))
        return total

    def take_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's mean KD and CE terms over the micro-batches since the last call (equal-sized micro-batches:
        the mean over their tokens)."""
        kd = torch.stack([term[0] for term in self._terms]).mean()
        ce = torch.stack([term[1] for term in self._terms]).mean()
        self._terms = []
        return kd, ce


def build_distiller(config: Config, tokenizer: Tokenizer, device: torch.device) -> Distiller | None:
    """The distiller `config.distill` asks for; None for plain training."""
    if config.distill.teacher is None:
        return None
    autocast_dtype = torch.bfloat16 if config.train.dtype == "bf16" else None
    teacher = load_teacher(config, tokenizer, device)
    return Distiller(teacher, config.distill.alpha, config.distill.temperature, autocast_dtype)

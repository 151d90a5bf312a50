"""The model specification: sizes, named presets, and exact parameter and FLOP counts.

This module is torch-free. The trainer builds its torch module from a `ModelSpec` (models/), and the planner
(plan/) counts the same spec, so both share one source of truth.

FLOP convention (stated once, used everywhere): a multiply-add is 2 FLOPs; only matrix multiplications are
counted (norms, activations, softmax and biases are not); training costs 3x the forward pass (the backward
computes gradients for activations and for weights); the attention score and value products are counted over
the full sequence with no discount for the causal mask, as in PaLM (Chowdhery et al. 2022, appendix B) and
Megatron-LM (Narayanan et al. 2021, eq. 3). The embedding lookup is free; the output projection is a matmul
even when it shares the embedding's weights.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelSpec(BaseModel):
    """A decoder-only transformer: Llama-style by default, GPT-style through `mlp`, `norm`, `position`, `bias`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str | None = Field(None, description="named preset whose values fill every field not given")
    vocab_size: int = Field(4096, ge=2, description="rows of the embedding and output projection")
    dim: int = Field(256, ge=1, description="width of the residual stream (hidden size)")
    n_layers: int = Field(4, ge=1, description="number of transformer blocks")
    n_heads: int = Field(8, ge=1, description="query heads")
    n_kv_heads: int = Field(8, ge=1, description="key/value heads (grouped-query attention when < n_heads)")
    head_width: int = Field(0, ge=0, description="width of each attention head when it is not dim / n_heads "
                                                 "(Qwen3's 128, Gemma 3's 256); 0: dim // n_heads")
    ffn_dim: int = Field(1024, ge=1, description="hidden width of the MLP (of each expert under MoE)")
    max_seq_len: int = Field(256, ge=1, description="longest sequence the model is built for")
    rope_theta: float = Field(10000.0, gt=0, description="rotary embedding base")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of RMSNorm/LayerNorm")
    tie_embeddings: bool = Field(False, description="share the token embedding with the output projection")
    mlp: Literal["swiglu", "gelu"] = Field("swiglu", description="SwiGLU (3 matrices) or GELU (2 matrices) MLP")
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="normalisation layer")
    position: Literal["rope", "learned"] = Field("rope", description="rotary or learned absolute positions")
    bias: bool = Field(False, description="biases on linear layers and norms (GPT-style)")
    n_experts: int = Field(0, ge=0, description="experts per MoE layer; 0 means a dense MLP")
    experts_per_token: int = Field(0, ge=0, description="experts each token is routed to (top-k) under MoE")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
            return {**PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelSpec:
        if not self.head_width and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise ValueError(f"experts_per_token must be in 1..n_experts={self.n_experts}")
        return self

    @property
    def head_dim(self) -> int:
        return self.head_width or self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    # ---- parameter counts -------------------------------------------------------------------------------
    def attention_params(self) -> int:
        """Weights of one attention block (q, k, v, o projections and their biases)."""
        q_out = self.n_heads * self.head_dim
        kv_out = self.n_kv_heads * self.head_dim
        weights = self.dim * q_out + 2 * self.dim * kv_out + q_out * self.dim
        biases = (q_out + 2 * kv_out + self.dim) if self.bias else 0
        return weights + biases

    def expert_params(self) -> int:
        """Weights of one dense MLP (or of one expert)."""
        matrices = 3 if self.mlp == "swiglu" else 2
        biases = ((2 if self.mlp == "swiglu" else 1) * self.ffn_dim + self.dim) if self.bias else 0
        return matrices * self.dim * self.ffn_dim + biases

    def mlp_params(self, active_only: bool = False) -> int:
        """Weights of one MLP block; under MoE all experts plus the router, or only those a token uses."""
        if not self.is_moe:
            return self.expert_params()
        experts = self.experts_per_token if active_only else self.n_experts
        return experts * self.expert_params() + self.dim * self.n_experts

    def norm_params(self) -> int:
        """Parameters of one norm layer: a scale, plus a shift for a biased LayerNorm."""
        return self.dim * (2 if self.bias and self.norm == "layernorm" else 1)

    def layer_params(self, active_only: bool = False) -> int:
        return self.attention_params() + self.mlp_params(active_only) + 2 * self.norm_params()

    def embedding_params(self) -> int:
        """Token embedding, learned positions if any, and the output projection unless tied."""
        tokens = self.vocab_size * self.dim
        positions = self.max_seq_len * self.dim if self.position == "learned" else 0
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return tokens + positions + head

    def num_params(self, active_only: bool = False) -> int:
        """Exact number of parameters (what `sum(p.numel())` gives on the built module)."""
        return self.n_layers * self.layer_params(active_only) + self.embedding_params() + self.norm_params()

    # ---- FLOP counts ------------------------------------------------------------------------------------
    def matmul_params_per_token(self) -> int:
        """Weights that each token multiplies through: the active layer matrices plus the output head."""
        q_out = self.n_heads * self.head_dim
        kv_out = self.n_kv_heads * self.head_dim
        attention = self.dim * q_out + 2 * self.dim * kv_out + q_out * self.dim
        matrices = 3 if self.mlp == "swiglu" else 2
        experts = self.experts_per_token if self.is_moe else 1
        mlp = experts * matrices * self.dim * self.ffn_dim + (self.dim * self.n_experts if self.is_moe else 0)
        return self.n_layers * (attention + mlp) + self.vocab_size * self.dim

    def attention_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs of the score (QK^T) and value (PV) products per token, full sequence counted."""
        return self.n_layers * 2 * 2 * seq_len * self.n_heads * self.head_dim

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token at a given sequence length."""
        return 2 * self.matmul_params_per_token() + self.attention_flops_per_token(seq_len)

    def train_flops_per_token(self, seq_len: int) -> int:
        """Forward plus backward FLOPs per token (3x forward; no recomputation counted)."""
        return 3 * self.forward_flops_per_token(seq_len)


def _llama(vocab: int, dim: int, layers: int, heads: int, kv: int, ffn: int, seq: int, theta: float) -> dict:
    return dict(
        vocab_size=vocab,
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        ffn_dim=ffn,
        max_seq_len=seq,
        rope_theta=theta,
    )


def _gpt(vocab: int, dim: int, layers: int, heads: int, seq: int) -> dict:
    return dict(
        vocab_size=vocab,
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=heads,
        ffn_dim=4 * dim,
        max_seq_len=seq,
        mlp="gelu",
        norm="layernorm",
        position="learned",
        bias=True,
        tie_embeddings=True,
    )


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: sized so `aiinfra train` finishes in minutes on a 2-core CPU.
    "tiny": dict(_llama(4096, 256, 4, 8, 4, 768, 256, 10000.0), tie_embeddings=True),
    # A distillation student (and edge model) for `tiny`: the same vocabulary, so it can use tiny's tokenizer.
    "micro": dict(_llama(4096, 128, 2, 4, 2, 384, 256, 10000.0), tie_embeddings=True),
    "small": _llama(8192, 512, 8, 8, 4, 1536, 512, 10000.0),
    # About 1.1B parameters: the single-GPU benchmark preset.
    "1b": _llama(32000, 2048, 22, 32, 4, 5632, 2048, 10000.0),
    # Meta's published shapes (Llama 3 Herd of Models, arXiv 2407.21783, Table 3).
    "llama3-8b": _llama(128256, 4096, 32, 32, 8, 14336, 8192, 500000.0),
    "llama3-70b": _llama(128256, 8192, 80, 64, 8, 28672, 8192, 500000.0),
    "llama3-405b": _llama(128256, 16384, 126, 128, 8, 53248, 8192, 500000.0),
    # Brown et al. 2020, Table 2.1 (GPT-2 vocabulary, 2048 context, tied embeddings).
    "gpt3-175b": _gpt(50257, 12288, 96, 96, 2048),
}


def preset(name: str, **overrides: Any) -> ModelSpec:
    """The named preset as a `ModelSpec`, with optional field overrides."""
    return ModelSpec(preset=name, **overrides)

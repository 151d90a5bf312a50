"""A decoder-only transformer, Llama-style by default (GPT-style by spec), as plain single-device PyTorch.

No ranks, no parallelism: distributed/ applies those from outside. Attention reads its head count from the
tensor shapes so that tensor-parallel sharding of the projections needs no change here. Blocks live in a
`ModuleDict` keyed by layer index so that pipeline stages can drop layers and keep parameter names.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from aiinfra.spec import ModelSpec


def rotary_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """The rotary frequencies theta^(-2i/d), i < d/2, in float64."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def rotary_tables(head_dim: int, max_seq_len: int, theta: float,
                  inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim) in the rotate-half layout (as Hugging Face Llama);
    `inv_freq` replaces the plain frequencies (a scaled RoPE)."""
    if inv_freq is None:
        inv_freq = rotary_inv_freq(head_dim, theta)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + d/2]) pair by its position's angle. x: (batch, heads, seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


InitRule = tuple[str, float]
"""('normal', std), ('ones', 0.0) or ('zeros', 0.0)."""


def parameter_seed(seed: int, name: str) -> int:
    """The seed of one parameter's initial values: the run's seed and the parameter's name, nothing of the layout."""
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % 2**63


def initial_values(
    rule: InitRule, shape: torch.Size | tuple[int, ...], seed: int, name: str, device: torch.device
) -> torch.Tensor:
    """The full fp32 initial tensor of parameter `name`: the same values for the same seed however the model is
    later split, because each parameter has a generator of its own (drawn on `device`: CPU and CUDA differ)."""
    kind, std = rule
    if kind == "ones":
        return torch.ones(shape, device=device)
    if kind == "zeros":
        return torch.zeros(shape, device=device)
    generator = torch.Generator(device=device).manual_seed(parameter_seed(seed, name))
    return torch.empty(shape, device=device).normal_(0.0, std, generator=generator)


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return nn.RMSNorm(spec.dim, eps=spec.norm_eps)
    return nn.LayerNorm(spec.dim, eps=spec.norm_eps, bias=spec.bias)


class Attention(nn.Module):
    """Causal grouped-query attention through `F.scaled_dot_product_attention`."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.head_dim = spec.head_dim
        self.wq = nn.Linear(spec.dim, spec.n_heads * spec.head_dim, bias=spec.bias)
        self.wk = nn.Linear(spec.dim, spec.n_kv_heads * spec.head_dim, bias=spec.bias)
        self.wv = nn.Linear(spec.dim, spec.n_kv_heads * spec.head_dim, bias=spec.bias)
        self.wo = nn.Linear(spec.n_heads * spec.head_dim, spec.dim, bias=spec.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            # Tables cover max_seq_len; slice here, where the full sequence is known (under sequence parallelism
            # the block's input holds only this rank's slice of it).
            cos, sin = rope[0][:seq], rope[1][:seq]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), or GELU: w2(gelu(w1 x))."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.w1 = nn.Linear(spec.dim, spec.ffn_dim, bias=spec.bias)
        self.w2 = nn.Linear(spec.ffn_dim, spec.dim, bias=spec.bias)
        self.w3 = nn.Linear(spec.dim, spec.ffn_dim, bias=spec.bias) if spec.mlp == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x), approximate="tanh"))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Token-choice top-k mixture of experts with softmax-renormalised gates over the chosen experts."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.top_k = spec.experts_per_token
        self.router = nn.Linear(spec.dim, spec.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(spec) for _ in range(spec.n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gate_logits, chosen = self.router(flat).topk(self.top_k, dim=-1)
        gates = gate_logits.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
        out = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            token_ids, slot = (chosen == index).nonzero(as_tuple=True)
            if token_ids.numel():
                out.index_add_(0, token_ids, expert(flat[token_ids]) * gates[token_ids, slot, None])
        return out.view_as(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attention_norm = make_norm(spec)
        self.attention = Attention(spec)
        self.ffn_norm = make_norm(spec)
        self.feed_forward = MoE(spec) if spec.is_moe else FeedForward(spec)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Token ids (batch, seq) -> logits (batch, seq, vocab)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab_size, spec.dim)
        self.pos_embeddings = nn.Embedding(spec.max_seq_len, spec.dim) if spec.position == "learned" else None
        self.layers = nn.ModuleDict({str(i): Block(spec) for i in range(spec.n_layers)})
        self.norm = make_norm(spec)
        self.output = nn.Linear(spec.dim, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Rotary tables are derived state: not saved, rebuilt by init_buffers (e.g. after a meta-device build).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Rebuild the derived rotary tables on the parameters' device (after a meta-device build, for instance)."""
        if self.spec.position == "rope":
            device = next(self.parameters()).device
            cos, sin = rotary_tables(self.spec.head_dim, self.spec.max_seq_len, self.spec.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def init_rules(self) -> dict[str, InitRule]:
        """How each parameter (by name) starts: Normal(0, 0.02) weights, residual output projections scaled by
        1/sqrt(2 * layers) (GPT-2), norm scales one, biases zero."""
        residual_std = 0.02 / math.sqrt(2 * self.spec.n_layers)
        rules: dict[str, InitRule] = {}
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, nn.Linear):
                is_residual_out = module_name.endswith(("attention.wo", "w2"))
                rules[prefix + "weight"] = ("normal", residual_std if is_residual_out else 0.02)
                if module.bias is not None:
                    rules[prefix + "bias"] = ("zeros", 0.0)
            elif isinstance(module, nn.Embedding):
                rules[prefix + "weight"] = ("normal", 0.02)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                if module.weight is not None:
                    rules[prefix + "weight"] = ("ones", 0.0)
                if getattr(module, "bias", None) is not None:
                    rules[prefix + "bias"] = ("zeros", 0.0)
        return rules

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initial weights (see `init_rules`), each parameter drawn from its own generator seeded by `seed` and its
        name (`initial_values`), so that any sharding of the model can reproduce them; None draws `seed` from
        torch's global generator. On the meta device only the buffers are set."""
        if next(self.parameters()).is_meta:
            self.init_buffers()
            return
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.init_buffers()
        rules = self.init_rules()
        for name, param in self.named_parameters():
            param.copy_(initial_values(rules[name], param.shape, seed, name, param.device))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        if seq > self.spec.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds max_seq_len={self.spec.max_seq_len}")
        # A pipeline stage other than the first has no embedding and receives hidden states instead of token ids;
        # a stage other than the last has no norm and output and returns hidden states (torchtitan's convention).
        x = tokens
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(tokens)
            if self.pos_embeddings is not None:
                x = x + self.pos_embeddings(torch.arange(seq, device=tokens.device))
        rope = (self.rope_cos, self.rope_sin) if self.spec.position == "rope" else None
        for block in self.layers.values():
            x = block(x, rope)
        if self.output is None:
            return x
        return self.output(self.norm(x))


def model_from_state_dict(spec: ModelSpec, state: dict[str, torch.Tensor], device: torch.device) -> Transformer:
    """A Transformer holding `state` (full tensors), built on the meta device so that no weights are drawn first."""
    with torch.device("meta"):
        model = Transformer(spec)
    model.load_state_dict(state, strict=True, assign=True)
    if spec.tie_embeddings:  # assign=True replaced the two names' shared Parameter one by one
        model.output.weight = model.tok_embeddings.weight
    model.init_buffers()  # on the state's device, so that no buffer is left on meta
    return model.to(device)

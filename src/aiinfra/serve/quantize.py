"""Int8 weight-only quantization, one scale per output channel (symmetric, absmax / 127).

Each Linear's weight is stored as int8 with a scale per output row, and the matmul runs through
`torch._weight_int8pack_mm` (the int8-weight kernel gpt-fast uses), which applies the scales without materialising
a float copy of the weight. On CPU that kernel is vectorized for bfloat16 activations only (with fp32 inputs it is
5 to 20 times slower than an fp32 matmul, measured), so activations are rounded to bfloat16 for the product and
the result is returned in the caller's dtype.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """A drop-in for nn.Linear holding int8 weights and per-output-channel scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in `model` (in place) by an Int8Linear; returns the model.

    A Linear whose weight is shared with an embedding (tied output head) stays as it is: quantizing it would add
    an int8 copy beside the float embedding instead of saving memory.
    """
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and id(child.weight) not in embedding_weights:
                setattr(module, child_name, Int8Linear(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and persistent buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + [b for _, b in model.named_buffers() if b.numel()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total

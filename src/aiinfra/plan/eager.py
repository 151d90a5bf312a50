"""What PyTorch code run eagerly (no torch.compile) moves through HBM beyond the fused kernels `step` assumes, and
FSDP2's copies around its collectives.

Eager elementwise ops. A Llama-style block written in plain PyTorch runs each operator as its own kernel, every one
reading its inputs from HBM and writing its output back. The reference RMSNorm (meta-llama/llama model.py, reused
as torchtitan's norm_type "rmsnorm", torchtitan/models/norms.py; IBM's foundation-model-stack
fms/modules/layernorm.py LayerNormParameterized does the same steps) is

    x.float()  ->  pow(2)  ->  mean(-1)  ->  x * rsqrt(. + eps)  ->  .type_as(x)  ->  * weight

six passes over the tensor, four of them in fp32, where a fused norm reads the input once and writes the output once.
The rotary embedding (torchtitan/models/llama/model.py apply_rotary_emb) upcasts q and k to fp32
(xq.float(), view_as_complex), multiplies by the complex frequencies and casts back (.type_as): three passes. The
SwiGLU product F.silu(w1(x)) * w3(x) (the same file's FeedForward) writes silu's output and reads it back for the
product. Grouped-query attention's repeat_kv (expand + reshape) copies the key and value heads out to the query width
before scaled_dot_product_attention. A GPT-style block's nn.LayerNorm and GELU are single native kernels eagerly too,
so only the RMSNorm, rotary, SwiGLU and GQA paths cost more. The backward of each eager op reads and writes about
twice what its forward did, the factor `step` already applies to elementwise work.

Which runs ran eagerly is a framework fact (`FrameworkFacts.eager_by_default`): fms-fsdp's published scripts set
--use_torch_compile=False (scripts/7b.sh) and the blog lists torch.compile as future work; torchtitan's train_configs
set compile = false and norm_type = "rmsnorm" (train_configs/llama3_8b.toml, 2024). Float8 training through torchao is
documented and benchmarked with torch.compile on (docs.pytorch.org/ao, workflows/training, float8: "With
torch.compile on, we demonstrate e2e pretraining throughput speedups"), which fuses the casts and the elementwise
ops, so an fp8 run is taken to be compiled.

FSDP2 copy-out. FSDP2 (torch.distributed._composable.fsdp, _fsdp_collectives.py foreach_all_gather_copy_out) waits
for each all-gather on the current (compute) stream and copies the gathered flat buffer out into every parameter's
own unsharded tensor (split_with_sizes_copy): one read and one write of the unit's gathered weights per gather, on the
compute stream, so it is not hidden behind the collective. FSDP1's FlatParameter is gathered in place and its
parameters are views of it (Zhao et al. 2023, PyTorch FSDP, 3.2.1), with no such copy in the forward. Those views
are torch.split pieces of the flat parameter (torch/distributed/fsdp/_flat_param.py _get_unflat_views_unaligned:
torch.split(tensor, flat_param._numels) then .view(shape)), so autograd forms the flat gradient in the backward by
concatenating the pieces' gradients (split_with_sizes' backward is a cat): one read and one write of the unit's
unsharded gradient, in the parameters' dtype, on the compute stream; where the reduction runs in another dtype
(MixedPrecision reduce_dtype float32, llm-foundry's DEFAULT), _post_backward_hook casts the unsharded flat gradient to
it first (flat_param.grad.to(reduce_dtype)), one more read and a write.

Foreach AdamW. torch.optim.AdamW with neither foreach nor fused given runs its foreach implementation on CUDA (PyTorch
torch.optim docs, "Algorithms": foreach is the default over the for-loop, fused is opt-in), which fms-fsdp
(main_training.py: optim.AdamW(..., betas, weight_decay)) and torchtitan (build_optimizers: foreach, fused False) use.
torch/optim/adamw.py _multi_tensor_adamw makes eight passes over fp32 tensors: weight decay on the parameters (read,
write), lerp of the first moment towards the gradient (3), the second moment scaled (2) and addcmul'd with the
gradient (3), its sqrt (2), divided by the bias correction (2), plus eps (2), and addcdiv into the parameters (4): 20
four-byte accesses a parameter, against the one read and write of each state a fused kernel makes.
"""

from __future__ import annotations

from aiinfra.plan.layout import Layout, TrainSettings, local_attention_widths
from aiinfra.spec import ModelSpec

FP32_BYTES = 4
FOREACH_ADAMW_ACCESSES = 20  # fp32 tensor reads and writes per parameter of _multi_tensor_adamw (see above)


def fsdp1_grad_copy_bytes(params: float, grad_bytes: float, reduce_bytes: float) -> float:
    """Bytes FSDP1's backward moves per micro-batch for `params` unsharded parameters: the cat that forms the flat
    gradient (read and write at `grad_bytes`), and its cast to the reduction dtype when that differs."""
    cast = grad_bytes + reduce_bytes if reduce_bytes != grad_bytes else 0.0
    return params * (2 * grad_bytes + cast)


def foreach_adamw_bytes_per_param() -> float:
    """Bytes the foreach AdamW step moves per fp32 parameter: 20 accesses of 4 bytes."""
    return FOREACH_ADAMW_ACCESSES * FP32_BYTES


def eager_rmsnorm_bytes(a: int) -> float:
    """Forward bytes per element of the eager RMSNorm: upcast (a + 4), pow (4 + 4), mean (4), scale (4 + 4),
    downcast (4 + a), weight (a + a)."""
    return 4 * a + 7 * FP32_BYTES


def eager_rotary_bytes(a: int) -> float:
    """Forward bytes per element of q or k under the eager complex rotary: upcast (a + 4), complex multiply
    (4 + 4), downcast (4 + a)."""
    return 2 * a + 4 * FP32_BYTES


def eager_swiglu_bytes(a: int) -> float:
    """Forward bytes per element of the MLP's inner width: silu (a + a), then the product (2a + a)."""
    return 5 * a


def eager_extra_forward_bytes(spec: ModelSpec, settings: TrainSettings, layout: Layout, m: float) -> float:
    """Bytes one layer's forward moves for m tokens beyond the fused kernels `step.layer_forward_times` counts (a
    fused norm 2a, a fused rotary 2a, a fused SwiGLU 3a per element); zero for a GPT-style block or a compiled run."""
    if not settings.eager_elementwise:
        return 0.0
    a = settings.activation_bytes
    sp_divisor = layout.tp if layout.sequence_parallel else 1
    extra = 0.0
    if spec.norm == "rmsnorm":
        norms = 2 + settings.post_norms
        extra += m * spec.dim * norms * (eager_rmsnorm_bytes(a) - 2 * a) / sp_divisor
    q_local, kv_local = local_attention_widths(spec, layout.tp)
    if spec.position == "rope":
        extra += m * (q_local + kv_local) * (eager_rotary_bytes(a) - 2 * a)
    if spec.mlp == "swiglu":
        experts = spec.experts_per_token if spec.is_moe else 1
        extra += m * spec.ffn_dim / layout.tp * experts * (eager_swiglu_bytes(a) - 3 * a)
    if kv_local < q_local:
        # repeat_kv: read the key and value heads, write them at the query width.
        extra += m * 2 * a * (kv_local + q_local)
    return extra


def fsdp_copy_out_s(weights_bytes: float, gathers: float, bandwidth_bytes_per_s: float) -> float:
    """Compute-stream time of FSDP2's copy-out: `gathers` all-gathers of `weights_bytes`, each read and written once
    more from the gathered buffer into the parameters."""
    return gathers * 2.0 * weights_bytes / bandwidth_bytes_per_s

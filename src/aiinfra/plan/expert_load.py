"""How unevenly routed tokens land on expert-parallel ranks, and what the busiest rank costs a step.

Under expert parallelism each of `ep` ranks holds E / ep whole experts and runs the grouped GEMMs over the tokens
routed to them; the step waits for the busiest rank at the combine. A trained router does not spread tokens evenly:
TensorRT-LLM's tech blog 4 ("Scaling Expert Parallelism in TensorRT-LLM", Table 1; DeepSeek-R1 on 32 GB200, EP32,
8 experts a rank, no EPLB) measures, per layer and iteration, a mean of 128 routed tokens an expert with a standard
deviation of 164.1 (a coefficient of variation of 1.28), and 1024 a rank with 491.6 (0.48), the hottest rank
receiving on average 1.564 times more than the mean. We take expert loads as independent gamma variables with that
coefficient of variation plus the Poisson noise of the step's finite token count; a rank's load is the sum of its
experts', and the busiest of `ep` such sums sets the step. This reproduces the blog's per-rank spread (0.44 against
0.48) and gives 1.17 against its 1.564 for the hottest rank (the measured loads have a heavier tail than a gamma),
so it understates the imbalance rather than overstating it.
"""

from __future__ import annotations

import math

from aiinfra.spec import ModelSpec

# Standard deviation over mean of the tokens an expert receives in one layer and step (TensorRT-LLM tech blog 4,
# Table 1, "By expert slot", no EPLB: 164.1 / 128).
EXPERT_LOAD_CV = 164.1 / 128
# The router's top-k selection of one MoE layer in a step, fused: TensorRT-LLM tech blog 3 ("Optimizing DeepSeek R1
# Throughput on NVIDIA Blackwell GPUs", Top-K Kernels Fusions) measures 15 us on B200 for the fused kernels against
# 252 us for the 18 unfused PyTorch ops "in the target setting" (a 7.4% end-to-end gain, which only a per-layer
# saving of that size can give at a throughput step of tens of ms over 58 MoE layers). A latency, not a traffic: the
# work (reading E logits a token) is small. No Hopper figure is published; we take the same.
MOE_ROUTING_S_PER_LAYER = 15e-6
# The fused-MoE module's per-copy work outside its grouped GEMMs (input expansion and quantization, activation,
# finalize reduction), as bytes of HBM traffic per routed copy per hidden element at the datasheet bandwidth.
# Source: TensorRT-LLM tech blog "MoE as Dense GEMM" (docs/source/blogs/tech_blog/blog24_MoE_as_Dense_GEMM.md,
# "Per-Rank MoE Module Latency"), CUTLASS column: one B200, NVFP4, hidden 7168, 256 experts top-8, one TP8 rank
# (expert width 2048 / 8 = 256), the module's compute latency without its AllReduces, at 1 to 384 tokens. From 64
# tokens up the 9 points fit (least squares, residuals under 4 us) latency = a + b x touched + c x copies, touched =
# 256 (1 - (1 - 8/256)^M) the experts whose weights are read and copies = 8 M: a = 111 us, b = 0.86 us an expert
# (its 3.1 MB of NVFP4 weights), c = 12.4 ns a routed copy. Over 7168 hidden elements at the B200's 8 TB/s that
# is 12.37e-9 x 8e12 / 7168 = 13.8 bytes a copy and hidden element: the kernels' own traffic (a bf16 read and an
# fp4 write in expandInputRows, FC2's bf16 write and finalizeMoeRouting's bf16 read, about 6.6 bytes at NVFP4) at
# about half of HBM bandwidth (FlashInfer PR #3761 found the expand and activation kernels unvectorized).
# The same kernels run for fp8 and bf16 experts (their traffic is 16-bit per hidden element bar the quantized
# copy), so we take the same figure on Hopper, at its own HBM bandwidth.
MOE_MODULE_BYTES_PER_COPY_ELEMENT = 12.37e-9 * 8e12 / 7168
# The same fit's intercept, a = 111 us: what one MoE layer's module costs whatever its tokens (the CUTLASS column is
# 96.8 us at a single token, whose 8 touched experts add 7 us). The module measured includes the router GEMM and the
# top-k, so the fused top-k's 15 us (`MOE_ROUTING_S_PER_LAYER`) is the part of it already counted. The perf-overview
# rows ran this backend (MoeConfig.backend defaulted to CUTLASS until TensorRT-LLM PR #11074); the blog does not say
# whether its timing ran under CUDA graphs, and Hopper is taken to run the same kernels (no Hopper figure).
MOE_MODULE_FIXED_S_PER_LAYER = 111e-6 - MOE_ROUTING_S_PER_LAYER


def gamma_cdf(shape: float, x: float) -> float:
    """The regularized lower incomplete gamma function P(shape, x): the CDF of a unit-scale gamma variable."""
    if x <= 0:
        return 0.0
    log_prefix = shape * math.log(x) - x - math.lgamma(shape)
    if x < shape + 1:  # series (Numerical Recipes 6.2.5)
        term = total = 1.0 / shape
        for n in range(1, 1000):
            term *= x / (shape + n)
            total += term
            if term < total * 1e-12:
                break
        return min(1.0, total * math.exp(log_prefix))
    # continued fraction for the upper tail (modified Lentz, Numerical Recipes 6.2.7)
    tiny = 1e-300
    b = x + 1 - shape
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - shape)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-12:
            break
    return max(0.0, 1.0 - math.exp(log_prefix) * h)


def expected_max_over_mean(count: int, shape: float, steps: int = 400) -> float:
    """E[max of `count` independent gamma variables of shape `shape`] over their mean: the integral of
    1 - F(y)^count over y >= 0 for the gamma of mean 1 (Simpson's rule up to where F is 1 to double precision)."""
    if count <= 1:
        return 1.0
    top = 1.0 + (12.0 + 4.0 * math.log(count)) / math.sqrt(shape) + 40.0 / shape
    width = top / steps
    total = 0.0
    for i in range(steps + 1):
        y = i * width
        weight = 1 if i in (0, steps) else (4 if i % 2 else 2)
        total += weight * (1.0 - gamma_cdf(shape, shape * y) ** count)
    return total * width / 3


def busiest_rank_load(routed_experts: int, ep: int, routed_copies: float, cv: float = EXPERT_LOAD_CV) -> float:
    """Routed copies the busiest of `ep` expert-parallel ranks receives over the mean rank's (1 when ep is 1).

    Each expert's load in a step has mean lam = copies / E and variance lam + (cv lam)^2 (Poisson arrivals around
    a popularity that varies by expert with coefficient of variation cv), a gamma of shape 1 / (1 / lam + cv^2); a
    rank sums E / ep of them (shape times E / ep), and the busiest is the largest of ep such sums.
    """
    if ep <= 1 or routed_copies <= 0:
        return 1.0
    per_expert = routed_copies / routed_experts
    shape = (routed_experts / ep) / (1.0 / per_expert + cv * cv)
    return expected_max_over_mean(ep, shape)


def touched_experts(spec: ModelSpec, tokens: float) -> float:
    """Experts whose weights a step reads: E (1 - (1 - k/E)^tokens), the expected number any token routes to under
    uniform routing (all of them at serving batch sizes, only k for a single token)."""
    experts, top_k = spec.n_experts, spec.experts_per_token
    return experts * (1 - (1 - top_k / experts) ** max(tokens, 1.0))


def expert_rows(spec: ModelSpec, tokens: float) -> float:
    """Rows of each touched expert's GEMM in a step of `tokens`: the tokens' k routed copies over the experts they
    touch (k / k = 1 for a single token, tokens x k / E once every expert is touched)."""
    return tokens * spec.experts_per_token / touched_experts(spec, tokens)

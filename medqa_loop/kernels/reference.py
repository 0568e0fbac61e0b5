"""The eager reference maths of every small kernel of the fast path: what the CPU runs, what
``medqa_loop.kernels.triton_ops`` computes on CUDA, and what the kernel tests compare against.
Each function has the signature of its Triton twin; ``medqa_loop.kernels.ops`` picks one.

**LoRA's dropout as a hash.** PEFT draws a Bernoulli mask per call and keeps the dropped copy of
the input for backward (one full-width tensor per projection). Here the keep mask is a pure
function of (seed, element index), recomputed wherever it is needed, inside the pass that reads
the input or writes its gradient (forward: ``dropped_linear`` is lora_A's matmul on the dropped x;
backward: ``dropped_grad`` is A's gradient, reading x and masking it again, and
``dropped_product`` is x's gradient's LoRA part, masked as it is written), so no mask or dropped
copy is ever stored or drawn; on CUDA, with 16-bit inputs, not even written: the matmuls mask x
as they load it. Each element is kept with probability 1 - p, independently, as with
``torch.nn.Dropout``; the 1/(1-p) rescaling is left to the caller (LoraLinear applies it to
r-wide tensors).

The hash is the two-multiply 32-bit finalizer "[16 21f0aaad 15 735a2d97 15]" of Wellons' hash
prospector (avalanche close to murmur3's), over ((index ^ lo) + hi) mod 2**32 with a 62-bit seed
split in two 31-bit keys (lo, hi). Here it is computed in int64 with every product below 2**63 (the
multipliers are below 2**31) and masked back to 32 bits; the Triton kernels compute it in
wrapping uint32: the same bits, checked by a test.

**int8 dequantization.** W = CB * SCB/127 in the activation dtype, computed in at least fp32 and
rounded once, as bitsandbytes dequantizes. ``merged_weight`` adds LoRA's scale * B A before
that one rounding: the weight a forward without backward multiplies by (autograd._project).

**The loss head** over the target positions: ``cross_entropy_rows``, each row's cross-entropy
in fp32 and its weighted gradient written over its logits (what the Triton kernel does, and what
``autograd.LinearCrossEntropySum`` runs on the CPU); ``linear_cross_entropy_sum``, the same sum
written plainly, with autograd's own backward, for the tests.

**RMSNorm and SwiGLU**, forward and backward, in fp32 inside (fp64 stays fp64: the gradient
checks run in it), rounding once to the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_M32 = 0xFFFF_FFFF
_M31 = 0x7FFF_FFFF


def f32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# -- dropout ------------------------------------------------------------------------------------


def _hash32(h: torch.Tensor) -> torch.Tensor:
    h = ((h ^ (h >> 16)) * 0x21F0AAAD) & _M32
    h = ((h ^ (h >> 15)) * 0x735A2D97) & _M32
    return h ^ (h >> 15)


def dropout_args(p: float, seed: int | torch.Tensor, numel: int) -> tuple[torch.Tensor, int]:
    """(seed, threshold): the 62-bit seed as a 0-d int64 tensor (the fast path's seeds already are
    one, on the device: ``kernels.seeds``), and the threshold on the hash's top 31 bits below
    which an element is dropped (kept with probability 1 - p). The kernels split the seed into
    its two 31-bit keys themselves, so a replayed CUDA graph reads each replay's seed."""
    if numel > 2**32:
        raise ValueError(f"dropout over {numel} elements: the 32-bit hash index would repeat")
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(seed, dtype=torch.int64)
    return seed, round(p * 2**31)


def _keep(x: torch.Tensor, seed: torch.Tensor, threshold: int) -> torch.Tensor:
    seed = seed.to(x.device)
    lo, hi = seed & _M31, (seed >> 31) & _M31
    index = torch.arange(x.numel(), device=x.device).view(x.shape)
    return (_hash32(((index ^ lo) + hi) & _M32) >> 1) >= threshold


def keep_mask(x: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """The keep mask over x's shape (bool; x's values are not read) for a rate p and a seed."""
    return _keep(x, *dropout_args(p, seed, x.numel()))


def dropped(x: torch.Tensor, seed: torch.Tensor, threshold: int) -> torch.Tensor:
    """x with the dropped elements zeroed (elements indexed in x's row-major order, whatever its
    strides)."""
    return x * _keep(x, seed, threshold)


def dropped_linear(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """scale * dropped(x) a^T in x's dtype, for x [rows, cols] and a [rank, cols] (cast to x's
    dtype): LoRA's A side with dropout."""
    return F.linear(dropped(x, seed, threshold), a.to(x.dtype)).mul_(scale)


def dropped_grad(g: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, threshold: int) -> torch.Tensor:
    """g^T dropped(x), in at least fp32, for g [rows, rank] and x [rows, cols]: A's gradient."""
    return (g.t() @ dropped(x, seed, threshold)).to(torch.promote_types(x.dtype, torch.float32))


def dropped_product(g: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, threshold: int) -> torch.Tensor:
    """dropped(g a) in g's dtype, for g [rows, rank] and a [rank, cols] (cast to g's dtype): the
    LoRA part of x's gradient, zero where the forward dropped x (the mask over [rows, cols], x's
    shape)."""
    return dropped(g @ a.to(g.dtype), seed, threshold)


# -- int8 dequantization ------------------------------------------------------------------------


def dequantize(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = CB * SCB/127 in ``dtype`` for bitsandbytes' row-wise int8 weight CB [out, in] and its
    row scales SCB [out]."""
    wide = torch.promote_types(dtype, torch.float32)
    return (cb.to(wide) * (scb * (1 / 127.0)).to(wide)[:, None]).to(dtype)


def merged_weight(w: torch.Tensor, scb: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  scale: float, dtype: torch.dtype) -> torch.Tensor:
    """W + scale * B A in ``dtype``, summed in fp32 (or wider) and rounded once: the frozen weight
    with its LoRA folded in, W given as bitsandbytes' int8 CB with row scales ``scb``, or as
    itself (``scb`` None)."""
    wide = torch.promote_types(dtype, torch.float32)
    base = w.to(wide) if scb is None else dequantize(w, scb, wide)
    return torch.addmm(base, lora_b.to(wide), lora_a.to(wide), alpha=scale).to(dtype)


# -- RMSNorm and SwiGLU -------------------------------------------------------------------------


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * x / rms(x), 1/rms(x)): normalised in fp32 like transformers' RMSNorm."""
    rstd = torch.rsqrt(f32(x).pow(2).mean(-1, keepdim=True) + eps)
    return weight * (f32(x) * rstd).to(x.dtype), rstd


def rmsnorm_backward(x, weight, rstd, grad_y) -> torch.Tensor:
    x_hat = f32(x) * rstd
    dy = f32(grad_y) * f32(weight)
    return (rstd * (dy - x_hat * (dy * x_hat).mean(-1, keepdim=True))).to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Mistral's SwiGLU)."""
    return F.silu(f32(gate)).to(gate.dtype) * up


def silu_mul_backward(gate, up, grad_h) -> tuple[torch.Tensor, torch.Tensor]:
    g, grad_f = f32(gate), f32(grad_h)
    sig = torch.sigmoid(g)
    grad_gate = grad_f * f32(up) * sig * (1 + g * (1 - sig))
    return grad_gate.to(gate.dtype), (grad_f * g * sig).to(up.dtype)


# -- the loss head ------------------------------------------------------------------------------


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, grad: bool) -> torch.Tensor:
    """Per-row cross-entropy (fp32) of ``logits`` [rows, vocab] against ``targets``; with ``grad``,
    ``logits`` is overwritten by d(weights[i] * loss[i]) / d logits[i] = weights[i] * (softmax - onehot)."""
    x = f32(logits)
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, targets[:, None]).squeeze(1)
    if grad:
        g = torch.exp(x - lse[:, None])
        g[torch.arange(g.size(0), device=g.device), targets] -= 1.0
        logits.copy_(g * f32(weights)[:, None])
    return loss


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """sum_i weights[i] * cross_entropy(hidden[i] @ weight.T, targets[i]), logits in fp32 and
    autograd's own backward: what ``autograd.LinearCrossEntropySum`` computes, written plainly."""
    logits = f32(hidden @ weight.T)
    return (F.cross_entropy(logits, targets, reduction="none") * weights.to(logits.dtype)).sum()

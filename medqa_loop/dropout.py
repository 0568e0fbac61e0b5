"""LoRA's dropout as a hash: the keep mask is a pure function of (seed, element index).

PEFT draws a Bernoulli mask per call and keeps the dropped copy of the input for backward (one
full-width tensor per projection). Here the mask is recomputed wherever it is needed, inside
the pass that reads the input or writes its gradient (forward: ``dropped_linear`` is lora_A's
matmul on the dropped x; backward: ``dropped_grad`` is A's gradient, reading x and masking it
again, and ``dropped_product`` is x's gradient's LoRA part, masked as it is written), so no mask
or dropped copy is ever stored or drawn; on CUDA, with 16-bit inputs, not even written: the
matmuls mask x as they load it. Each element is kept with probability 1 - p, independently, as
with ``torch.nn.Dropout``; the 1/(1-p) rescaling is left to the caller (LoraLinear applies it
to r-wide tensors).

The hash is the two-multiply 32-bit finalizer "[16 21f0aaad 15 735a2d97 15]" of Wellons' hash
prospector (avalanche close to murmur3's), over ((index ^ lo) + hi) mod 2**32 with a 62-bit
seed split in two 31-bit keys. The reference below computes it in int64 with every product
below 2**63 (the multipliers are below 2**31) and masked back to 32 bits; the CUDA kernels
(medqa_loop.triton_kernels) compute it in wrapping uint32: the same bits, checked by a test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medqa_loop.gpu import triton_ops

_M32 = 0xFFFF_FFFF
_M31 = 0x7FFF_FFFF


def _hash32(h: torch.Tensor) -> torch.Tensor:
    h = ((h ^ (h >> 16)) * 0x21F0AAAD) & _M32
    h = ((h ^ (h >> 15)) * 0x735A2D97) & _M32
    return h ^ (h >> 15)


def dropout_args(p: float, seed: int, numel: int) -> tuple[int, int, int]:
    """(low key, high key, threshold): the seed's two 31-bit halves, and the threshold on the
    hash's top 31 bits below which an element is dropped (kept with probability 1 - p)."""
    if numel > 2**32:
        raise ValueError(f"dropout over {numel} elements: the 32-bit hash index would repeat")
    return seed & _M31, (seed >> 31) & _M31, round(p * 2**31)


def _keep(x: torch.Tensor, lo: int, hi: int, threshold: int) -> torch.Tensor:
    index = torch.arange(x.numel(), device=x.device).view(x.shape)
    return (_hash32(((index ^ lo) + hi) & _M32) >> 1) >= threshold


def keep_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The keep mask over x's shape (bool; x's values are not read) for a rate p and a seed."""
    return _keep(x, *dropout_args(p, seed, x.numel()))


def dropped(x: torch.Tensor, drop: tuple[int, int, int]) -> torch.Tensor:
    """x with the dropped elements zeroed (elements indexed in x's row-major order, whatever
    its strides); ``drop`` = dropout_args."""
    if (gpu := triton_ops(x)) is not None:
        return gpu.dropped(x, *drop)
    return x * _keep(x, *drop)


def _gpu_16bit(x: torch.Tensor):
    return triton_ops(x) if x.dtype in (torch.bfloat16, torch.float16) else None


def dropped_linear(x: torch.Tensor, a: torch.Tensor, drop: tuple[int, int, int], scale: float) -> torch.Tensor:
    """scale * dropped(x) a^T in x's dtype, for x [rows, cols] and a [rank, cols] (cast to x's
    dtype): LoRA's A side with dropout."""
    if (gpu := _gpu_16bit(x)) is not None:
        return gpu.dropped_linear(x, a, *drop, scale)
    return F.linear(dropped(x, drop), a.to(x.dtype)).mul_(scale)


def dropped_grad(g: torch.Tensor, x: torch.Tensor, drop: tuple[int, int, int]) -> torch.Tensor:
    """g^T dropped(x), in at least fp32, for g [rows, rank] and x [rows, cols]: A's gradient."""
    if (gpu := _gpu_16bit(x)) is not None:
        return gpu.dropped_grad(g, x, *drop)
    return (g.t() @ dropped(x, drop)).to(torch.promote_types(x.dtype, torch.float32))


def dropped_product(g: torch.Tensor, a: torch.Tensor, drop: tuple[int, int, int]) -> torch.Tensor:
    """dropped(g a) in g's dtype, for g [rows, rank] and a [rank, cols] (cast to g's dtype): the
    LoRA part of x's gradient, zero where the forward dropped x (the mask of ``drop`` over
    [rows, cols], x's shape)."""
    if (gpu := _gpu_16bit(g)) is not None:
        return gpu.dropped_product(g, a, *drop)
    return dropped(g @ a.to(g.dtype), drop)

"""Triton kernels for the two elementwise passes every LoRA linear makes per call (imported on
CUDA only: Triton ships with CUDA builds of torch). Each computes exactly what its eager
reference computes (medqa_loop.dropout, medqa_loop.quant); a CUDA test checks them bit for bit.

* ``dropped`` / ``plus_dropped``: dropout's keep mask hashed from (seed, index) in 32-bit
  unsigned arithmetic (the reference's int64-and-mask maths gives the same bits), applied as the
  input is read.
* ``dequantize``: W = CB * SCB/127, one pass over the int8 weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _keep(index, lo, hi, threshold):
    # uint32 wraps like the reference's "& 0xFFFFFFFF"; unsigned shifts are logical.
    h = (index.to(tl.uint32) ^ lo.to(tl.uint32)) + hi.to(tl.uint32)
    h = (h ^ (h >> 16)) * 0x21F0AAAD
    h = (h ^ (h >> 15)) * 0x735A2D97
    h = h ^ (h >> 15)
    return (h >> 1).to(tl.int64) >= threshold


# The keys and threshold change every call: not specializing on their values keeps one
# compiled kernel (they stay below 2**31, so their type does not change either).
@triton.jit(do_not_specialize=["lo", "hi", "threshold"])
def _dropped_kernel(x_ptr, out_ptr, n, lo, hi, threshold, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    x = tl.load(x_ptr + index, mask=inside)
    tl.store(out_ptr + index, x * _keep(index, lo, hi, threshold).to(x.dtype), mask=inside)


@triton.jit(do_not_specialize=["lo", "hi", "threshold"])
def _plus_dropped_kernel(base_ptr, y_ptr, out_ptr, n, lo, hi, threshold, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    y = tl.load(y_ptr + index, mask=inside)
    base = tl.load(base_ptr + index, mask=inside)
    tl.store(out_ptr + index, base + y * _keep(index, lo, hi, threshold).to(y.dtype), mask=inside)


@triton.jit
def _dequantize_kernel(cb_ptr, scb_ptr, out_ptr, rows, cols, BM: tl.constexpr, BN: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    c = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    inside = (r < rows)[:, None] & (c < cols)[None, :]
    at = r[:, None] * cols + c[None, :]
    q = tl.load(cb_ptr + at, mask=inside).to(tl.float32)
    scale = tl.load(scb_ptr + r, mask=r < rows) * (1 / 127.0)
    tl.store(out_ptr + at, (q * scale[:, None]).to(out_ptr.dtype.element_ty), mask=inside)


def dropped(x: torch.Tensor, lo: int, hi: int, threshold: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _dropped_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, out, x.numel(), lo, hi, threshold, BLOCK=_BLOCK)
    return out


def plus_dropped(base: torch.Tensor, y: torch.Tensor, lo: int, hi: int, threshold: int) -> torch.Tensor:
    base, y = base.contiguous(), y.contiguous()
    out = torch.empty_like(y)
    _plus_dropped_kernel[(triton.cdiv(y.numel(), _BLOCK),)](
        base, y, out, y.numel(), lo, hi, threshold, BLOCK=_BLOCK
    )
    return out


def dequantize(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cb = cb.contiguous()
    rows, cols = cb.shape
    out = torch.empty(rows, cols, dtype=dtype, device=cb.device)
    grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 256))
    _dequantize_kernel[grid](cb, scb.float().contiguous(), out, rows, cols, BM=16, BN=256)
    return out

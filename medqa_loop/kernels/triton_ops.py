"""Triton kernels for the small passes of a step (imported on CUDA only: Triton ships with CUDA
builds of torch). Each has the signature of, and computes what, its eager reference in
``medqa_loop.kernels.reference`` computes (``medqa_loop.kernels.ops`` picks one); CUDA tests
check them.

* ``dropped``: dropout's keep mask hashed from (seed, index) in 32-bit
  unsigned arithmetic (the reference's int64-and-mask maths gives the same bits), applied as the
  input is read; the same bits as the reference.
* ``dropped_linear`` / ``dropped_grad`` / ``dropped_product``: LoRA's A side with dropout inside
  the matmul: the masked input is never written (forward: scale * dropped(x) A^T; backward:
  A's gradient g^T dropped(x), fp32, and x's gradient's LoRA part dropped(g A), masked as it is
  written); within a rounding of the reference (fp32 accumulation in another order,
  one rounding instead of two).
* ``dequantize``: W = CB * SCB/127, one pass over the int8 weight; the same bits as the reference.
  ``merged_weight``: the same pass plus scale * B A (a rank-wide tf32 dot a tile, fp32 for an
  fp32 output); within a rounding of the reference.
* ``rotary``: the rotary position embedding of q or k ([batch, heads, tokens, head_dim] over
  [batch, tokens, heads, head_dim] memory, as the attention's projections leave them), forward
  or backward, one program per token, fp32 inside. Reference: transformers'
  apply_rotary_pos_emb; within a rounding (it rounds each product and the sum).
* ``cross_entropy_rows``: the loss head's cross-entropy, one program per row, fp32 inside,
  the row's gradient written over its logits; within a rounding of the reference.
* ``rmsnorm`` / ``rmsnorm_backward``: one program per token (row), fp32 inside.
  ``silu_mul`` / ``silu_mul_backward``: SwiGLU, fp32 inside; within a rounding of
  the output dtype of the reference (the row sums add in another order).

All of them are launched with plain Python calls, a small fraction of the CPU time a
torch.compile'd call costs (~0.1 ms), which matters at ~2,000 calls a window.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _seed_keys(seed_ptr):
    # The seed's two 31-bit halves (reference.dropout_args), read from the device: the seed of a
    # replayed CUDA graph changes between replays, a kernel argument could not.
    seed = tl.load(seed_ptr)
    return seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF


@triton.jit
def _keep(index, lo, hi, threshold):
    # uint32 wraps like the reference's "& 0xFFFFFFFF"; unsigned shifts are logical.
    h = (index.to(tl.uint32) ^ lo.to(tl.uint32)) + hi.to(tl.uint32)
    h = (h ^ (h >> 16)) * 0x21F0AAAD
    h = (h ^ (h >> 15)) * 0x735A2D97
    h = h ^ (h >> 15)
    return (h >> 1).to(tl.int64) >= threshold


# The threshold is not specialized on (one compiled kernel whatever the dropout rate).
@triton.jit(do_not_specialize=["threshold"])
def _dropped_kernel(x_ptr, out_ptr, n, seed_ptr, threshold, BLOCK: tl.constexpr):
    lo, hi = _seed_keys(seed_ptr)
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    x = tl.load(x_ptr + index, mask=inside)
    tl.store(out_ptr + index, x * _keep(index, lo, hi, threshold).to(x.dtype), mask=inside)


# The token count changes every window: Triton would compile again whenever it changes class
# (divisible by 16 or not), mid-run, so it is not specialized on either. The tile shape is
# timed once per (width, rank) on the first call (the kernel only writes its output: safe to rerun).
@triton.autotune(
    configs=[
        triton.Config({"BM": bm, "BK": bk}, num_warps=w, num_stages=st)
        for bm, bk, w, st in ((32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (32, 256, 4, 2))
    ],
    key=["cols", "rank"],
)
@triton.jit(do_not_specialize=["rows", "threshold"])
def _dropped_linear_kernel(x_ptr, a_ptr, out_ptr, rows, cols, rank, seed_ptr, threshold, scale,
                           R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    # out[rows, rank] = scale * (keep * x)[rows, cols] @ a[rank, cols]^T, fp32 accumulation;
    # R = rank padded to a power of two >= 16 (tl.dot's minimum), the padding masked off.
    lo, hi = _seed_keys(seed_ptr)
    m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    r = tl.arange(0, R)
    acc = tl.zeros((BM, R), dtype=tl.float32)
    for k0 in range(0, cols, BK):
        k = k0 + tl.arange(0, BK)
        at = m[:, None] * cols + k[None, :]
        x = tl.load(x_ptr + at, mask=(m < rows)[:, None] & (k < cols)[None, :], other=0.0)
        x = x * _keep(at, lo, hi, threshold).to(x.dtype)
        a = tl.load(a_ptr + r[None, :] * cols + k[:, None], mask=(r < rank)[None, :] & (k < cols)[:, None], other=0.0)
        acc += tl.dot(x, a.to(x.dtype))
    out = (acc * scale).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + m[:, None] * rank + r[None, :], out, mask=(m < rows)[:, None] & (r < rank)[None, :])


@triton.jit(do_not_specialize=["rows", "threshold"])
def _dropped_grad_kernel(g_ptr, x_ptr, out_ptr, rows, cols, rank, rows_per_split, seed_ptr, threshold,
                         R: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    # out[split, rank, cols] (fp32) = g[rows of the split, rank]^T @ (keep * x)[rows of the split, cols]:
    # A's gradient, its sum over tokens split so that there are enough programs to fill the GPU.
    lo, hi = _seed_keys(seed_ptr)
    n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    split = tl.program_id(1).to(tl.int64)
    r = tl.arange(0, R)
    acc = tl.zeros((R, BN), dtype=tl.float32)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, rows)
    for t0 in range(start, end, BT):
        t = t0 + tl.arange(0, BT)
        g = tl.load(g_ptr + t[None, :] * rank + r[:, None], mask=(t < end)[None, :] & (r < rank)[:, None], other=0.0)
        at = t[:, None] * cols + n[None, :]
        x = tl.load(x_ptr + at, mask=(t < end)[:, None] & (n < cols)[None, :], other=0.0)
        x = x * _keep(at, lo, hi, threshold).to(x.dtype)
        acc += tl.dot(g.to(x.dtype), x)
    at = split * rank * cols + r[:, None] * cols + n[None, :]
    tl.store(out_ptr + at, acc, mask=(r < rank)[:, None] & (n < cols)[None, :])


@triton.jit(do_not_specialize=["rows", "threshold"])
def _dropped_product_kernel(g_ptr, a_ptr, out_ptr, rows, cols, rank, seed_ptr, threshold,
                            R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # out[rows, cols] = keep * (g[rows, rank] @ a[rank, cols]): one rank-wide dot per tile, so
    # the pass is the write of out alone.
    lo, hi = _seed_keys(seed_ptr)
    m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    n = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    r = tl.arange(0, R)
    g = tl.load(g_ptr + m[:, None] * rank + r[None, :], mask=(m < rows)[:, None] & (r < rank)[None, :], other=0.0)
    a = tl.load(a_ptr + r[:, None] * cols + n[None, :], mask=(r < rank)[:, None] & (n < cols)[None, :], other=0.0)
    out = tl.dot(g, a.to(g.dtype)).to(out_ptr.dtype.element_ty)
    at = m[:, None] * cols + n[None, :]
    tl.store(out_ptr + at, out * _keep(at, lo, hi, threshold).to(out.dtype),
             mask=(m < rows)[:, None] & (n < cols)[None, :])


@triton.jit
def _dequantize_kernel(cb_ptr, scb_ptr, out_ptr, rows, cols, BM: tl.constexpr, BN: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    c = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    inside = (r < rows)[:, None] & (c < cols)[None, :]
    at = r[:, None] * cols + c[None, :]
    q = tl.load(cb_ptr + at, mask=inside).to(tl.float32)
    scale = tl.load(scb_ptr + r, mask=r < rows) * (1 / 127.0)
    tl.store(out_ptr + at, (q * scale[:, None]).to(out_ptr.dtype.element_ty), mask=inside)


# The tile is timed once per weight shape (the kernel only writes its output: safe to rerun).
@triton.autotune(
    configs=[triton.Config({"BM": bm, "BN": bn}, num_warps=w)
             for bm, bn, w in ((16, 256, 4), (16, 512, 4), (32, 256, 4), (16, 1024, 4), (32, 512, 8))],
    key=["rows", "cols"],
)
@triton.jit
def _merged_weight_kernel(cb_ptr, scb_ptr, b_ptr, a_ptr, out_ptr, rows, cols, rank, scale,
                          R: tl.constexpr, PRECISE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # out = CB * SCB/127 + scale * B[rows, rank] @ A[rank, cols], fp32 inside, rounded once: the
    # pass over the int8 weight dequantize makes, plus a rank-wide dot per tile. The fp32 A and B
    # multiply as tf32 on the tensor cores (10 mantissa bits, more than the 16-bit output keeps;
    # LoRA's own matmuls round A and B to 16 bits), or in full fp32 for an fp32 output (PRECISE),
    # which is several times slower.
    r = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    c = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    k = tl.arange(0, R)
    inside = (r < rows)[:, None] & (c < cols)[None, :]
    at = r[:, None] * cols + c[None, :]
    q = tl.load(cb_ptr + at, mask=inside).to(tl.float32)
    w = q * (tl.load(scb_ptr + r, mask=r < rows) * (1 / 127.0))[:, None]
    b = tl.load(b_ptr + r[:, None] * rank + k[None, :], mask=(r < rows)[:, None] & (k < rank)[None, :], other=0.0)
    a = tl.load(a_ptr + k[:, None] * cols + c[None, :], mask=(k < rank)[:, None] & (c < cols)[None, :], other=0.0)
    if PRECISE:
        w += scale * tl.dot(b, a, input_precision="ieee")
    else:
        w += scale * tl.dot(b, a, input_precision="tf32")
    tl.store(out_ptr + at, w.to(out_ptr.dtype.element_ty), mask=inside)


def dropped(x: torch.Tensor, seed: torch.Tensor, threshold: int) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _dropped_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, out, x.numel(), seed, threshold, BLOCK=_BLOCK)
    return out


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def dropped_linear(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    x = x.contiguous()
    rows, cols = x.shape
    rank = a.size(0)
    out = torch.empty(rows, rank, dtype=x.dtype, device=x.device)
    _dropped_linear_kernel[lambda meta: (triton.cdiv(rows, meta["BM"]),)](
        x, a.contiguous(), out, rows, cols, rank, seed, threshold, scale, R=_rank_block(rank)
    )
    return out


def dropped_grad(g: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, threshold: int) -> torch.Tensor:
    g, x = g.contiguous(), x.contiguous()
    rows, cols = x.shape
    rank = g.size(1)
    tiles = triton.cdiv(cols, 128)
    splits = max(1, min(triton.cdiv(4 * _sm_count(x.device), tiles), triton.cdiv(rows, 64)))  # ~4 programs an SM
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), 64) * 64
    splits = triton.cdiv(rows, rows_per_split)
    partial = torch.empty(splits, rank, cols, dtype=torch.float32, device=x.device)
    _dropped_grad_kernel[(tiles, splits)](
        g, x, partial, rows, cols, rank, rows_per_split, seed, threshold, R=_rank_block(rank), BT=64, BN=128
    )
    return partial.sum(0)


def dropped_product(g: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, threshold: int) -> torch.Tensor:
    g, a = g.contiguous(), a.contiguous()
    rows, rank = g.shape
    cols = a.size(1)
    out = torch.empty(rows, cols, dtype=g.dtype, device=g.device)
    _dropped_product_kernel[(triton.cdiv(rows, 64), triton.cdiv(cols, 128))](
        g, a, out, rows, cols, rank, seed, threshold, R=_rank_block(rank), BM=64, BN=128
    )
    return out


def dequantize(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cb = cb.contiguous()
    rows, cols = cb.shape
    out = torch.empty(rows, cols, dtype=dtype, device=cb.device)
    grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 256))
    _dequantize_kernel[grid](cb, scb.float().contiguous(), out, rows, cols, BM=16, BN=256)
    return out


def merged_weight(cb: torch.Tensor, scb: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  scale: float, dtype: torch.dtype) -> torch.Tensor:
    cb = cb.contiguous()
    rows, cols = cb.shape
    rank = lora_a.size(0)
    out = torch.empty(rows, cols, dtype=dtype, device=cb.device)
    _merged_weight_kernel[lambda meta: (triton.cdiv(rows, meta["BM"]), triton.cdiv(cols, meta["BN"]))](
        cb, scb.float().contiguous(), lora_b.float().contiguous(), lora_a.float().contiguous(), out,
        rows, cols, rank, scale, R=_rank_block(rank), PRECISE=dtype == torch.float32,
    )
    return out


# -- RMSNorm and SwiGLU ----------------------------------------------


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    inside = c < cols
    x = tl.load(x_ptr + row * cols + c, mask=inside, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / cols + eps)
    w = tl.load(w_ptr + c, mask=inside)
    # weight * normalised x, the latter rounded to the input dtype first (transformers' order)
    y = w * (x * rstd).to(x_ptr.dtype.element_ty)
    tl.store(y_ptr + row * cols + c, y.to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_backward_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    inside = c < cols
    rstd = tl.load(rstd_ptr + row)
    x_hat = tl.load(x_ptr + row * cols + c, mask=inside, other=0.0).to(tl.float32) * rstd
    dy = tl.load(dy_ptr + row * cols + c, mask=inside, other=0.0).to(tl.float32)
    dy = dy * tl.load(w_ptr + c, mask=inside, other=0.0).to(tl.float32)
    dx = rstd * (dy - x_hat * (tl.sum(dy * x_hat, axis=0) / cols))
    tl.store(dx_ptr + row * cols + c, dx.to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, h_ptr, n, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    g = tl.load(gate_ptr + index, mask=inside).to(tl.float32)
    up = tl.load(up_ptr + index, mask=inside)
    # silu(gate) rounded to the input dtype, then the product in it (the reference's order)
    h = (g * tl.sigmoid(g)).to(up.dtype) * up
    tl.store(h_ptr + index, h, mask=inside)


@triton.jit
def _silu_mul_backward_kernel(gate_ptr, up_ptr, dh_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    g = tl.load(gate_ptr + index, mask=inside).to(tl.float32)
    up = tl.load(up_ptr + index, mask=inside).to(tl.float32)
    dh = tl.load(dh_ptr + index, mask=inside).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(dgate_ptr + index, (dh * up * sig * (1 + g * (1 - sig))).to(dgate_ptr.dtype.element_ty), mask=inside)
    tl.store(dup_ptr + index, (dh * g * sig).to(dup_ptr.dtype.element_ty), mask=inside)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1, x.size(-1))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = _rows(x)
    rows, cols = x2.shape
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    _rmsnorm_kernel[(rows,)](x2, weight.contiguous(), y, rstd, cols, eps, BLOCK=triton.next_power_of_2(cols))
    return y, rstd


def rmsnorm_backward(x, weight, rstd, grad_y) -> torch.Tensor:
    x2 = _rows(x)
    rows, cols = x2.shape
    dx = torch.empty_like(x)
    _rmsnorm_backward_kernel[(rows,)](
        x2, weight.contiguous(), rstd.contiguous(), _rows(grad_y), dx, cols, BLOCK=triton.next_power_of_2(cols)
    )
    return dx


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    h = torch.empty_like(up)
    _silu_mul_kernel[(triton.cdiv(up.numel(), _BLOCK),)](gate, up, h, up.numel(), BLOCK=_BLOCK)
    return h


def silu_mul_backward(gate, up, grad_h) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up, grad_h = gate.contiguous(), up.contiguous(), grad_h.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    _silu_mul_backward_kernel[(triton.cdiv(up.numel(), _BLOCK),)](
        gate, up, grad_h, grad_gate, grad_up, up.numel(), BLOCK=_BLOCK
    )
    return grad_gate, grad_up


# -- rotary position embedding -------------------------------------------------------------------


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, HALF: tl.constexpr, BH: tl.constexpr,
                   BACKWARD: tl.constexpr):
    # out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; its transpose (backward):
    # grad * cos + [g2 * sin2, -g1 * sin1] (Mistral's two halves of cos and sin are equal, not assumed).
    token = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BH)
    d = tl.arange(0, HALF)
    inside = (h < heads)[:, None]
    at = token * heads * 2 * HALF + h[:, None] * 2 * HALF + d[None, :]
    x1 = tl.load(x_ptr + at, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + at + HALF, mask=inside, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + token * 2 * HALF + d).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + token * 2 * HALF + HALF + d).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + token * 2 * HALF + d).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + token * 2 * HALF + HALF + d).to(tl.float32)[None, :]
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(out_ptr + at, o1.to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(out_ptr + at + HALF, o2.to(out_ptr.dtype.element_ty), mask=inside)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """x: [batch, heads, tokens, head_dim] with [batch, tokens, heads, head_dim] memory (the
    caller checks); cos, sin: [batch, tokens, head_dim]. The result has x's layout."""
    batch, heads, tokens, dim = x.shape
    out = torch.empty_like(x)  # keeps x's strides
    _rotary_kernel[(batch * tokens,)](
        x, cos.contiguous(), sin.contiguous(), out, heads,
        HALF=dim // 2, BH=triton.next_power_of_2(heads), BACKWARD=backward,
    )
    return out


# -- the loss head's cross-entropy -------------------------------------------------------------


@triton.jit
def _cross_entropy_kernel(logits_ptr, stride, targets_ptr, weights_ptr, loss_ptr, cols,
                          GRAD: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row: loss = logsumexp(x) - x[target] in fp32, the row read once for an
    # online max and sum; with GRAD the row is then overwritten with its gradient
    # weight * (softmax(x) - onehot(target)), in the logits' dtype.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    m = float("-inf")
    total = 0.0
    for start in range(0, cols, BLOCK):
        c = start + tl.arange(0, BLOCK)
        x = tl.load(base + c, mask=c < cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(total)
    tl.store(loss_ptr + row, lse - tl.load(base + target).to(tl.float32))
    if GRAD:
        w = tl.load(weights_ptr + row).to(tl.float32)
        for start in range(0, cols, BLOCK):
            c = start + tl.arange(0, BLOCK)
            x = tl.load(base + c, mask=c < cols, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - (c == target).to(tl.float32)) * w
            tl.store(base + c, g.to(logits_ptr.dtype.element_ty), mask=c < cols)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, grad: bool) -> torch.Tensor:
    rows, cols = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block = min(32768, triton.next_power_of_2(cols))
    _cross_entropy_kernel[(rows,)](
        logits, logits.stride(0), targets, weights, loss, cols, GRAD=grad, BLOCK=block,
        num_warps=32 if block >= 16384 else 8,
    )
    return loss

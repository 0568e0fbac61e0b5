"""The one switch of the fast path: each small kernel runs as hand-written Triton where that
covers its tensors (CUDA, the dtypes the kernel is written for) and as the eager reference
(``medqa_loop.kernels.reference``) everywhere else. The autograd functions call these, never a
backend directly, so this file alone decides what runs.

Why Triton, launched by plain calls: eager PyTorch runs each op of an elementwise expression as
its own kernel, with its own pass over memory (SwiGLU's backward is a dozen passes over
[tokens, 14336] fp32 tensors), and a ``torch.compile``'d function costs ~0.1 ms of CPU time per
call before its kernel starts. A 16-pair window calls these ~2,000 times, and at that count the
CPU, not the GPU, set the pace (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import warnings

import torch

from medqa_loop.kernels import reference

FLOAT = (torch.bfloat16, torch.float16, torch.float32)  # what the fp32-inside kernels take
HALF = (torch.bfloat16, torch.float16)  # tl.dot's 16-bit inputs: the masked LoRA matmuls


@functools.cache
def _triton():
    try:
        from medqa_loop.kernels import triton_ops
    except ImportError as e:  # a CUDA build of torch without Triton
        warnings.warn(f"Triton is unavailable, the fast path's small kernels run eagerly: {e!r}")
        return None
    return triton_ops


def triton_available() -> bool:
    return _triton() is not None


def backend(t: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT):
    """``triton_ops`` where ``t`` is on CUDA in one of ``dtypes`` and Triton imports, else
    ``reference``: the two modules have the same functions."""
    if t.is_cuda and t.dtype in dtypes and (triton_ops := _triton()) is not None:
        return triton_ops
    return reference


def _on(t: torch.Tensor, drop: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, int]:
    """(seed, threshold) with the seed on t's device (the fast path's seeds already are)."""
    seed, threshold = drop
    return seed.to(t.device), threshold


def dropped(x, drop: tuple[torch.Tensor, int]):
    return backend(x, (*FLOAT, torch.float64)).dropped(x, *_on(x, drop))


def dropped_linear(x, a, drop: tuple[torch.Tensor, int], scale: float):
    return backend(x, HALF).dropped_linear(x, a, *_on(x, drop), scale)


def dropped_grad(g, x, drop: tuple[torch.Tensor, int]):
    return backend(x, HALF).dropped_grad(g, x, *_on(x, drop))


def dropped_product(g, a, drop: tuple[torch.Tensor, int]):
    return backend(g, HALF).dropped_product(g, a, *_on(g, drop))


def dequantize(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One pass over the weight; scaling the matmul's output instead costs a pass over
    [tokens, out], which is larger than the weight once a batch holds more than ~3k tokens."""
    impl = backend(cb, (torch.int8,)) if dtype in FLOAT else reference
    return impl.dequantize(cb, scb, dtype)


def merged_weight(w, scb, lora_a, lora_b, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """W + scale * B A: the frozen weight (int8 with row scales ``scb``, or ``scb`` None: a 16-bit
    one) with its LoRA folded in, one pass over W like ``dequantize``; a 16-bit W takes the
    reference's one addmm."""
    impl = backend(w, (torch.int8,)) if scb is not None and dtype in FLOAT else reference
    return impl.merged_weight(w, scb, lora_a, lora_b, scale, dtype)


def rmsnorm(x, weight, eps: float):
    return backend(x).rmsnorm(x, weight, eps)


def rmsnorm_backward(x, weight, rstd, grad_y):
    return backend(x).rmsnorm_backward(x, weight, rstd, grad_y)


def silu_mul(gate, up):
    return backend(gate).silu_mul(gate, up)


def silu_mul_backward(gate, up, grad_h):
    return backend(gate).silu_mul_backward(gate, up, grad_h)


# -- the rotary embedding: Triton or transformers' own function (its reference) -----------------


def _bthd(t: torch.Tensor) -> bool:
    """[batch, heads, tokens, dim] laid out as [batch, tokens, heads, dim] (the projections' layout)."""
    return t.dim() == 4 and t.transpose(1, 2).is_contiguous()


def rotary_covers(q, k, cos, sin) -> bool:
    """Whether the Triton rotary kernel takes these q, k, cos, sin (else transformers' runs)."""
    dim = q.size(-1)
    return (
        backend(q) is not reference
        and _bthd(q) and _bthd(k) and k.dtype == q.dtype and k.shape[::2] == q.shape[::2] and k.size(-1) == dim
        and cos.shape == sin.shape == (q.size(0), q.size(2), dim) and dim % 2 == 0 and (dim // 2) & (dim // 2 - 1) == 0
    )


def rotary(x, cos, sin, backward: bool = False):
    """x rotated by (cos, sin), or the transpose of that rotation (``backward``), in Triton: for
    the tensors ``rotary_covers`` accepted, and for their gradients in any layout."""
    if not _bthd(x):
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return _triton().rotary(x, cos, sin, backward=backward)


# -- the loss head ------------------------------------------------------------------------------


def cross_entropy_rows(logits, targets, weights, grad: bool):
    return backend(logits).cross_entropy_rows(logits, targets, weights, grad)


def linear_cross_entropy_sum(hidden, weight, targets, weights):
    """sum_i weights[i] * cross_entropy(hidden[i] @ weight.T, targets[i]), the [rows, vocab]
    logits made a chunk at a time and never kept (autograd.LinearCrossEntropySum)."""
    from medqa_loop.kernels.autograd import LinearCrossEntropySum

    if targets.numel() == 0:  # no targets (a zero-weight stand-in): a zero joined to the graph
        return hidden.sum() * 0
    return LinearCrossEntropySum.apply(hidden, weight, targets, weights)

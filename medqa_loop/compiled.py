"""GPU kernels for the small elementwise functions of a step, with their eager maths as the
reference (what the CPU runs, and what the tests check).

Eager PyTorch runs each op of an elementwise expression as its own kernel, with its own pass
over memory: SwiGLU's backward is a dozen passes over [tokens, 14336] fp32 tensors. Two ways
to one kernel, by how often a step calls the function:

* ``Kernel``: ``torch.compile`` of the function (the norm and SwiGLU maths, ~300 calls a
  16-pair window). A compiled call costs ~0.1 ms of CPU time before its kernel starts.
* ``triton_ops()``: hand-written Triton kernels (medqa_loop.triton_kernels) for LoRA's dropout
  and the int8 dequantization, which run ~1,600 times a window; a Triton launch costs a small
  fraction of a compiled call, and at that count the CPU, not the GPU, was setting the pace
  (BENCHMARKS.md, run H).
"""

from __future__ import annotations

import functools
import warnings

import torch


class Kernel:
    """Wraps ``fn`` (tensor arguments first): compiled on its first CUDA call, with dynamic
    shapes (one compilation serves every token count, bar a few size classes that Triton
    specializes on). If compilation fails (no Triton, an old GPU) the eager function is used,
    with one warning."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, None
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if not args[0].is_cuda or self.compiled is False:
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, say so once
            warnings.warn(f"torch.compile of {self.fn.__name__} failed, running it eagerly: {e!r}")
            self.compiled = False
            return self.fn(*args)


@functools.cache
def _load_triton_kernels():
    try:
        from medqa_loop import triton_kernels
    except ImportError as e:  # a CUDA build of torch without Triton
        warnings.warn(f"Triton is unavailable, LoRA dropout and int8 dequantization run eagerly: {e!r}")
        return None
    return triton_kernels


def triton_ops(t: torch.Tensor):
    """medqa_loop.triton_kernels where ``t`` is on CUDA and Triton imports; else None (the
    caller runs its eager reference)."""
    return _load_triton_kernels() if t.is_cuda else None

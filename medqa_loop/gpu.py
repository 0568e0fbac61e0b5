"""Which small kernels a tensor gets: hand-written Triton on CUDA, the eager reference elsewhere.

Eager PyTorch runs each op of an elementwise expression as its own kernel, with its own pass
over memory (SwiGLU's backward is a dozen passes over [tokens, 14336] fp32 tensors), and a
``torch.compile``'d function costs ~0.1 ms of CPU time per call before its kernel starts. A
16-pair window calls these functions ~2,000 times (LoRA's dropout and the int8 dequantization
three times per LoRA linear: forward, recompute, backward; the norm and SwiGLU maths ~300
times); at that count the CPU, not the GPU, was setting the pace (BENCHMARKS.md, run H). So the
CUDA versions are hand-written Triton kernels (medqa_loop.triton_kernels) launched by plain
calls, and each caller keeps its eager maths as the reference the CPU runs and the tests check.
"""

from __future__ import annotations

import functools
import warnings

import torch


@functools.cache
def _load_triton_kernels():
    try:
        from medqa_loop import triton_kernels
    except ImportError as e:  # a CUDA build of torch without Triton
        warnings.warn(f"Triton is unavailable, the elementwise kernels run eagerly: {e!r}")
        return None
    return triton_kernels


def triton_ops(t: torch.Tensor):
    """medqa_loop.triton_kernels where ``t`` is on CUDA and Triton imports; else None (the
    caller runs its eager reference)."""
    return _load_triton_kernels() if t.is_cuda else None

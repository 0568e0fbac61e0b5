"""One compiled kernel per small elementwise function, on CUDA; the same function eagerly elsewhere.

Eager PyTorch runs each op of an elementwise expression as its own kernel, with its own pass
over memory: SwiGLU's backward is a dozen passes over [tokens, 14336] fp32 tensors, an int8
weight cast then scaled is two passes over 7B weights. ``torch.compile`` fuses such a function
into one kernel that reads its inputs once. CPU runs (the tests) call the function itself, so
what the tests check is the maths the GPU kernel was compiled from; a CUDA test checks the
two agree.
"""

from __future__ import annotations

import functools
import warnings

import torch


class Kernel:
    """Wraps ``fn`` (tensor arguments first): compiled on its first CUDA call, with dynamic
    shapes (one compilation serves every token count) and Python int arguments as symbols (a new
    seed does not recompile). If compilation fails (no Triton, an old GPU) the eager function is
    used, with one warning."""

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

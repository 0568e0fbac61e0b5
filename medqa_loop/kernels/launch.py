"""Launching a compiled Triton kernel again without Triton's per-call Python.

``kernel[grid](*args)`` runs Triton's launcher in Python every time: it binds and specializes
the arguments, builds and prints a cache key, looks up the device and stream, walks the
kernel's globals, and (autotuned) the tuner's own key. On the H200 that was ~60 us of CPU a
launch, a third of a micro-batch's CPU time at ~1,500 launches (BENCHMARKS.md). ``fast_launch``
does that work once per *kind* of call and then calls the compiled kernel's launcher directly.

A kind of call is everything Triton specializes a compilation on, and more: each tensor's
dtype and whether its address is 16-byte aligned; each int's sign, width, divisibility by 16
and whether it is 1; the type of each float; the exact value of anything else, of every keyword
(constexprs, num_warps) and of the autotuner's key arguments. Calls that differ in any of these
go through Triton's own launch first, which compiles (or tunes) as it always does; the compiled
kernel it returns is kept for that kind. Being finer than Triton only costs a lookup.

Triton's own path runs whenever this cannot be sure to be the same: a launch hook is set (a
profiler), an autotuner config has a pre-hook, or the installed Triton lacks what this reads.
"""

from __future__ import annotations

import torch


def _kind(arg):
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0, arg.device.index
    if isinstance(arg, bool):
        return "b", arg
    if isinstance(arg, int):
        return "i", arg == 1, arg % 16 == 0, arg >= 0, -(2**31) <= arg < 2**31, arg < 2**63
    if isinstance(arg, float):
        return "f"
    return "v", arg


def _active(hook) -> bool:
    """Whether a Triton launch hook is set: None or an empty HookChain (Triton 3.6) is not."""
    return hook is not None and bool(getattr(hook, "calls", True))


class FastLaunch:
    """``fast_launch(kernel)[grid](*args, **kwargs)``: the same launch as ``kernel[grid](...)``
    (a ``triton.jit`` function or a ``triton.autotune`` of one; constexprs by keyword)."""

    def __init__(self, fn):
        from triton.runtime.autotuner import Autotuner

        self.fn = fn
        self.tuned = isinstance(fn, Autotuner)
        self.jit = fn.fn if self.tuned else fn  # an Autotuner wraps the JITFunction
        self.names = list(getattr(self.jit, "arg_names", ()))
        self.tune_keys = list(getattr(fn, "keys", ())) if self.tuned else []
        self.kernels: dict = {}
        self.enabled = bool(self.names)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        import triton

        runtime = triton.knobs.runtime
        if not self.enabled or _active(runtime.launch_enter_hook) or _active(runtime.launch_exit_hook):
            return self.fn[grid](*args, **kwargs)
        named = dict(zip(self.names, args))
        key = (
            tuple(_kind(a) for a in args), tuple(sorted(kwargs.items())),
            tuple(str(named.get(k, kwargs.get(k))) for k in self.tune_keys),
        )
        found = self.kernels.get(key)
        if found is None:
            kernel = self.fn[grid](*args, **kwargs)  # Triton's launch: compiles or tunes as needed
            meta = dict(kwargs)
            if self.tuned:
                config = self.fn.best_config
                if config.pre_hook is not None:
                    self.enabled = False
                    return kernel
                meta.update(config.kwargs)
            if kernel is not None and all(n in named or n in meta for n in self.names):
                self.kernels[key] = kernel, meta
            return kernel
        kernel, meta = found
        g = grid({**named, **meta}) if callable(grid) else grid
        full = [named[n] if n in named else meta[n] for n in self.names]
        kernel.run(
            g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, torch.cuda.current_stream().cuda_stream,
            kernel.function, kernel.packed_metadata, None, None, None, *full,
        )
        return kernel


def fast_launch(fn) -> FastLaunch:
    """Decorate a ``triton.jit`` (or ``triton.autotune``) kernel so that its launches after the
    first of each kind skip Triton's per-call Python (module docstring)."""
    return FastLaunch(fn)

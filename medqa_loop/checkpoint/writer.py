"""Checkpoints written beside training, not in its way.

A save takes a copy of what it writes (the LoRA weights, AdamW's moments: tensors on the GPU)
into host memory, between two steps, and hands the writing to one thread: serializing, hashing
and fsyncing half a gigabyte for Mistral-7B's r16 adapter take about a second, in which the GPU
would otherwise wait for its next window (BENCHMARKS.md). The copy is what makes this safe: the
next optimizer step updates the live tensors in place while the thread writes the old values.

One thread, so writes land in the order they were asked for (a state, then the pruning of an
older one; the best adapter swapped in after the previous one). A write that fails stops the run
at its next save, or when the loop waits at its end, with the path and the OS's reason; it is
also printed at once, in case the run is already ending for another reason. The thread is not a
daemon: a run that stops on an exception still finishes the write in flight before it exits.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (a full disk, a vanished directory); names the path."""


def host_copy(obj):
    """``obj`` with every tensor in it (in dicts, lists, tuples: a state dict) copied to host
    memory; from the GPU that is one blocking transfer each, so the copy is complete on return."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: host_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(value) for value in obj)
    return obj


class CheckpointWriter:
    """Runs checkpoint writes on one background thread (``background=False``: at once, in the
    caller, for code that reads the files straight after)."""

    def __init__(self, background: bool = True):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medqa-checkpoint") if background else None
        self._pending: list[Future] = []

    def submit(self, what: str, path: Path, write: Callable[[], object]) -> None:
        """Write ``what`` to ``path`` by calling ``write()``, after every earlier write. Raises
        CheckpointWriteError for an earlier write that failed."""
        self._raise_failed(done_only=True)
        if self._pool is None:
            _run(what, path, write)
        else:
            self._pending.append(self._pool.submit(_run, what, path, write))

    def wait(self) -> None:
        """Return once everything submitted is on disk; raise the first write that failed."""
        self._raise_failed(done_only=False)

    def _raise_failed(self, done_only: bool) -> None:
        waiting = [f for f in self._pending if done_only and not f.done()]
        finished, self._pending = [f for f in self._pending if f not in waiting], waiting
        for future in finished:
            future.result()


# Writes at once, in the caller (it keeps no state): for code that reads the files straight after.
IN_CALLER = CheckpointWriter(background=False)


def _run(what: str, path: Path, write: Callable[[], object]) -> None:
    try:
        write()
    except Exception as e:
        message = f"writing {what} to {path} failed: {e}"
        # Now, in case the run ends another way first; the run stops with it at its next save.
        print(f"medqa train: {message}", file=sys.stderr, flush=True)
        if isinstance(e, OSError):
            raise CheckpointWriteError(message) from e
        raise

"""LoRA's dropout seeds on the fast path: one 62-bit seed per adapted projection per forward.

The dropout mask of a projection is a hash of (seed, element index) (``kernels.reference``), so
a forward needs one seed per projection and nothing else random. ``use_fused_ops`` gives each
LoRA linear a slot; each training forward of the decoder stack draws all of them at once on the
host, from torch's global generator (seeded runs repeat, and a resumed run restores it), and
copies them to the device in one transfer. The kernels read their seed from there rather than
taking it as an argument, so the forward launches the same kernels with the same arguments
every time, which is what lets ``kernels.graphs`` replay a captured micro-batch with fresh
seeds. A checkpointed layer's recompute reads the seeds of the forward it recomputes.

One draw of n values gives the same numbers as n draws of one (torch's CPU generator draws them
in order), so the masks are those the layers drew one by one before, in the order q, k, v, o,
gate, up, down of each layer.
"""

from __future__ import annotations

import contextlib

import torch


class DropoutSeeds:
    def __init__(self) -> None:
        self.modules: list[torch.nn.Module] = []  # the LoRA linears, by slot
        self.current: torch.Tensor | None = None  # [count] int64 on the device: the running forward's
        self._captured: torch.Tensor | None = None  # while a CUDA graph is captured: its seed buffer

    @property
    def count(self) -> int:
        return len(self.modules)

    def slot(self, module: torch.nn.Module) -> int:
        """A LoRA linear's index into each forward's seeds."""
        self.modules.append(module)
        return self.count - 1

    def seed(self, slot: int) -> torch.Tensor:
        """The running forward's seed of one projection (a 0-d view: the kernels read it)."""
        return self.current[slot]

    def draw(self, device: torch.device) -> None:
        """At the start of each forward: new seeds for every slot, where any of the LoRA linears
        trains (evaluation draws none). While a graph is being captured, none: the graph reads
        the buffer each replay refills (``refill``)."""
        if self._captured is None and any(m.training for m in self.modules):
            self.current = self._drawn(device).to(device, non_blocking=True)

    def refill(self, buffer: torch.Tensor) -> None:
        """Before a graph's replay: that forward's seeds, into the buffer it was captured with."""
        buffer.copy_(self._drawn(buffer.device), non_blocking=True)

    @contextlib.contextmanager
    def captured(self, buffer: torch.Tensor):
        """Capture a forward that reads its seeds from ``buffer``."""
        self._captured = self.current = buffer
        try:
            yield
        finally:
            self._captured = None

    def _drawn(self, device: torch.device) -> torch.Tensor:
        seeds = torch.randint(2**62, (self.count,))
        # Pinned, the copy to the GPU is queued like a kernel, instead of waiting for the GPU to
        # drain its queue first; the pinned block stays reserved until the copy has run.
        return seeds.pin_memory() if device.type == "cuda" else seeds

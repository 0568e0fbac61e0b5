"""Metrics: one JSON line per optimizer step and per evaluation in <output_dir>/metrics.jsonl."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")  # exp overflows a float past ~709


class MetricsLog:
    """Appends JSON lines; a no-op on non-main processes so callers need no rank checks.

    ``forward``, when given, is called with each record after its line is written: how the
    experiment trackers get every step and evaluation (medqa_loop.trackers.start_trackers).
    """

    def __init__(self, path: Path, enabled: bool = True, forward: Callable[[dict], None] | None = None):
        self.path, self.enabled, self.forward = Path(path), enabled, forward

    def write(self, **record) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.forward is not None:
            self.forward(record)


def peak_memory_gb(device) -> float | None:
    """Peak GPU memory allocated by this process so far (GB), None off-GPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

"""Metrics: one JSON line per optimizer step and per evaluation in <output_dir>/metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")  # exp overflows a float past ~709


class MetricsLog:
    """Appends JSON lines; a no-op on non-main processes so callers need no rank checks."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, **record) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def peak_memory_gb(device) -> float | None:
    """Peak GPU memory allocated by this process so far (GB), None off-GPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

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


def peak_memory_gb(device) -> tuple[float, float] | None:
    """Peak GPU memory (GB) this process has allocated, and has reserved (what the GPU holds for
    it: the allocator's cache and the CUDA graphs' pool, which a replay uses without allocating),
    so far; None off-GPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9, torch.cuda.max_memory_reserved(device) / 1e9


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_summary(records: list[dict], out: Path, wall_s: float) -> str:
    """What a finished run tells its user: how far it went, how well, how fast, where its files
    are and what to run next; from its metrics.jsonl records."""
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r and r["step"] > 0]
    minutes, seconds = divmod(round(wall_s), 60)
    lines = [f"done in {minutes}m{seconds:02d}s: {steps[-1]['step'] if steps else 0} optimizer steps"]
    if steps:
        time_s = sum(r["step_time_s"] for r in steps)
        pairs = sum(r["samples_per_s"] * r["step_time_s"] for r in steps)
        lines[0] += f" ({steps[-1]['epoch']:g} epochs), {pairs / time_s:.2f} samples/s in the steps"
        if peaks := [r["peak_gb"] for r in steps if "peak_gb" in r]:
            lines[0] += f", peak {max(peaks):.1f} GB"
        if skipped := [r for r in steps if "skipped_nonfinite" in r]:
            lines.append(f"  {len(skipped)} non-finite steps skipped (train.nan_policy=skip)")
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        lines.append(
            f"  eval loss {evals[-1]['eval_loss']:.4f} at the end (step {evals[-1]['step']}); the lowest "
            f"{best['eval_loss']:.4f} at step {best['step']}, in {out / 'best'}"
        )
    adapters = ", ".join(p.name for p in sorted(out.glob("epoch-*")) + [out / "final"] if p.is_dir())
    lines.append(f"  adapters in {out}: {adapters}; metrics: {out / 'metrics.jsonl'}")
    if (out / "samples.jsonl").is_file():
        lines.append(f"  answers sampled at each evaluation: {out / 'samples.jsonl'}")
    lines.append(f'  next: medqa generate --adapter {out / "final"} "your question"   |   medqa plot {out}')
    return "\n".join(lines)

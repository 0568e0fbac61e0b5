"""Plot a run: loss and eval loss, lr, grad norm and clip coefficient against the optimizer step.

    medqa plot RUN_DIR [--out FILE.png]

Reads ``RUN_DIR/metrics.jsonl`` (and ``config.yaml`` for the clipping threshold); writes
``RUN_DIR/training.png`` by default. Works on any run directory, finished or not. The clip
coefficient is clipping's own formula, min(1, max_grad_norm / (grad_norm + 1e-6)), from the
logged pre-clip norm. Needs matplotlib (a dependency of this package).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from medqa_loop.metrics import read_metrics
from medqa_loop.optim import clip_coef


def plot_run(run_dir: str | Path, out: str | Path | None = None):
    """Write the PNG; return (its path, the matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise ValueError(f"{run} holds no metrics.jsonl (not a run directory?)")
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not steps and not evals:
        raise ValueError(f"{run / 'metrics.jsonl'} holds no step or evaluation yet")
    max_norm = 0.0  # no clipping known
    if (run / "config.yaml").is_file():
        max_norm = yaml.safe_load((run / "config.yaml").read_text())["train"]["max_grad_norm"]

    x = [r["step"] for r in steps]
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(8, 10))
    loss_ax, lr_ax, norm_ax, clip_ax = axes
    loss_ax.plot(x, [r["loss"] for r in steps], label="train loss")
    loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    lr_ax.plot(x, [r["lr"] for r in steps])
    lr_ax.set_ylabel("learning rate")
    norm_ax.plot(x, [r["grad_norm"] for r in steps], label="pre-clip grad norm")
    if max_norm > 0:
        norm_ax.axhline(max_norm, color="grey", linestyle="--", label=f"max_grad_norm {max_norm:g}")
    norm_ax.set_ylabel("grad norm")
    norm_ax.legend()
    # A step the NaN guard skipped (debug.nan_policy=skip) applied no update: coefficient 0.
    clip_ax.plot(x, [0.0 if "skipped_nonfinite" in r else clip_coef(r["grad_norm"], max_norm) for r in steps])
    clip_ax.set_ylabel("clip coefficient")
    clip_ax.set_ylim(0, 1.05)
    clip_ax.set_xlabel("optimizer step")
    fig.suptitle(str(run))
    fig.tight_layout()
    out = Path(out) if out is not None else run / "training.png"
    fig.savefig(out, dpi=100)
    return out, fig

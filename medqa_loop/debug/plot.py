"""Plot a run: loss and eval loss, lr, grad norm and clip coefficient against the optimizer step;
for a traced run (``debug.enabled=true``) also per-module gradient heatmaps.

    medqa plot RUN_DIR [--out FILE.png]

Reads ``RUN_DIR/metrics.jsonl`` (and ``config.yaml`` for the clipping threshold); writes
``RUN_DIR/training.png`` by default. Works on any run directory, finished or not. The clip
coefficient is clipping's own formula, min(1, max_grad_norm / (grad_norm + 1e-6)), from the
logged pre-clip norm. Needs matplotlib (a dependency of this package).

Where ``RUN_DIR/grad_trace.jsonl`` exists it also writes ``RUN_DIR/gradients.png`` (with --out,
``FILE-gradients.png`` beside it): the clip coefficient per traced step above heatmaps of
log10(grad norm) and log10(update ratio), one row per LoRA matrix in model order, one column
per traced step. ``gradient_grid`` shapes the data (no matplotlib); ``draw_gradients`` draws it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import yaml

from medqa_loop.metrics import read_metrics
from medqa_loop.optim import clip_coef


class Plotted(tuple):
    """What plot_run wrote. Unpacks as (training.png's path, its figure), as it always has, so
    existing callers keep working; ``files`` and ``figures`` list every PNG written, in order."""

    def __new__(cls, files: list[Path], figures: list):
        self = super().__new__(cls, (files[0], figures[0]))
        self.files, self.figures = files, figures
        return self


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Plotted:
    """Write training.png, and gradients.png where the run has a gradient trace."""
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
    # A step the NaN guard skipped (train.nan_policy=skip) applied no update: coefficient 0.
    clip_ax.plot(x, [0.0 if "skipped_nonfinite" in r else clip_coef(r["grad_norm"], max_norm) for r in steps])
    clip_ax.set_ylabel("clip coefficient")
    clip_ax.set_ylim(0, 1.05)
    clip_ax.set_xlabel("optimizer step")
    fig.suptitle(str(run))
    fig.tight_layout()
    written = Path(out) if out is not None else run / "training.png"
    fig.savefig(written, dpi=100)
    files, figures = [written], [fig]
    trace = read_metrics(run / "grad_trace.jsonl") if (run / "grad_trace.jsonl").is_file() else []
    if trace:  # a traced run (debug.enabled=true) that has traced a step
        # Beside --out's file rather than in RUN_DIR: --out is how one plots a run one cannot write to.
        path = run / "gradients.png" if out is None else written.with_name(f"{written.stem}-gradients{written.suffix}")
        grads = draw_gradients(gradient_grid(trace), f"{run}: per-module gradients ({len(trace)} traced steps)")
        grads.savefig(path, dpi=100)
        files.append(path)
        figures.append(grads)
    return Plotted(files, figures)


_PROJ_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a layer's forward order
_LORA_NAME = re.compile(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])")


def _model_order(name: str) -> tuple:
    """Sort key: layer, then projection in forward order, then A before B; other names last."""
    m = _LORA_NAME.fullmatch(name)
    if m is None:
        return (math.inf, 0, name, "")
    proj = m[2]
    return (int(m[1]), _PROJ_ORDER.index(proj) if proj in _PROJ_ORDER else len(_PROJ_ORDER), proj, m[3])


def _cell(line: dict, name: str, key: str) -> float:
    value = line["modules"].get(name, {}).get(key)
    if value is None:
        return math.nan  # no value: B's first step (its weight is 0), or a module this line lacks
    if key == "grad_norm" and not math.isfinite(value):
        return math.inf  # an overflow (inf or NaN): kept apart from missing, drawn at the top
    return float(value)


def gradient_grid(trace_lines: list[dict]):
    """(row labels, steps, grad norms, update ratios, clip coefficients) of grad_trace.jsonl lines.

    Rows are the LoRA matrices in model order, columns the trace lines; the two matrices are
    lists of rows of floats, math.nan where there is no value, math.inf for a non-finite grad norm.
    """
    rows = sorted({name for line in trace_lines for name in line["modules"]}, key=_model_order)
    grid = [[[_cell(line, name, key) for line in trace_lines] for name in rows] for key in ("grad_norm", "update_ratio")]
    return rows, [line["step"] for line in trace_lines], grid[0], grid[1], [line["clip_coef"] for line in trace_lines]


def _heatmap(fig, ax, cax, values, label: str, title: str) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.asarray(values, dtype=float).reshape(len(values), -1))
    finite = logs[np.isfinite(logs)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 0.0)
    lo, hi = (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)
    # 0 (log -inf: a dead module) and inf (an overflow) just outside the scale, so the colour map's
    # under and over colours show them; NaN (no value) masked, drawn in its "bad" colour.
    shown = np.ma.masked_invalid(np.where(np.isposinf(logs), hi + 1, np.where(np.isneginf(logs), lo - 1, logs)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white", under="black", over="red")
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap, vmin=lo, vmax=hi)
    fig.colorbar(image, cax=cax, extend="both", label=label)
    r, c = np.nonzero(np.isposinf(logs))  # a marker too: one cell of hundreds is easy to miss
    ax.plot(c, r, "x", color="black", markersize=7, markeredgewidth=1.5, linestyle="none")
    ax.set_title(title, fontsize=9)


def draw_gradients(grid, title: str):
    """The figure of a gradient_grid: clip coefficient on top, then the two heatmaps."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    rows, steps, grad, ratio, clip = grid
    fig = plt.figure(figsize=(10, 12), layout="constrained")
    spec = fig.add_gridspec(3, 2, width_ratios=[40, 1], height_ratios=[1, 4, 4])
    clip_ax = fig.add_subplot(spec[0, 0])
    clip_ax.plot(range(len(steps)), clip, "o-" if len(steps) <= 60 else "-")
    clip_ax.set(ylabel="clip coefficient", ylim=(0, 1.05), xlim=(-0.5, len(steps) - 0.5))
    # Columns are trace lines (debug.every may trace every 10th step): tick labels name their steps.
    clip_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    clip_ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: str(steps[int(x)]) if 0 <= x < len(steps) else ""))
    clip_ax.tick_params(labelbottom=False)
    short = [f"{m[1]} {m[2]}.{m[3]}" if (m := _LORA_NAME.fullmatch(n)) else n for n in rows]  # "0 q_proj.A"
    starts = [i for i in range(len(rows)) if i == 0 or _model_order(rows[i])[0] != _model_order(rows[i - 1])[0]]
    legend = "white: no value, black: 0, red/x: inf or NaN"
    for i, (values, what) in enumerate([(grad, "log10 grad norm"), (ratio, "log10 update ratio |dW|/|W|")], start=1):
        ax = fig.add_subplot(spec[i, 0], sharex=clip_ax)
        _heatmap(fig, ax, fig.add_subplot(spec[i, 1]), values, what, f"{what} ({legend})")
        for start in starts[1:]:
            ax.axhline(start - 0.5, color="white", linewidth=0.8)  # layer boundaries
        if len(rows) <= 40:  # every row readable
            ax.set_yticks(range(len(rows)), short, fontsize=7)
        else:  # a Mistral-7B has 448 rows: a tick per layer (at most ~32), at its first row
            ticks = starts[:: max(1, len(starts) // 32)]
            ax.set_yticks(ticks, [short[t].split(" ")[0] for t in ticks], fontsize=7)
            ax.set_ylabel("layer (q k v o gate up down, A B)")
        ax.tick_params(labelbottom=i == 2)
    ax.set_xlabel("traced optimizer step")
    fig.suptitle(title)
    return fig

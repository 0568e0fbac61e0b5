"""The run plot (medqa_loop.debug.plot): the logged curves of metrics.jsonl, clear errors for a
directory that is not a run or has logged nothing yet, and a traced run's gradient heatmaps."""

import json
import math

import pytest

from medqa_loop import cli
from medqa_loop.debug.plot import gradient_grid, plot_run
from medqa_loop.metrics import read_metrics


def test_plot_of_a_run(traced_run):
    import matplotlib.image

    _, out, _, _ = traced_run
    path, fig = plot_run(out)
    assert path == out / "training.png" and matplotlib.image.imread(path).shape[:2] == (1000, 800)
    loss_ax, lr_ax, norm_ax, clip_ax = fig.axes
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    trace = read_metrics(out / "grad_trace.jsonl")
    assert list(loss_ax.lines[0].get_ydata()) == [r["loss"] for r in steps]
    assert list(lr_ax.lines[0].get_ydata()) == [r["lr"] for r in steps]
    assert list(norm_ax.lines[0].get_ydata()) == [r["grad_norm"] for r in steps]
    assert list(clip_ax.lines[0].get_ydata()) == pytest.approx([t["clip_coef"] for t in trace])


def test_plot_refuses_a_directory_without_metrics_or_steps(tmp_path):
    with pytest.raises(ValueError, match="holds no metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "data_train_pairs": 3}\n')  # data line only
    with pytest.raises(ValueError, match="holds no step or evaluation yet"):
        plot_run(tmp_path)


# -- gradients.png: the per-module heatmaps of a traced run ------------------------------------

PROJS = [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
    ("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")
]


def copy_run(src, dst, names=("metrics.jsonl", "config.yaml", "grad_trace.jsonl")):
    dst.mkdir()
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_gradient_grid_is_the_trace_in_model_order(traced_run):
    _, out, _, _ = traced_run
    trace = read_metrics(out / "grad_trace.jsonl")
    rows, steps, grad, ratio, clip = gradient_grid(trace)
    # Layer by layer, q k v o gate up down, A then B: spelled out, not taken from the trace's order.
    assert rows == [f"layers.{i}.{block}.{proj}.lora_{ab}" for i in range(2) for block, proj in PROJS for ab in "AB"]
    assert set(rows) == set(trace[0]["modules"]) and steps == [1, 2]
    shuffled = [{**t, "modules": dict(reversed(t["modules"].items()))} for t in trace]
    assert gradient_grid(shuffled)[0] == rows  # the order is the model's, whatever the line's
    assert clip == [t["clip_coef"] for t in trace] and all(c < 1 for c in clip)  # the fixture clips both
    assert any(m["update_ratio"] is None for m in trace[0]["modules"].values())  # B's first step is there
    for r, name in enumerate(rows):
        for c, line in enumerate(trace):
            assert grad[r][c] == line["modules"][name]["grad_norm"]
            expected = line["modules"][name]["update_ratio"]
            assert math.isnan(ratio[r][c]) if expected is None else ratio[r][c] == expected


def test_plot_of_a_traced_run_writes_gradients_png(traced_run, tmp_path, capsys):
    import matplotlib.image

    run = copy_run(traced_run[1], tmp_path / "run")
    written = plot_run(run)
    assert written.files == [run / "training.png", run / "gradients.png"]
    assert (run / "gradients.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(run / "gradients.png").shape[:2] == (1200, 1000)
    clip_ax, grad_ax, _, ratio_ax, _ = written.figures[1].axes
    assert list(clip_ax.lines[0].get_ydata()) == [t["clip_coef"] for t in read_metrics(run / "grad_trace.jsonl")]
    shown = ratio_ax.images[0].get_array()
    assert shown.mask[1, 0] and not shown.mask[1, 1]  # q_proj.lora_B: no ratio at step 1 (B was 0), one at step 2
    # `medqa plot` names every file it wrote; with --out the heatmaps go beside that file.
    a = tmp_path / "a.png"
    assert _cli(capsys, "plot", run, "--out", a) == f"wrote {a}\nwrote {tmp_path / 'a-gradients.png'}\n"
    assert (tmp_path / "a-gradients.png").is_file()


def test_a_run_without_a_trace_writes_no_gradients_png(traced_run, tmp_path, capsys):
    run = copy_run(traced_run[1], tmp_path / "run", names=("metrics.jsonl", "config.yaml"))
    assert plot_run(run).files == [run / "training.png"]
    assert not (run / "gradients.png").exists()
    assert _cli(capsys, "plot", run) == f"wrote {run / 'training.png'}\n"


def test_a_non_finite_grad_norm_is_drawn_at_the_top_and_marked(traced_run, tmp_path):
    run = copy_run(traced_run[1], tmp_path / "run")
    trace = read_metrics(run / "grad_trace.jsonl")
    trace[1]["modules"]["layers.1.mlp.down_proj.lora_B"]["grad_norm"] = math.inf  # json: Infinity
    trace[1]["modules"]["layers.0.self_attn.k_proj.lora_A"]["grad_norm"] = math.nan  # json: NaN
    (run / "grad_trace.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trace))
    rows, _, grad, _, _ = gradient_grid(read_metrics(run / "grad_trace.jsonl"))
    bad = [(rows.index("layers.0.self_attn.k_proj.lora_A"), 1), (rows.index("layers.1.mlp.down_proj.lora_B"), 1)]
    assert [grad[r][c] for r, c in bad] == [math.inf, math.inf]  # NaN too: not mistaken for "no value"
    grad_ax = plot_run(run).figures[1].axes[1]
    image = grad_ax.images[0]
    for r, c in bad:  # not masked, above the scale (the colour map's "over" colour, red), and marked
        assert not image.get_array().mask[r, c] and image.get_array()[r, c] > image.norm.vmax
    assert image.cmap(image.norm(image.get_array()[bad[0]])) == tuple(image.cmap.get_over())
    marker = grad_ax.lines[0]
    assert sorted(zip(marker.get_ydata(), marker.get_xdata())) == bad


def _cli(capsys, *argv) -> str:
    """``medqa ...`` in-process; returns its stdout (it exits 0)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in argv])
    assert exit_.value.code == 0
    return capsys.readouterr().out

"""The run plot (medqa_loop.debug.plot): the logged curves of metrics.jsonl, and clear errors for a
directory that is not a run or has logged nothing yet."""

import pytest

from medqa_loop.debug.plot import plot_run
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

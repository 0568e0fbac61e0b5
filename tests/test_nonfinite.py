"""The always-on stop for a non-finite step, debugging off: no update is applied, no adapter with
a non-finite weight is written anywhere, the last good step is resumable; or the step is skipped."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medqa_loop.checkpoint.state import verify_state
from medqa_loop.loop import NonFiniteError
from medqa_loop.metrics import read_metrics
from medqa_loop.train import run

# A learning rate no model survives, and no clipping to save it: the loss turns inf/NaN within steps.
DIVERGE = ["train.lr=1e6", "train.warmup_steps=1", "train.max_grad_norm=0", "train.max_steps=12",
           "train.eval_every=3", "train.sanity_eval_batches=0", "train.save_every=2"]


def every_adapter(out):
    return sorted(out.rglob("adapter_model.safetensors"))


def assert_all_finite(out):
    adapters = every_adapter(out)
    assert adapters
    for path in adapters:
        for name, tensor in load_file(path).items():
            assert torch.isfinite(tensor).all(), f"{path}: {name}"


@pytest.mark.slow
def test_a_diverging_run_stops_before_the_update_with_a_resumable_last_good_state(tiny_cfg):
    cfg = tiny_cfg(*DIVERGE)
    with pytest.raises(NonFiniteError) as err:
        run(cfg)
    bad, out = err.value.step, Path(cfg.output_dir)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, bad)) and all(math.isfinite(r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r)
    message = str(err.value)
    assert f"non-finite step {bad}: loss" in message and "the window's dataset rows [" in message
    assert err.value.saved == out / "state" / f"step-{bad - 1}" and str(err.value.saved) in message
    assert verify_state(err.value.saved)["step"] == bad - 1
    assert not (out / "final").exists()
    assert_all_finite(out)


@pytest.mark.slow
def test_the_last_good_state_resumes_into_the_same_window(tiny_cfg):
    """Resumed as it was, the run meets the same non-finite step again: the state holds the RNGs
    from before that window, so the window is drawn as it was."""
    cfg = tiny_cfg(*DIVERGE)
    with pytest.raises(NonFiniteError) as first:
        run(cfg)
    with pytest.raises(NonFiniteError) as again:
        run(cfg, resume="auto")
    assert again.value.step == first.value.step
    assert str(first.value).split(". Stopped")[0] == str(again.value).split(". Stopped")[0]


@pytest.mark.slow
def test_skip_counts_the_dropped_updates_and_writes_only_finite_adapters(tiny_cfg):
    cfg = tiny_cfg(*DIVERGE, "train.nan_policy=skip")
    last = run(cfg)
    out = Path(cfg.output_dir)
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    skipped = [r for r in steps if "skipped_nonfinite" in r]
    assert last["step"] == 12 and skipped and [r["skipped_nonfinite"] for r in skipped] == list(range(1, len(skipped) + 1))
    assert all(not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])) for r in skipped)
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert_all_finite(out)

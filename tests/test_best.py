"""best/: the adapter with the lowest eval loss so far; early stopping; a resumed run keeps both."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medqa_loop.evaluation import Best, best_so_far
from medqa_loop.metrics import read_metrics
from medqa_loop.train import run


def test_best_counts_evaluations_since_the_lowest_and_ignores_the_sanity_eval():
    records = [{"step": 0, "eval_loss": 1.0}, {"step": 2, "eval_loss": 5.0}, {"step": 3, "loss": 9.0},
               {"step": 4, "eval_loss": 4.0}, {"step": 6, "eval_loss": 4.5}, {"step": 8, "eval_loss": 4.0}]
    assert best_so_far(records) == Best(loss=4.0, step=4, stale=2)
    assert Best().after(1, 3.0).after(2, 2.0) == Best(2.0, 2, 0)


def evals(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r and r["step"] > 0]


@pytest.mark.slow
def test_best_holds_the_adapter_of_the_lowest_eval_loss(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=6", "train.eval_every=2", "train.sanity_eval_batches=0", "train.eval_max_batches=2")
    run(cfg)
    out = Path(cfg.output_dir)
    lowest = min(evals(out), key=lambda r: r["eval_loss"])
    info = json.loads((out / "best" / "best.json").read_text())
    assert info == {"step": lowest["step"], "eval_loss": lowest["eval_loss"]}
    assert not any(p.name.startswith((".tmp-best", ".old-best")) for p in out.iterdir())
    if lowest["step"] == 6:  # the last evaluation was the best: best/ is final/'s weights
        best, final = load_file(out / "best/adapter_model.safetensors"), load_file(out / "final/adapter_model.safetensors")
        assert all(torch.equal(best[k], final[k]) for k in final)


@pytest.mark.slow
def test_early_stopping_stops_after_patience_evaluations_without_improvement(tiny_cfg):
    # lr 0: the weights never move, so no evaluation after the first improves on it
    cfg = tiny_cfg("train.lr=1e-12", "train.max_steps=20", "train.eval_every=1", "train.eval_max_batches=1",
                   "train.sanity_eval_batches=0", "train.early_stopping_patience=2", "train.save_every=100")
    last = run(cfg)
    out = Path(cfg.output_dir)
    assert [r["step"] for r in evals(out)] == [1, 2, 3] and last["step"] == 3
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 1
    assert (out / "final").is_dir() and (out / "state" / "step-3").is_dir()


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_so_far_and_its_patience(tiny_cfg):
    common = ["train.lr=1e-12", "train.eval_every=1", "train.eval_max_batches=1", "train.sanity_eval_batches=0",
              "train.early_stopping_patience=3", "train.save_every=1"]
    cfg = tiny_cfg(*common, "train.max_steps=2")
    run(cfg)
    out = Path(cfg.output_dir)
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 1
    resumed = tiny_cfg(*common, "train.max_steps=20")
    last = run(resumed, resume="auto")
    # step 1 stays the best; evaluations 2 (before the resume), 3 and 4 make three without improvement
    assert last["step"] == 4 and json.loads((out / "best" / "best.json").read_text())["step"] == 1

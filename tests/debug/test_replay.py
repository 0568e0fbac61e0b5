"""Deterministic replay (medqa_loop.debug.replay) of a run's optimizer step from the state before
it (medqa_loop.checkpoint.saved): a debug bundle, or a training state ``state/step-<N-1>``. On the
CPU, with LoRA dropout on (so the RNG state matters), the replayed gradients are the run's bit for
bit and the per-module table equals the run's grad_trace.jsonl line."""

import re

import pytest
from safetensors.torch import load_file

from conftest import TINY
from medqa_loop.batching import steps_per_epoch
from medqa_loop.checkpoint.saved import find_saved, read_saved
from medqa_loop.cli import main
from medqa_loop.config import load_config
from medqa_loop.data import load_pairs, split_pairs
from medqa_loop.debug.replay import bitwise_equal, load_run_config, replay
from medqa_loop.metrics import read_metrics


def cli_replay(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["replay", *map(str, argv)])
    printed = capsys.readouterr()
    assert exit_.value.code == 0, printed.err
    return printed.out


def trace_line(out, step: int) -> dict:
    return next(t for t in read_metrics(out / "grad_trace.jsonl") if t["step"] == step)


@pytest.mark.slow
def test_replay_from_a_snapshot_is_bitwise_equal_on_cpu(traced_run, capsys):
    """Replay step 2 (dropout 0.1: the RNG state matters) from its snapshot: the gradients equal
    the run's bit for bit and the per-module table equals the run's grad_trace line."""
    cfg, out, _, _ = traced_run
    printed = cli_replay(capsys, "--run", out, "--step", 2)
    assert re.search(r"gradients bitwise equal to the run's \(.*step-2/grads.safetensors\): yes", printed)
    assert "per-module table equal to the run's grad_trace.jsonl line: yes" in printed
    assert "layers.1.mlp.down_proj.lora_B" in printed

    r = replay(out, 2)
    assert r.bitwise_equal is True
    assert bitwise_equal(r.grads, load_file(out / "debug/step-2/grads.safetensors"))
    assert r.trace == read_metrics(out / "grad_trace.jsonl")[1]  # modules, micro-batches, loss, lr, clip
    # The check can fail: other dropout masks give another gradient.
    fresh = replay(out, 2, fresh_dropout=True)
    assert fresh.bitwise_equal is False and fresh.trace["modules"] != r.trace["modules"]


def test_replay_without_a_checkpoint_says_how_to_get_one(traced_run):
    """The run kept bundles before steps 1 and 2 and its last training state (after step 2, so
    before step 3): nothing holds the state before step 4."""
    _, out, _, _ = traced_run
    with pytest.raises(
        ValueError,
        match=r"before step 4: debug bundles exist for steps \[1, 2\], training states for steps \[3\], "
        r"epoch adapters for steps \[\].*snapshot_steps=\[4\]",
    ):
        replay(out, 4)


@pytest.fixture(scope="module")
def state_run(tmp_path_factory):
    """Four traced steps at the tiny preset's LoRA dropout (0.1) and packing, a training state
    after every step (all four kept), and a snapshot bundle before step 4 only."""
    from medqa_loop.train import run

    out = tmp_path_factory.mktemp("states") / "run"
    cfg = load_config(TINY, [
        f"output_dir={out}", "train.max_steps=4", "train.grad_accum_steps=2", "train.sanity_eval_batches=0",
        "train.save_every=1", "train.keep_states=4", "train.sample_questions=0",
        "debug.enabled=true", "debug.snapshot_steps=[4]",
    ])
    assert cfg.lora.dropout == 0.1 and cfg.data.batching == "pack"
    run(cfg)
    return cfg, out


def per_epoch(cfg) -> int:
    """Optimizer steps per epoch of the run (one process)."""
    train_pairs, _ = split_pairs(load_pairs(cfg.data), cfg.data.val_fraction, cfg.seed)
    return steps_per_epoch(len(train_pairs), cfg.train.micro_batch_size, cfg.train.grad_accum_steps)


@pytest.mark.slow
def test_replay_from_a_training_state_equals_the_runs_trace_line(state_run, capsys):
    cfg, out = state_run
    assert sorted(p.name for p in (out / "state").iterdir()) == ["step-1", "step-2", "step-3", "step-4"]
    assert [p.name for p in (out / "debug").iterdir()] == ["step-4"]
    # No bundle before step 3: the training state saved after step 2 holds what it needs.
    assert find_saved(out, 3, per_epoch(cfg)) == out / "state" / "step-2"
    saved = read_saved(out / "state" / "step-2")
    assert saved.kind == "training state" and saved.adapter == out / "state" / "step-2" and saved.world == 1
    assert saved.optimizer is not None and saved.rng is not None and saved.grads is None

    r = replay(out, 3)
    assert r.source == out / "state" / "step-2"
    assert r.bitwise_equal is None  # a state holds no gradients to compare with
    assert r.notes == []
    run_line = trace_line(out, 3)
    assert r.trace["modules"] == run_line["modules"]  # the per-module table, bit for bit
    assert r.trace == run_line  # and loss, lr, clip, micro-batches
    assert all(m["update_ratio"] is not None for m in r.trace["modules"].values())  # the optimizer state came back

    printed = cli_replay(capsys, "--run", out, "--step", 3)
    assert f"replay of step 3 from {out / 'state' / 'step-2'}" in printed
    assert "per-module table equal to the run's grad_trace.jsonl line: yes" in printed
    assert "gradients bitwise equal" not in printed

    # The check can fail: without the state's RNG, dropout draws other masks, another table.
    fresh = replay(out, 3, fresh_dropout=True)
    assert fresh.trace["modules"] != run_line["modules"]


@pytest.mark.slow
def test_a_bundle_is_found_first_and_a_state_gives_its_gradients_bit_for_bit(state_run):
    """Step 4 has a bundle and the state after step 3: find_saved takes the bundle (it also holds
    the run's gradients); replayed from the state instead, the gradients are the bundle's, bitwise."""
    cfg, out = state_run
    assert find_saved(out, 4, per_epoch(cfg)) == out / "debug" / "step-4"
    r = replay(out, 4, checkpoint=out / "state" / "step-3")
    assert r.source == out / "state" / "step-3"
    assert bitwise_equal(r.grads, load_file(out / "debug" / "step-4" / "grads.safetensors"))
    assert r.trace == trace_line(out, 4)


def test_load_run_config_reads_the_runs_config_and_refuses_other_directories(traced_run, tmp_path):
    from medqa_loop.memory import DEFAULT_ROWS

    cfg, out, _, _ = traced_run
    ran = cfg.to_dict()
    ran["data"]["pack_tokens"] = DEFAULT_ROWS  # data.pack_tokens=auto as the run resolved it (on the CPU)
    assert cfg.data.pack_tokens == "auto" and load_run_config(out).to_dict() == ran
    with pytest.raises(ValueError, match=r"is not a run directory \(no config.yaml\)"):
        load_run_config(tmp_path)

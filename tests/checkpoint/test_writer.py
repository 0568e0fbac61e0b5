"""Checkpoints written in the background (medqa_loop.checkpoint.writer): a save returns before its
files are written, writes the values of the moment it was asked for, fails loudly, and reads back
states that Accelerate's save_state wrote (the layout of earlier versions)."""

import errno
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file

from medqa_loop.checkpoint.state import Position, StateSaver, find_state, verify_state
from medqa_loop.checkpoint.writer import CheckpointWriteError, CheckpointWriter
from medqa_loop.train import prepare_run


def held(writer: CheckpointWriter) -> threading.Event:
    """Occupy the writer's thread until the returned event is set: what is submitted next waits."""
    gate = threading.Event()
    writer.submit("a gate", "nowhere", gate.wait)
    return gate


def test_a_state_save_returns_at_once_and_writes_the_values_it_was_asked_for(tiny_cfg):
    cfg = tiny_cfg("train.lr=1e-2")
    parts = prepare_run(cfg)
    model, optimizer = parts.model, parts.optimizer
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = torch.randn_like(p)
    optimizer.step()  # AdamW's moments exist
    before = {n: p.detach().clone() for n, p in params.items()}
    moments = {i: s["exp_avg"].clone() for i, s in optimizer.state_dict()["state"].items()}
    saver = StateSaver(cfg, parts.accelerator, model, optimizer, "x")
    writer = CheckpointWriter()
    gate = held(writer)

    path = saver.save(Position(5, 0, 1), writer)
    assert not path.exists()  # returned with nothing written: the writer is held
    optimizer.step()  # the next step changes weights and moments in place meanwhile
    assert not torch.equal(params[next(iter(params))], before[next(iter(params))])
    gate.set()
    writer.wait()

    assert verify_state(path)["step"] == 5
    saved = load_file(path / "adapter_model.safetensors")
    assert len(saved) == len(before) > 0
    for name, value in before.items():  # PEFT's saved names drop the adapter's name
        assert torch.equal(saved[name.replace(".default", "")], value), name
    saved_moments = torch.load(path / "optimizer.bin", weights_only=True)["state"]
    assert all(torch.equal(saved_moments[i]["exp_avg"], m) for i, m in moments.items())


def test_a_failed_write_is_raised_at_the_next_save_and_at_the_wait_naming_the_path(tmp_path, capsys):
    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    writer = CheckpointWriter()
    writer.submit("the training state of step 50", tmp_path / "state" / "step-50", full_disk)
    message = rf"writing the training state of step 50 to {tmp_path}/state/step-50 failed: \[Errno 28\] No space"
    with pytest.raises(CheckpointWriteError, match=message):
        writer.wait()
    assert "medqa train: writing the training state of step 50" in capsys.readouterr().err  # at once too

    writer.submit("the best adapter", tmp_path / "best", full_disk)
    after_it = threading.Event()
    writer.submit("the next one", tmp_path / "epoch-1", after_it.set)  # runs once the failure is done
    assert after_it.wait(timeout=60)
    with pytest.raises(CheckpointWriteError, match="writing the best adapter"):  # the next save raises it
        writer.submit("the adapter", tmp_path / "final", lambda: None)


def test_a_run_whose_state_cannot_be_written_stops_with_the_path_and_no_traceback(tiny_cfg, monkeypatch, capsys):
    from medqa_loop.checkpoint import state
    from medqa_loop.cli import main

    cfg = tiny_cfg("train.save_every=2")
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(state.torch, "save", full_disk)
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--config", "tiny", "--set", "train.save_every=2", "--set", f"output_dir={cfg.output_dir}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"medqa train: error: writing the training state of step 2 to {cfg.output_dir}/state/step-2 failed" in err
    assert "No space left on device" in err and "Traceback" not in err


def test_a_state_that_accelerate_save_state_wrote_restores_the_same(tiny_cfg, tmp_path):
    """States of earlier versions hold optimizer.bin and random_states_0.pkl as Accelerate's
    save_state wrote them: the restore reads them the same."""
    from medqa_loop.checkpoint.state import examples_digest

    cfg = tiny_cfg("train.lr=1e-2")
    parts = prepare_run(cfg)
    for p in parts.model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    parts.optimizer.step()
    writer = CheckpointWriter(background=False)
    digest = examples_digest(parts.train_examples)
    ours = StateSaver(cfg, parts.accelerator, parts.model, parts.optimizer, digest).save(Position(3, 0, 3), writer)
    theirs = tmp_path / "theirs" / "state" / "step-3"
    shutil.copytree(ours, theirs)

    def no_model(models, weights, *_):  # the old versions' hook: the base stays out
        models.clear()
        weights.clear()

    handle = parts.accelerator.register_save_state_pre_hook(no_model)
    parts.accelerator.save_state(str(theirs))  # overwrites optimizer.bin and random_states_0.pkl
    handle.remove()
    (theirs / "manifest.json").unlink()
    StateSaver._write_manifest(theirs)
    assert find_state(tmp_path / "theirs", "auto") == theirs

    restored = {}
    for name, path in (("ours", ours), ("theirs", theirs)):
        again = prepare_run(tiny_cfg("train.lr=1e-2", f"output_dir={tmp_path / name}"), resume=str(path))
        restored[name] = (again.optimizer.state_dict()["state"], torch.get_rng_state())
    (ours_moments, ours_rng), (their_moments, their_rng) = restored["ours"], restored["theirs"]
    assert ours_moments.keys() == their_moments.keys() and len(ours_moments) > 0
    for i in ours_moments:
        assert torch.equal(ours_moments[i]["exp_avg_sq"], their_moments[i]["exp_avg_sq"])
    assert torch.equal(ours_rng, their_rng)

"""Which checkpoint of a run holds the state before optimizer step N (medqa_loop.checkpoint.saved),
on run directories laid out by hand: a bundle first, then the training state of step N-1, then the
epoch adapter of an epoch's first step; errors list what exists. Reading real states and bundles,
and replaying from them: tests/debug/test_replay.py."""

import pytest

from medqa_loop.checkpoint.saved import find_saved, read_saved


def layout(run, *dirs):
    for d in dirs:
        (run / d).mkdir(parents=True)
    return run


def test_find_saved_prefers_a_bundle_then_a_state_then_an_epoch_adapter(tmp_path):
    run = layout(tmp_path / "run", "debug/step-13", "state/step-12", "state/step-5", "epoch-1")
    per_epoch = 12
    assert find_saved(run, 13, per_epoch) == run / "debug" / "step-13"
    (run / "debug" / "step-13").rmdir()
    assert find_saved(run, 13, per_epoch) == run / "state" / "step-12"
    (run / "state" / "step-12").rmdir()
    assert find_saved(run, 13, per_epoch) == run / "epoch-1"  # step 13 is epoch 2's first
    assert find_saved(run, 6, per_epoch) == run / "state" / "step-5"


def test_find_saved_lists_what_exists_when_nothing_holds_the_step(tmp_path):
    run = layout(tmp_path / "run", "debug/step-3", "state/step-5", "state/.tmp-step-8", "epoch-1")
    with pytest.raises(ValueError) as err:
        find_saved(run, 9, 12)
    message = str(err.value)
    assert "before step 9: debug bundles exist for steps [3], training states for steps [6], epoch adapters for steps [13]" in message
    assert "snapshot_steps=[9]" in message  # how to get one


def test_read_saved_of_a_directory_holding_nothing_names_it(tmp_path):
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path} holds no adapter_model.safetensors"):
        read_saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    saved = read_saved(tmp_path)
    assert (saved.kind, saved.adapter, saved.optimizer, saved.rng) == ("adapter", tmp_path, None, None)

"""Training states and resume, by fault injection on the tiny CPU model.

Runs are real ``python -m medqa_loop.train`` (``medqa train``) processes of the installed package,
killed by real signals (tests/support/inject_fault.py) and resumed with ``--resume``; a resumed run must end with an adapter
*bitwise* equal to the one of a run that was never interrupted, and with the same metrics.

The run: 16 training pairs cut to 48 tokens, micro-batch 2 x GA 2 = 4 steps per epoch, 2 epochs,
a state every 3 steps and at each epoch end, the newest 2 kept, LoRA dropout 0.1 (so the RNG
state matters).
"""

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medqa_loop.checkpoint.state import (
    Position,
    StateError,
    check_config,
    check_examples,
    find_state,
    state_dirs,
    verify_state,
)
from medqa_loop.config import load_config
from medqa_loop.train import main

from conftest import SUPPORT, TINY, subprocess_env

# Padded micro-batches (not packed rows): the fault points count forwards, 2 per step.
RUN = [
    "--config", TINY, "--set", "data.batching=pad", "--set", "data.max_rows=20", "--set", "data.max_length=48",
    "--set", "train.grad_accum_steps=2", "--set", "train.epochs=2", "--set", "train.save_every=3",
    "--set", "train.keep_states=2", "--set", "train.eval_every=100", "--set", "train.sanity_eval_batches=1",
]


def train(out, *extra, fault=None):
    """The entry point in a subprocess, run beside the run directory (outside the checkout);
    ``fault`` = (SIGNAL, WHERE, N) for tests/support/inject_fault.py."""
    entry = [str(SUPPORT / "inject_fault.py"), *map(str, fault)] if fault else ["-m", "medqa_loop.train"]
    return subprocess.run(
        [sys.executable, *entry, *RUN, "--set", f"output_dir={out}", *extra],
        cwd=out.parent, capture_output=True, text=True, timeout=600, env=subprocess_env(helpers=bool(fault)),
    )


def steps_of(out):
    return [p.name for p in state_dirs(out)]


def assert_same_run(out, ref):
    """Bitwise-equal final adapters, and the same metrics (throughput aside)."""
    got, want = load_file(out / "final" / "adapter_model.safetensors"), load_file(ref / "final" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(want) == 28
    for key in want:
        assert torch.equal(got[key], want[key]), key

    assert metrics(out) == metrics(ref)


def metrics(run):
    """metrics.jsonl without the throughput and timing fields (wall-clock dependent)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(("_per_s", "_time_s"))} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = train(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_reference_run_keeps_the_newest_states_with_their_position(reference):
    assert steps_of(reference) == ["step-8", "step-6"]  # saved at 3, 4, 6, 8; keep_states=2
    assert not list((reference / "state").glob(".tmp-*"))
    info = verify_state(reference / "state" / "step-6")
    assert (info["step"], info["epoch"], info["window"], info["num_processes"]) == (6, 1, 2, 1)
    assert verify_state(reference / "state" / "step-8")["epoch"] == 2  # next would be epoch 3
    saved = load_config(reference / "state" / "step-6" / "config.yaml")
    assert saved.train.save_every == 3 and saved.output_dir == str(reference)
    # The state's adapter is the run's weights after step 8, as final/ is.
    final = load_file(reference / "final" / "adapter_model.safetensors")
    state = load_file(reference / "state" / "step-8" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], state[k]) for k in final)


@pytest.mark.slow
def test_killed_again_and_again_then_resumed_is_bitwise_the_uninterrupted_run(reference, tmp_path):
    """One run dies three ways, each resume picking up where the last left off.

    Steps 1-8 take micro-batches 1-16. Each stage's metrics must already match the reference's for
    the steps it did; the final adapter must match bitwise.
    """
    out = tmp_path / "run"
    ref_metrics = metrics(reference)

    # 1. SIGKILL in the first micro-batch of step 4 (mid-epoch): only the state of step 3 exists.
    killed = train(out, fault=("KILL", "forward", 7))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert steps_of(out) == ["step-3"] and not (out / "final").exists()
    assert metrics(out) == ref_metrics[:5]  # data, sanity eval, steps 1-3

    # 2. Resumed (3 windows of epoch 1 skipped), then SIGKILL while step 6's state is written:
    #    every file but the manifest is there, in a .tmp directory no resume reads. The state is
    #    written in the background, so the loop may have logged step 7 by then.
    killed = train(out, "--resume", "auto", fault=("KILL", "save", 6))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"resuming from {out / 'state' / 'step-3'}: step 3, epoch 1, 3 windows" in killed.stdout
    partial = out / "state" / ".tmp-step-6"
    assert (partial / "optimizer.bin").is_file() and not (partial / "manifest.json").exists()
    assert steps_of(out) == ["step-4", "step-3"]
    logged = metrics(out)
    assert len(logged) >= 9 and logged == ref_metrics[: len(logged)]  # + step 4, its eval, steps 5-6

    # 3. The newest state (step 4) is then truncated on disk: --resume auto says so and takes
    #    step 3. SIGTERM in that run's 3rd micro-batch (step 5): it finishes step 5, saves, exits.
    adapter = out / "state" / "step-4" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])
    stopped = train(out, "--resume", "auto", fault=("TERM", "forward", 3))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "step-4: adapter_model.safetensors is truncated" in stopped.stdout
    assert f"resuming from {out / 'state' / 'step-3'}:" in stopped.stdout
    assert "stopped by SIGTERM after step 5" in stopped.stderr and "--resume auto" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert steps_of(out) == ["step-5", "step-4"] and not list((out / "state").glob(".tmp-*"))
    info = verify_state(out / "state" / "step-5")  # the rewritten step 4 is whole again
    assert (info["step"], info["epoch"], info["window"]) == (5, 1, 1)
    assert not (out / "final").exists()

    # 4. Resumed by path; runs to the end.
    resumed = train(out, "--resume", str(out / "state" / "step-5"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, reference)
    assert steps_of(out) == ["step-8", "step-6"] and not list((out / "state").glob(".tmp-*"))


def test_sigint_finishes_the_window_saves_and_stops(tiny_cfg, monkeypatch):
    """Ctrl-C (a real SIGINT, in this process): the same clean stop, with the state to resume."""
    import medqa_loop.loop as loop
    from medqa_loop.checkpoint.state import Interrupted
    from medqa_loop.train import run

    forward, calls = loop.model_loss_sum, []

    def forward_then_ctrl_c(model, batch):
        calls.append(model.training)
        if calls.count(True) == 3:  # step 2's first micro-batch
            os.kill(os.getpid(), signal.SIGINT)
        return forward(model, batch)

    monkeypatch.setattr(loop, "model_loss_sum", forward_then_ctrl_c)
    # What the process had before the run (SIG_IGN when started in the background, as by nohup).
    before = signal.getsignal(signal.SIGINT)
    cfg = tiny_cfg("data.batching=pad", "data.max_rows=20", "data.max_length=48", "train.grad_accum_steps=2",
                   "train.sanity_eval_batches=0")
    with pytest.raises(Interrupted, match="stopped by SIGINT after step 2") as err:
        run(cfg)
    out = tiny_cfg().output_dir
    assert err.value.path == state_dirs(out)[0] and err.value.signum == signal.SIGINT
    assert steps_of(out) == ["step-2"] and calls.count(True) == 4  # the window was finished
    assert verify_state(err.value.path)["window"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back


# ---------------------------------------------------------------------------------------------
# Damaged states, found and refused without loading anything


@pytest.fixture
def states(reference, tmp_path):
    """A copy of the reference run's state directory to damage."""
    copy = tmp_path / "run"
    shutil.copytree(reference / "state", copy / "state")
    return copy


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: (s / "adapter_model.safetensors").write_bytes((s / "adapter_model.safetensors").read_bytes()[:-7]),
         r"adapter_model\.safetensors is truncated or altered \(\d+ bytes, the manifest says \d+\)"),
        (lambda s: flip_a_byte(s / "optimizer.bin"), r"optimizer\.bin is corrupt \(sha256"),
        (lambda s: (s / "random_states_0.pkl").unlink(), r"random_states_0\.pkl is missing"),
        (lambda s: (s / "manifest.json").unlink(), r"incomplete: no manifest\.json"),
        (lambda s: (s / "manifest.json").write_text('{"files": {"optim'), r"manifest\.json is unreadable"),
    ],
    ids=["truncated", "bit-flip", "file-missing", "no-manifest", "manifest-cut"],
)
def test_a_damaged_state_is_refused_naming_the_file(states, damage, message):
    state = states / "state" / "step-8"
    damage(state)
    with pytest.raises(StateError, match=message) as err:
        verify_state(state)
    assert str(state) in str(err.value)
    verify_state(states / "state" / "step-6")  # the other one is untouched and fine


def test_auto_falls_back_to_the_newest_good_state_and_refuses_when_none_is(states, tmp_path):
    said = []
    flip_a_byte(states / "state" / "step-8" / "optimizer.bin")
    assert find_state(states, "auto", said.append) == states / "state" / "step-6"
    assert len(said) == 1 and "step-8: optimizer.bin is corrupt" in said[0]
    (states / "state" / "step-6" / "manifest.json").unlink()
    with pytest.raises(StateError, match=r"no usable training state.*step-8.*optimizer.*step-6.*manifest"):
        find_state(states, "auto", said.append)
    with pytest.raises(StateError, match="step-6 is incomplete"):
        find_state(states, str(states / "state" / "step-6"))  # an explicit path: no fallback
    with pytest.raises(StateError, match="is a run directory, not a training state"):
        find_state(states, str(states))
    assert find_state(tmp_path / "fresh", "auto", said.append) is None
    assert "no training state" in said[-1] and "starting a new run" in said[-1]


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin"])
def test_a_pickle_weights_only_refuses_is_a_bad_state_and_auto_falls_back(states, name):
    """A file its manifest vouches for, but holding a global torch.load(weights_only=True) does not
    allow (as a state written by other library versions can): refused before the model loads."""
    import fractions

    from medqa_loop.checkpoint.state import StateSaver

    state = states / "state" / "step-8"
    saved = torch.load(state / name, weights_only=False)
    torch.save({**saved, "written_by": fractions.Fraction(1, 3)}, state / name)
    (state / "manifest.json").unlink()
    StateSaver._write_manifest(state)
    message = rf"step-8: {name} does not load with torch\.load\(weights_only=True\) \(Unsupported global: GLOBAL fractions\.Fraction"
    with pytest.raises(StateError, match=message):
        verify_state(state)
    said = []
    assert find_state(states, "auto", said.append) == states / "state" / "step-6"
    assert len(said) == 1 and re.search(message, said[0]) and "trying an older state" in said[0]


def test_a_state_saved_before_a_key_existed_compares_it_at_its_default(reference, tmp_path):
    state = tmp_path / "step-6"
    shutil.copytree(reference / "state" / "step-6", state)
    saved = yaml.safe_load((state / "config.yaml").read_text())
    del saved["data"]["dedupe"]  # as a state of a version before data.dedupe
    (state / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = load_config(reference / "config.yaml", [f"output_dir={reference}"])
    check_config(state, cfg, 1, force=False)
    with pytest.raises(StateError, match=r"data\.dedupe: False -> True"):
        check_config(state, load_config(reference / "config.yaml", ["data.dedupe=true"]), 1, force=False)


def test_auto_rows_resume_in_the_rows_the_state_trained_in(reference, states):
    """data.pack_tokens=auto resolves to the rows the state was trained in, not to a new plan
    (another GPU, other free memory): the same micro-batches, so the same updates; a number that
    differs is refused like any changed key."""
    from medqa_loop.checkpoint.state import StateSaver
    from medqa_loop.train import prepare_run

    state = states / "state" / "step-6"
    saved = yaml.safe_load((state / "config.yaml").read_text())
    assert saved["data"]["pack_tokens"] == 16384  # the CPU's plan, saved resolved
    saved["data"]["pack_tokens"] = 600  # as a GPU's plan might have chosen
    (state / "config.yaml").write_text(yaml.safe_dump(saved))
    (state / "manifest.json").unlink()
    StateSaver._write_manifest(state)
    parts = prepare_run(load_config(reference / "config.yaml", [f"output_dir={states}", "data.pack_tokens=auto"]), resume=str(state))
    assert parts.cfg.data.pack_tokens == 600 and "pack_tokens: 600" in (states / "config.yaml").read_text()
    with pytest.raises(StateError, match=r"data\.pack_tokens: 600 -> 1024"):
        check_config(state, load_config(reference / "config.yaml", ["data.pack_tokens=1024"]), 1, force=False)


def test_restore_puts_back_weights_moments_and_rngs_and_refuses_an_rng_file_it_cannot_apply(reference, states):
    from accelerate.utils import load
    from peft import get_peft_model_state_dict

    from medqa_loop.checkpoint.state import StateSaver
    from medqa_loop.train import prepare_run

    state = states / "state" / "step-6"
    cfg = load_config(reference / "config.yaml", [f"output_dir={states}"])
    parts = prepare_run(cfg, resume=str(state))
    assert parts.start == Position(step=6, epoch=1, window=2)
    saved = load_file(state / "adapter_model.safetensors")
    live = get_peft_model_state_dict(parts.accelerator.unwrap_model(parts.model))
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    moments = load(state / "optimizer.bin")["state"]
    restored = parts.optimizer.state_dict()["state"]
    assert moments.keys() == restored.keys() and len(moments) == 28
    assert all(torch.equal(moments[i]["exp_avg_sq"], restored[i]["exp_avg_sq"]) for i in moments)
    assert torch.equal(torch.get_rng_state(), load(state / "random_states_0.pkl")["torch_manual_seed"])

    # An RNG file that cannot be applied (here: Python's and numpy's generators missing), with a
    # valid manifest, is refused: a run that went on would silently draw other dropout masks.
    torch.save({"torch_manual_seed": torch.manual_seed(99).get_state()}, state / "random_states_0.pkl")
    (state / "manifest.json").unlink()
    StateSaver._write_manifest(state)
    with pytest.raises(StateError, match="step-6: its RNG states could not be restored"):
        prepare_run(cfg, resume=str(state))


# ---------------------------------------------------------------------------------------------
# Resuming into a different run is refused, naming what differs


def test_a_changed_config_is_refused_naming_each_key(reference):
    state = reference / "state" / "step-6"
    base = [f"output_dir={reference}", "data.batching=pad", "data.max_rows=20", "data.max_length=48", "train.grad_accum_steps=2",
            "train.epochs=2", "train.save_every=3", "train.eval_every=100", "train.sanity_eval_batches=1"]
    check_config(state, load_config(TINY, base), 1, force=False)
    # Length, evaluation, saving and profiling cadence, and where it writes may change.
    check_config(state, load_config(TINY, [*base, "train.epochs=3", "train.max_steps=10", "train.eval_every=2",
                                           "train.keep_states=5", "train.profile_steps=[7]", "output_dir=/elsewhere"]),
                 1, force=False)
    changed = load_config(TINY, [*base, "train.lr=0.02", "train.micro_batch_size=1", "lora.r=8"])
    with pytest.raises(StateError) as err:
        check_config(state, changed, 1, force=False)
    for culprit in ("train.lr: 0.01 -> 0.02", "train.micro_batch_size: 2 -> 1", "lora.r: 16 -> 8", "--force-resume"):
        assert culprit in str(err.value)
    assert "train.epochs" not in str(err.value)
    with pytest.raises(StateError, match="number of processes: 1 -> 2"):
        check_config(state, load_config(TINY, base), 2, force=False)
    said = []
    check_config(state, changed, 1, force=True, say=said.append)  # forced: goes on, says what
    assert "--force-resume" in said[0] and "train.lr: 0.01 -> 0.02" in said[0]


def test_changed_training_data_is_refused(reference):
    from medqa_loop.data import encode_pairs, load_pairs, split_pairs
    from medqa_loop.masking import resolve_mask
    from medqa_loop.model import load_tokenizer

    cfg = load_config(reference / "config.yaml")
    tok = load_tokenizer(cfg.model)
    train_pairs, _ = split_pairs(load_pairs(cfg.data), cfg.data.val_fraction, cfg.seed)
    examples = encode_pairs(train_pairs, tok, cfg.data, resolve_mask(cfg.data.mask)).examples
    state = reference / "state" / "step-6"
    check_examples(state, examples, force=False)  # the data it trained on
    examples[3] = {**examples[3], "input_ids": examples[3]["input_ids"][:-1] + [7]}
    with pytest.raises(StateError, match="tokenized training examples differ"):
        check_examples(state, examples, force=False)


def test_resume_cli_rules_fail_before_any_model_load(reference, tmp_path, monkeypatch, capsys):
    import medqa_loop.model as M

    def boom(*a, **k):
        raise AssertionError("model touched")

    for name in ("load_base", "build_random_base", "check_model_source"):
        monkeypatch.setattr(M, name, boom)

    def refused(*args):
        with pytest.raises(SystemExit) as exit_:
            main([*RUN, *args])
        assert exit_.value.code == 2
        return capsys.readouterr().err

    assert "not allowed with argument" in refused("--resume", "auto", "--overwrite")
    assert "--force-resume needs --resume" in refused("--force-resume")
    err = refused("--set", f"output_dir={reference}", "--resume", "auto", "--set", "train.lr=0.5")
    assert "train.lr: 0.01 -> 0.5" in err
    # A state of one run into an output_dir that holds another: refused, not mixed.
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("")
    err = refused("--set", f"output_dir={other}", "--resume", str(reference / "state" / "step-6"))
    assert "holds another run" in err
    # (A run directory with no state to resume starts over with --resume auto:
    # test_resume_auto_after_a_kill_before_the_first_state_starts_over.)


# ---------------------------------------------------------------------------------------------
# What the loop asks the saver after each step


def test_position_after_a_step_moves_to_the_next_epoch_at_its_last_window():
    assert Position.after(5, 1, 1, 4) == Position(step=5, epoch=1, window=1)
    assert Position.after(8, 1, 4, 4) == Position(step=8, epoch=2, window=0)  # epoch 2 starts next
    assert Position.after(1, 0, 1, 1) == Position(step=1, epoch=1, window=0)


def test_a_state_is_due_every_save_every_steps_at_epoch_ends_and_at_the_last_step(tiny_cfg):
    from accelerate import Accelerator

    from medqa_loop.checkpoint.state import StateSaver

    saver = StateSaver(tiny_cfg("train.save_every=3"), Accelerator(), None, None, "digest")
    assert saver.due(Position(3, 0, 3), last=False) and saver.due(Position(6, 1, 2), last=False)
    assert not saver.due(Position(5, 1, 1), last=False)
    assert saver.due(Position(5, 1, 1), last=True)  # train.max_steps reached
    assert saver.due(Position(4, 1, 0), last=False)  # the end of epoch 1
    only_ends = StateSaver(tiny_cfg("train.save_every=null"), Accelerator(), None, None, "digest")
    assert not only_ends.due(Position(3, 0, 3), last=False) and only_ends.due(Position(12, 1, 0), last=False)
    assert saver.signal_received() == 0
    saver.signum = signal.SIGTERM  # what its handler records (stop_on_signals)
    assert saver.signal_received() == signal.SIGTERM


def test_a_state_holds_no_base_weights(tiny_cfg):
    """Accelerate gathers the model's state dict before its save hooks run; the hook clears it too,
    so a state is the adapter, AdamW's moments and the RNGs: ~3x the adapter, never the base."""
    from medqa_loop.train import run

    cfg = tiny_cfg("train.max_steps=1", "train.sanity_eval_batches=0")
    run(cfg)
    (state,) = (Path(cfg.output_dir) / "state").iterdir()
    names = {p.name for p in state.iterdir()}
    assert not names & {"model.safetensors", "pytorch_model.bin"}, names
    assert {"adapter_model.safetensors", "optimizer.bin", "random_states_0.pkl", "manifest.json"} <= names
    adapter = (state / "adapter_model.safetensors").stat().st_size
    assert sum(p.stat().st_size for p in state.iterdir()) < 4 * adapter + 100_000


@pytest.mark.slow
def test_resume_auto_after_a_kill_before_the_first_state_starts_over(tmp_path):
    """SIGKILL in the first step's forward: the directory holds a config and metrics, no state.
    `--resume auto` starts the run over, keeping nothing of the killed one's files."""
    out = tmp_path / "run"
    killed = train(out, fault=("KILL", "forward", 1))
    assert killed.returncode == -signal.SIGKILL and (out / "config.yaml").is_file() and not state_dirs(out)
    (out / "leftover.txt").write_text("from the killed run")
    again = train(out, "--resume", "auto", "--set", "train.epochs=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting a new run" in again.stdout + again.stderr
    records = metrics(out)
    assert [r["step"] for r in records if "data_train_pairs" in r] == [0]  # one run's header, once
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[0] == 1
    assert not (out / "leftover.txt").exists()


@pytest.mark.slow
def test_every_appended_file_is_trimmed_back_to_the_resumed_step(tiny_cfg):
    """Resumed from an older state, the run writes its later steps again: metrics.jsonl,
    samples.jsonl and grad_trace.jsonl each hold every step once, and the same lines as before."""
    from medqa_loop.metrics import read_metrics
    from medqa_loop.train import run

    common = ["train.max_steps=3", "train.eval_every=1", "train.eval_max_batches=1", "train.sample_questions=1",
              "train.sample_max_new_tokens=4", "train.save_every=1", "train.keep_states=3", "debug.enabled=true"]
    cfg = tiny_cfg(*common)
    run(cfg)
    out = Path(cfg.output_dir)
    before = {name: read_metrics(out / name) for name in ("samples.jsonl", "grad_trace.jsonl")}
    run(tiny_cfg(*common), resume=str(out / "state" / "step-1"))
    for name, lines in before.items():
        again = read_metrics(out / name)
        assert [r["step"] for r in again] == [r["step"] for r in lines], name  # no step twice
        if name == "samples.jsonl":
            assert again == lines  # greedy answers: the same text
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_one_live_run_per_directory_and_no_stale_lock_after_a_kill(tmp_path):
    """Real processes: while a run trains, a second into the same directory is refused, with
    --overwrite too, naming the live run's PID and host; the live run is untouched. A SIGKILL
    leaves no stale lock: the next run goes on."""
    import socket
    import time

    out = tmp_path / "run"
    live = subprocess.Popen(
        [sys.executable, "-m", "medqa_loop.train", *RUN, "--set", f"output_dir={out}", "--set", "train.epochs=30"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file():  # the live run holds its directory by then
            assert live.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        for extra in ([], ["--overwrite"]):
            second = train(out, *extra)
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"process {live.pid} on {socket.gethostname()}" in second.stderr and "live run" in second.stderr
        assert live.poll() is None and (out / "config.yaml").is_file()  # not deleted under it
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=60)
    finally:
        if live.poll() is None:
            live.kill()
        live.communicate()
    after = train(out, "--resume", "auto", "--set", "train.epochs=1")
    assert after.returncode == 0, after.stderr[-3000:]

"""The real entry point, as users launch it, in a subprocess run from outside the checkout, so the
installed package is what runs (CPU smoke test)."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil  # an accelerate dependency
import pytest

from conftest import ROOT, TINY, subprocess_env

pytestmark = pytest.mark.slow  # each runs the package in a process of its own


def command(*args, accelerate=True) -> list[str]:
    """``accelerate launch ... -m medqa_loop.train`` (which turns any failure into exit 1), or
    plain ``python -m medqa_loop.train`` to see the entry point's own exit code."""
    prefix = ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml")]
    return [sys.executable, *(prefix if accelerate else []), "-m", "medqa_loop.train", *args]


def launch(*args, cwd, env=None, timeout=600, accelerate=True):
    """``command`` run to its end, its output captured."""
    return subprocess.run(
        command(*args, accelerate=accelerate),
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(**(env or {})),
    )


def test_accelerate_launch_trains_the_tiny_config(tmp_path):
    out = tmp_path / "run"
    proc = launch("--config", TINY, "--set", f"output_dir={out}", "--set", "train.epochs=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 12 and steps[-1]["loss"] < steps[0]["loss"]
    assert (out / "epoch-1" / "adapter_model.safetensors").is_file()
    assert (out / "final" / "adapter_config.json").is_file()
    cfg = json.loads((out / "final" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(out / "base")  # a base that exists
    assert (out / "base" / "model.safetensors").is_file()

    again = launch("--config", TINY, "--set", f"output_dir={out}", cwd=tmp_path, accelerate=False)
    assert again.returncode == 2 and "medqa train: error: output_dir" in again.stderr and "holds another run" in again.stderr


def test_default_recipe_fails_fast_and_clearly_without_a_hub(tmp_path):
    proc = launch("--set", f"output_dir={tmp_path / 'r'}", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"}, timeout=120,
                  accelerate=False)
    assert proc.returncode == 2
    assert "alecocc/mistral-7B-SFT-medqa-graph-cot" in proc.stderr and "local path" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_hub_that_never_answers_costs_seconds_not_a_hang(tmp_path, silent_hub):
    """HF_HUB_OFFLINE unset and a network that accepts connections and never answers: the hub
    client used to wait on the tokenizer forever; now the hub is asked once, for 3 s, and the run
    goes on with local files only, where a hub name fails clearly."""
    start = time.monotonic()
    proc = launch("--set", f"output_dir={tmp_path / 'r'}", cwd=tmp_path, timeout=90, accelerate=False,
                  env={"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None, "HF_ENDPOINT": silent_hub})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.monotonic() - start < 60
    assert f"the hub ({silent_hub}) did not answer within 3 s: using local files only" in proc.stdout
    assert "medqa train: error: cannot load tokenizer 'alecocc/mistral-7B-SFT-medqa-graph-cot'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def ctrl_c_once_stepping(tmp_path):
    """Start a tiny run in a process group of its own, as a shell starts a command; once it has
    made its first optimizer step, press Ctrl-C: SIGINT to the whole group (launcher and training
    process alike). Returns (the started process, its training process, the stderr file), the
    output going to a file: the training process may outlive the launcher. Whatever is left of
    the group is killed after the test."""
    groups = []

    def start(accelerate: bool):
        out, err = tmp_path / "run", tmp_path / "stderr.txt"
        args = ["--config", TINY, "--set", f"output_dir={out}", "--set", "train.sanity_eval_batches=0"]
        with err.open("w") as stderr:
            proc = subprocess.Popen(
                command(*args, accelerate=accelerate), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr,
                env=subprocess_env(), start_new_session=True,
                # SIGINT as an interactive shell leaves it for a command: a test run that is itself
                # a background job of a script (SIGINT ignored there, and the ignoring inherited
                # across exec) would otherwise start a launcher that never sees the Ctrl-C
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        groups.append(proc.pid)
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").is_file() or '"loss"' not in (out / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.2)
        trainer = psutil.Process(proc.pid).children()[0] if accelerate else psutil.Process(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        return proc, trainer, err

    yield start
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:  # all ended, as they should
            pass


def assert_saved_and_said(out, text: str) -> None:
    """One training state saved, and the message naming it with the command to resume."""
    from medqa_loop.checkpoint.state import state_dirs

    (saved,) = state_dirs(out)
    step = saved.name.removeprefix("step-")
    said = f"medqa train: stopped by SIGINT after step {step}; training state saved in {saved}. Resume with"
    assert f"{said} the same command plus --resume auto" in text, text[-3000:]


def test_ctrl_c_stops_medqa_train_cleanly_with_the_resume_command(tmp_path, ctrl_c_once_stepping):
    proc, _, err = ctrl_c_once_stepping(accelerate=False)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    text = err.read_text()
    assert_saved_and_said(tmp_path / "run", text)
    assert "Traceback" not in text


def test_ctrl_c_under_accelerate_launch_ends_as_readme_says(tmp_path, ctrl_c_once_stepping):
    """README, Resuming: the one-process launcher does not wait for its child on Ctrl-C: its own
    KeyboardInterrupt traceback, killed by SIGINT (the shell's 130); the training process still
    finishes its step, saves a state and says how to resume."""
    proc, trainer, err = ctrl_c_once_stepping(accelerate=True)
    assert proc.wait(timeout=60) == -signal.SIGINT
    assert "in simple_launcher" in err.read_text() and "KeyboardInterrupt" in err.read_text()
    trainer.wait(timeout=120)
    assert_saved_and_said(tmp_path / "run", err.read_text())

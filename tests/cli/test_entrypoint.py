"""The real entry point, as users launch it, in a subprocess run from outside the checkout, so the
installed package is what runs (CPU smoke test)."""

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, subprocess_env

pytestmark = pytest.mark.slow  # each runs the package in a process of its own


def launch(*args, cwd, env=None, timeout=600, accelerate=True):
    """``accelerate launch ... -m medqa_loop.train`` (which turns any failure into exit 1), or
    plain ``python -m medqa_loop.train`` to see the entry point's own exit code."""
    prefix = ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_config.yaml")]
    return subprocess.run(
        [sys.executable, *(prefix if accelerate else []), "-m", "medqa_loop.train", *args],
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

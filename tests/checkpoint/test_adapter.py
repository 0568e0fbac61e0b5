"""Adapters (medqa_loop.checkpoint.adapter): what the loop saves is PEFT's layout with its
tokenizer, and an adapter directory resolves to its base and its run's settings, with errors that
name the path before anything is loaded."""

import json
import shutil
from pathlib import Path

import pytest

from medqa_loop.checkpoint.adapter import ADAPTER_WEIGHTS, AdapterError, resolve_adapter


def test_the_loops_adapters_are_peft_directories_with_their_tokenizer(trained_run):
    out = Path(trained_run.output_dir)  # 4 steps: final/ only, no epoch ended
    files = {p.name for p in (out / "final").iterdir()}
    assert {ADAPTER_WEIGHTS, "adapter_config.json", "tokenizer_config.json"} <= files
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == trained_run.lora.r


def test_a_moved_run_finds_its_own_base(trained_run, tmp_path):
    """adapter_config.json records the base path as it was at training time; a run directory
    that was moved still resolves to the base beside it."""
    moved = tmp_path / "moved"
    shutil.copytree(trained_run.output_dir, moved)
    src = resolve_adapter(moved / "final")
    assert src.recorded_base == str(Path(trained_run.output_dir) / "base")
    assert src.base == str(moved / "base")
    assert src.run.data.prompt_template == trained_run.data.prompt_template


def test_resolve_adapter_names_what_is_missing(trained_run, tmp_path):
    with pytest.raises(AdapterError, match=f"adapter directory not found: {tmp_path / 'nope'}"):
        resolve_adapter(tmp_path / "nope")
    with pytest.raises(AdapterError, match="is not a PEFT adapter directory"):
        resolve_adapter(trained_run.output_dir)  # the run directory, not its adapter
    copy = tmp_path / "run" / "final"
    shutil.copytree(Path(trained_run.output_dir) / "final", copy)
    (copy / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterError, match=f"has no {ADAPTER_WEIGHTS}"):
        resolve_adapter(copy)

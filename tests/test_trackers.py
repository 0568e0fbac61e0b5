"""Experiment trackers (train.report_to) through Accelerate: TensorBoard on the tiny run, resume,
validation before anything loads, and no tracker (nor file) when none is asked for."""

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import medqa_loop.train as T
import medqa_loop.trackers as trackers
from medqa_loop.config import ConfigError, load_config
from medqa_loop.metrics import read_metrics

from conftest import TINY

# What a run writes into its directory without trackers (README; best/ with early stopping).
RUN_FILES = {"base", "config.yaml", "final", "metrics.jsonl", "samples.jsonl", "state", "best", "epoch-1"}
# Short and cheap: one validation batch per evaluation, no sampled answers.
FAST = ["train.eval_max_batches=1", "train.sanity_eval_batches=1", "train.sample_questions=0"]


def tiny(out: Path, *overrides: str):
    return load_config(TINY, [f"output_dir={out}", *FAST, *overrides])


def capture_runs(monkeypatch) -> list:
    """Every PreparedRun that medqa_loop.train.run builds, to look at its accelerator afterwards."""
    runs, prepare = [], T.prepare_run

    def keep(*args, **kwargs):
        runs.append(prepare(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(T, "prepare_run", keep)
    return runs


def event_files(out: Path) -> set[Path]:
    """The scalar event files of the run's TensorBoard folder (add_hparams writes its own below it)."""
    return set((out / trackers.PROJECT).glob("events.out.tfevents.*"))


def tracked(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of one event file: tag -> [(step, value)] in the order written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the trackers should hold for these metrics.jsonl records: each number at its step, as
    TensorBoard stores it (float32)."""
    out: dict[str, list] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                out.setdefault(k, []).append((r["step"], float(np.float32(v))))
    return out


# ---------------------------------------------------------------------------------------------
# A run with TensorBoard


@pytest.mark.slow
def test_tensorboard_gets_every_step_and_eval_of_metrics_jsonl_inside_the_run_dir(tmp_path, monkeypatch):
    out = tmp_path / "run"
    runs = capture_runs(monkeypatch)
    T.run(tiny(out, "train.report_to=[tensorboard]", "train.max_steps=4", "train.eval_every=2"))

    (events,) = event_files(out)  # one writer, inside the run directory
    got, records = tracked(events), read_metrics(out / "metrics.jsonl")
    for tag in ("loss", "lr", "grad_norm"):
        assert [s for s, _ in got[tag]] == [1, 2, 3, 4], tag
    assert [s for s, _ in got["eval_loss"]] == [0, 2, 4]  # the sanity eval and every eval_every
    assert got == expected(records)  # every number of every line, equal to float32, nothing else

    # The resolved config, flattened to dotted keys with scalar values, as the run's hparams.
    (hparams,) = (out / trackers.PROJECT).glob("*/hparams.yml")
    logged = yaml.safe_load(hparams.read_text())
    assert logged == trackers.flat_config(yaml.safe_load((out / "config.yaml").read_text()))
    assert logged["lora.r"] == 16 and logged["train.report_to"] == '["tensorboard"]'
    assert logged["model.random_init.hidden_size"] == 128
    (p,) = runs  # end_training closed the writer
    assert [t.name for t in p.accelerator.trackers] == ["tensorboard"]
    assert p.accelerator.trackers[0].writer.all_writers is None


@pytest.mark.slow
def test_a_resumed_run_logs_only_the_steps_after_the_one_it_resumed_from(tmp_path):
    out, shared = tmp_path / "run", ["train.report_to=[tensorboard]", "train.eval_every=2", "train.save_every=2"]
    T.run(tiny(out, *shared, "train.max_steps=2"))  # stops at step 2, with state/step-2
    (first,) = event_files(out)
    T.run(tiny(out, *shared, "train.max_steps=4"), resume="auto")  # goes on to step 4
    (second,) = event_files(out) - {first}

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert tracked(first) == expected([r for r in records if r["step"] <= 2])
    resumed = tracked(second)
    assert resumed == expected([r for r in records if r["step"] > 2])
    assert {s for points in resumed.values() for s, _ in points} == {3, 4}  # steps only increase
    assert [s for s, _ in resumed["eval_loss"]] == [4]


def crashed_run(out: Path, monkeypatch, *overrides):
    """``train.run`` whose loop logs one step and raises: the PreparedRun it made."""
    import medqa_loop.loop

    def crash(run, hooks):
        hooks.log.write(step=1, loss=1.5)
        raise RuntimeError("stopped mid-run")

    monkeypatch.setattr(medqa_loop.loop, "train", crash)
    runs = capture_runs(monkeypatch)
    with pytest.raises(RuntimeError, match="stopped mid-run"):
        T.run(tiny(out, *overrides))
    (p,) = runs
    return p


def test_trackers_finish_when_the_run_stops_with_an_exception(tmp_path, monkeypatch):
    out = tmp_path / "run"
    p = crashed_run(out, monkeypatch, "train.report_to=[tensorboard]")
    assert p.accelerator.trackers[0].writer.all_writers is None  # closed: the events are on disk
    (events,) = event_files(out)
    assert tracked(events)["loss"] == [(1, 1.5)]


def test_without_report_to_no_tracker_starts(tmp_path, monkeypatch):
    """The fast tier's check of the default (the slow test below runs the whole loop)."""
    out = tmp_path / "run"
    p = crashed_run(out, monkeypatch)
    assert p.accelerator.log_with == [] and p.accelerator.trackers == []
    assert {f.name for f in out.iterdir()} == {"base", "config.yaml", "metrics.jsonl"}


# ---------------------------------------------------------------------------------------------
# No tracker asked for


@pytest.mark.slow
def test_no_tracker_is_created_and_nothing_else_is_written_without_report_to(tmp_path, monkeypatch):
    out = tmp_path / "run"
    runs = capture_runs(monkeypatch)
    T.run(tiny(out, "train.max_steps=1", "train.save_every=null"))
    (p,) = runs
    assert p.accelerator.log_with == [] and p.accelerator.trackers == []
    names = {f.name for f in out.iterdir()}
    assert {"base", "config.yaml", "final", "metrics.jsonl", "state"} <= names <= RUN_FILES
    assert not [f for f in tmp_path.rglob("*") if "tfevents" in f.name or f.name in ("wandb", "mlruns")]


# ---------------------------------------------------------------------------------------------
# Validation, before anything is loaded


def no_model(monkeypatch):
    import medqa_loop.model as M

    def boom(*a, **k):
        raise AssertionError("model touched")

    for name in ("load_tokenizer", "load_base", "build_random_base", "check_model_source"):
        monkeypatch.setattr(M, name, boom)


def refused(out: Path, report_to: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        T.main(["--config", TINY, "--set", f"output_dir={out}", "--set", f"train.report_to={report_to}"])
    assert exit_.value.code == 2
    assert not out.exists()  # nothing made, nothing loaded
    return capsys.readouterr().err


def test_an_unknown_tracker_is_a_config_error_naming_the_key_and_the_known_ones(tmp_path, monkeypatch, capsys):
    no_model(monkeypatch)
    with pytest.raises(ConfigError, match=r"'train.report_to'.*'tensorbord'.*known: tensorboard, wandb, mlflow"):
        load_config(TINY, ["train.report_to=[tensorbord]"])
    with pytest.raises(ConfigError, match="unknown tracker 'all'"):  # would start whatever is installed
        load_config(TINY, ["train.report_to=[all]"])
    err = refused(tmp_path / "run", "[tensorboard, neptune]", capsys)
    assert "train.report_to" in err and "'neptune'" in err and "swanlab" in err


@pytest.mark.parametrize("name, install", [
    ("tensorboard", "pip install 'medqa_loop[tensorboard]'"),
    ("wandb", "pip install 'medqa_loop[wandb]'"),
    ("mlflow", "pip install 'medqa_loop[mlflow]'"),
    ("trackio", "pip install 'medqa_loop[trackio]'"),
    ("comet_ml", "pip install comet_ml"),
])
def test_a_tracker_whose_package_is_missing_names_the_extra(name, install, tmp_path, monkeypatch, capsys):
    no_model(monkeypatch)
    real, asked = trackers.find_spec, []

    def find_spec(module, *args):
        asked.append(module)
        return None if module == name else real(module, *args)

    monkeypatch.setattr(trackers, "find_spec", find_spec)
    # Reading a config never asks (an adapter's run config may name a tracker its reader lacks) ...
    assert load_config(TINY, [f"train.report_to=[{name}]"]).train.report_to == [name] and not asked
    # ... training does, before anything is made or loaded.
    with pytest.raises(ConfigError, match=rf"'train.report_to'.*{name}.*{re.escape(install)}"):
        trackers.check_installed([name])
    assert install in refused(tmp_path / "run", f"[{name}]", capsys)
    assert name in asked


def test_checking_a_tracker_looks_its_package_up_and_imports_nothing(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "tensorboard", raising=False)
    load_config(TINY, ["train.report_to=[tensorboard]"])
    assert "tensorboard" not in sys.modules
    assert load_config(TINY).train.report_to == []


def test_the_known_trackers_are_accelerates():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    assert set(trackers.TRACKERS) == set(LOGGER_TYPE_TO_CLASS)


# ---------------------------------------------------------------------------------------------
# Forwarding a record


class Recorder:
    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((step, values))


def test_a_record_is_forwarded_as_its_numbers_at_its_step_and_not_before_a_resumed_step():
    acc = Recorder()
    record = {"step": 3, "loss": 2.5, "target_tokens": 7, "skipped": True, "note": "x", "missing": None}
    trackers.forward(acc, record)
    assert acc.logged == [(3, {"loss": 2.5, "target_tokens": 7, "skipped": 1})]
    assert type(acc.logged[0][1]["skipped"]) is int
    trackers.forward(acc, {"step": 4, "note": "only text"})
    assert len(acc.logged) == 1  # nothing to log, no call
    resumed = Recorder()
    for step in (0, 1, 2, 3):
        trackers.forward(resumed, {"step": step, "loss": 1.0}, start_step=2)
    assert [s for s, _ in resumed.logged] == [3]


def test_the_config_is_flattened_to_dotted_keys_with_scalar_values():
    flat = trackers.flat_config({"a": 1, "b": {"c": [1, 2], "d": {"e": None}, "f": {}}, "g": "x", "h": 0.5})
    assert flat == {"a": 1, "b.c": "[1, 2]", "b.d.e": None, "b.f": "{}", "g": "x", "h": 0.5}

"""Resumable training state: saved atomically, checked before use, restored exactly.

A state holds everything the next optimizer step depends on besides the frozen base and the data:
the LoRA weights, AdamW's moments, every RNG (LoRA dropout draws from torch's) and where the run
stands. The data order is a pure function of (seed, epoch) (``data.epoch_order``) and the lr one
of the step (``optim.lr_at``), so the position is (step, epoch, windows of that epoch done) and
there is no sampler or scheduler to save. Restored at a window boundary, the rest of the run is
bitwise the run that was never stopped (on the CPU; some CUDA kernels are not deterministic).

``<output_dir>/state/step-<N>/`` holds:

  adapter_model.safetensors, adapter_config.json   the LoRA weights (adapter.write_adapter)
  optimizer.bin                                    AdamW's state dict (torch.save)
  random_states_<rank>.pkl                         each process's Python, numpy and torch RNGs
  trainer_state.json                               position, number of processes, data digest
  config.yaml                                      the config the run was going with
  manifest.json                                    size and sha256 of every file; written last

optimizer.bin and random_states_<rank>.pkl are laid out as Accelerate's ``save_state`` writes
them (it wrote the states of earlier versions, which load the same). A save copies all of it to
host memory between two steps; a background thread (checkpoint.writer) writes it as
``state/.tmp-step-<N>``, fsyncs it, then renames it: a crash mid-save leaves a ``.tmp``
directory that is never read, not half a state. A state whose manifest is missing or does not
match its files, or whose pickles ``torch.load(weights_only=True)`` refuses, is refused, naming
the file, and ``--resume auto`` takes the newest state that passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from medqa_loop.checkpoint.adapter import ADAPTER_WEIGHTS, adapter_weights, write_adapter
from medqa_loop.checkpoint.writer import CheckpointWriter, host_copy
from medqa_loop.config import Config, flatten

STATE_DIR = "state"
# The files a run appends a JSON line with a "step" to: trimmed back to a resumed state's step.
APPENDED = ("metrics.jsonl", "samples.jsonl", "grad_trace.jsonl")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
FORMAT = 1
# Keys a resumed run may change: where it writes, how often it evaluates, saves, profiles or
# reports, how long it runs and when it stops, what recomputes in backward (not the values).
# Any other difference changes the updates themselves and is refused without --force-resume.
# (epochs / max_steps change the lr schedule's length from the resumed step on.)
MAY_CHANGE = {
    "output_dir", "train.epochs", "train.max_steps", "train.eval_every", "train.eval_batch_size",
    "train.eval_max_batches", "train.sanity_eval_batches", "train.save_every",
    "train.keep_states", "train.profile_steps", "data.bad_rows", "train.report_to",
    "train.early_stopping_patience", "train.nan_policy", "model.gradient_checkpointing",
    # what the debugger records (its hooks, user code that may change gradients, are not here)
    "debug.enabled", "debug.every", "debug.attribution", "debug.snapshot_steps", "debug.pause_at",
}


class StateError(ValueError):
    """A training state is missing, incomplete, corrupt or belongs to a different run."""


class Interrupted(Exception):
    """SIGTERM/SIGINT: the current window was finished and a state saved; the run stops."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; training state saved in "
            f"{path}. Resume with the same command plus --resume auto (or --resume {path})."
        )


@dataclass(frozen=True)
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next window
    window: int = 0  # windows of that epoch already trained on

    @classmethod
    def after(cls, step: int, epoch: int, windows_done: int, windows_in_epoch: int) -> "Position":
        """Where a run stands after ``step``, the ``windows_done``-th window of ``epoch``."""
        if windows_done == windows_in_epoch:
            return cls(step, epoch + 1, 0)
        return cls(step, epoch, windows_done)


def rng_state() -> dict:
    """torch's RNG states (the CPU's, every GPU's): what LoRA dropout draws from. Cheap: a
    copy of a few kilobytes, no wait for the GPU."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


def rng_file(rng: dict) -> dict:
    """What random_states_<rank>.pkl holds, in Accelerate's layout: ``rng`` (rng_state()) and
    Python's and numpy's generators as they are now."""
    return {
        "random_state": random.getstate(),
        "numpy_random_seed": np.random.get_state(),
        "torch_manual_seed": rng["cpu"],
        "torch_cuda_manual_seed": rng["cuda"],
    }


def set_rngs(path: Path, rank: int) -> None:
    """Put back the generators this process saved in the state at ``path``."""
    from accelerate.utils import load  # torch.load(weights_only=True), numpy's types allowed

    try:
        rng = load(path / f"random_states_{rank}.pkl")
        random.setstate(rng["random_state"])
        np.random.set_state(rng["numpy_random_seed"])
        set_rng_state({"cpu": rng["torch_manual_seed"], "cuda": rng.get("torch_cuda_manual_seed", [])})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise StateError(f"training state {path}: its RNG states could not be restored ({e!r})") from None


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def state_dirs(output_dir: Path) -> list[Path]:
    """The finished states under ``output_dir/state``, newest first (``.tmp-*`` are not)."""
    found = (Path(output_dir) / STATE_DIR).glob("step-*")
    return sorted((p for p in found if re.fullmatch(r"step-\d+", p.name)), key=step_of, reverse=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def examples_digest(examples: list[dict]) -> str:
    """sha256 of the tokenized training examples: the same config over a changed data file,
    tokenizer or mask would train on other tokens, and the config alone cannot tell."""
    rows = [[e["row"], e["input_ids"], e["loss_weights"]] for e in examples]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Checking and finding states


def verify_state(path: Path) -> dict:
    """Check every file of a state against its manifest; return its trainer_state.

    Raises StateError naming the state and the file that is missing, truncated or altered.
    """
    path = Path(path)
    if not path.is_dir():
        raise StateError(f"training state {path} not found")
    if (path / STATE_DIR).is_dir():
        raise StateError(
            f"{path} is a run directory, not a training state: pass one of {path / STATE_DIR}/step-<N>, "
            f"or --resume auto with output_dir={path}"
        )
    if not (path / MANIFEST).is_file():
        raise StateError(
            f"training state {path} is incomplete: no {MANIFEST} (written last, so the save "
            "never finished)"
        )
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        expected = {name: (int(f["bytes"]), str(f["sha256"])) for name, f in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StateError(f"training state {path}: {MANIFEST} is unreadable ({e!r})") from None
    # Every file must be listed; each process's RNG file is, as saved (check_config compares
    # the number of processes).
    needed = {ADAPTER_WEIGHTS, "optimizer.bin", TRAINER_STATE, "config.yaml", "random_states_0.pkl"}
    for name in sorted(needed | expected.keys()):
        file = path / name
        if name not in expected or not file.is_file():
            raise StateError(f"training state {path}: {name} is missing")
        size, digest = expected[name]
        if file.stat().st_size != size:
            raise StateError(
                f"training state {path}: {name} is truncated or altered "
                f"({file.stat().st_size} bytes, the manifest says {size})"
            )
        if _sha256(file) != digest:
            raise StateError(f"training state {path}: {name} is corrupt (sha256 differs from manifest)")
    for name in sorted(expected):
        if name.endswith((".bin", ".pkl")):  # Accelerate's torch.save files
            _check_loads(path, name)
    return json.loads((path / TRAINER_STATE).read_text())


def _check_loads(path: Path, name: str) -> None:
    """A state file must load as restore loads it: torch.load(weights_only=True), with
    Accelerate's allowed globals (accelerate.utils.load). One it refuses (written with other
    library versions, say) is a bad state, found here, before the model loads. Memory-mapped:
    the pickle is checked, the tensors' bytes are not read (the manifest's hash read them)."""
    from accelerate.utils import load

    try:
        load(path / name, map_location="cpu", mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        # torch's own words on what it refused, out of its long advice
        why = re.search(r"WeightsUnpickler error: (.*?)(?:\. |$)", str(e), re.MULTILINE)
        raise StateError(
            f"training state {path}: {name} does not load with torch.load(weights_only=True) "
            f"({why.group(1) if why else str(e).splitlines()[0]})"
        ) from None


def find_state(output_dir: Path, resume: str, say: Callable = print) -> Path | None:
    """The state ``--resume`` names: a path (checked), or ``auto``: the newest good state in
    ``output_dir`` (bad ones are reported and passed over). None: ``auto`` found no state, and
    the run starts over (a run killed before its first state left nothing to continue)."""
    if resume != "auto":
        verify_state(Path(resume))
        return Path(resume)
    problems, root = [], Path(output_dir) / STATE_DIR
    for path in state_dirs(output_dir):
        try:
            verify_state(path)
            return path
        except StateError as e:
            problems.append(str(e))
            say(f"warning: {e}; trying an older state")
    if problems:
        raise StateError(f"no usable training state in {root}: " + "; ".join(problems))
    say(f"no training state in {root}; starting a new run (the directory's earlier files go)")
    return None


def _refuse_or_warn(path: Path, differences: list[str], force: bool, say: Callable) -> None:
    if not differences:
        return
    listed = "; ".join(differences)
    if not force:
        raise StateError(
            f"cannot resume from {path}: the run would not be the one that was stopped ({listed}). "
            "Undo the change, or pass --force-resume to continue anyway."
        )
    say(f"warning: --force-resume: continuing {path} despite {listed}")


def saved_config(path: Path) -> dict:
    """The config the state was trained with, as saved (auto values resolved: data.pack_tokens)."""
    return yaml.safe_load((path / "config.yaml").read_text())


def check_config(path: Path, cfg: Config, num_processes: int, force: bool, say: Callable = print):
    """Refuse a resume whose config differs in a key that changes the updates (MAY_CHANGE aside),
    naming every such key with its old and new value, or run with a different process count.
    data.pack_tokens=auto matches the rows the state trained in (the resumed run keeps them)."""
    old = flatten(saved_config(path))
    new = flatten(cfg.to_dict())
    if new.get("data.pack_tokens") == "auto":
        new["data.pack_tokens"] = old.get("data.pack_tokens")
    # A key added since the state was saved (data.dedupe, say) ran at its default then.
    defaults = flatten(Config().to_dict())
    old.update({key: defaults[key] for key in new.keys() - old.keys() if key in defaults})
    differences = [
        f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
        for key in sorted(old.keys() | new.keys())
        if key not in MAY_CHANGE and old.get(key) != new.get(key)
    ]
    saved_world = json.loads((path / TRAINER_STATE).read_text())["num_processes"]
    if saved_world != num_processes:  # each process's share of every window would change
        differences.append(f"number of processes: {saved_world} -> {num_processes}")
    _refuse_or_warn(path, differences, force, say)


def check_examples(path: Path, examples: list[dict], force: bool, say: Callable = print) -> None:
    """Refuse a resume whose tokenized training data differs from the one the state trained on."""
    saved = json.loads((path / TRAINER_STATE).read_text())["examples_sha256"]
    if saved != examples_digest(examples):
        _refuse_or_warn(
            path, ["the tokenized training examples differ (data file, tokenizer or mask changed)"],
            force, say,
        )


# ---------------------------------------------------------------------------------------------
# Restoring


def restore(path: Path, accelerator, model, optimizer, output_dir: Path) -> Position:
    """Load a checked state into the prepared model and optimizer, restore every RNG of this
    process, and drop metrics lines of steps after it (the resumed run writes them again).

    Call it last before the loop: anything drawing random numbers in between would shift them.
    """
    from accelerate.utils import load
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    info = json.loads((path / TRAINER_STATE).read_text())
    # On the host (safetensors refuses a device named "cpu:0", a CPU process group's), then copied
    # into the parameters where they are.
    weights = load_peft_weights(str(path), device="cpu")
    unexpected = set_peft_model_state_dict(accelerator.unwrap_model(model), weights).unexpected_keys
    if unexpected:
        raise StateError(f"training state {path}: {ADAPTER_WEIGHTS} does not fit this model: {unexpected[:3]}")
    # On the host, then onto each parameter's device by the optimizer itself.
    optimizer.load_state_dict(load(path / "optimizer.bin", map_location="cpu"))
    set_rngs(path, accelerator.process_index)
    position = Position(info["step"], info["epoch"], info["window"])
    if accelerator.is_main_process:
        for name in APPENDED:
            trim_after(Path(output_dir) / name, position.step)
    accelerator.print(
        f"resuming from {path}: step {position.step}, epoch {position.epoch + 1}, "
        f"{position.window} windows of it done"
    )
    return position


def trim_after(path: Path, step: int) -> None:
    """Keep the lines of steps <= ``step`` of a file a run appends to (and drop a line a crash
    cut short): the resumed run writes the later ones again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    path.write_text("".join(f"{line}\n" for line in kept))


# ---------------------------------------------------------------------------------------------
# Saving


class StateSaver:
    """Saves training states for the loop, and turns SIGTERM/SIGINT into "finish this window,
    save a state, stop" (the loop asks ``signal_received`` after every step)."""

    def __init__(self, cfg: Config, accelerator, model, optimizer, examples_sha256: str):
        self.cfg, self.accelerator, self.model, self.optimizer = cfg, accelerator, model, optimizer
        self.examples_sha256 = examples_sha256
        self.root = Path(cfg.output_dir) / STATE_DIR
        self.signum = 0

    def signal_received(self) -> int:
        """The signal any process received during the step (0: none). A collective: every process
        must see the same answer, or one would wait forever in the next one."""
        signum = torch.tensor(self.signum, device=self.accelerator.device)
        return int(self.accelerator.reduce(signum, reduction="max"))

    def due(self, position: Position, last: bool) -> bool:
        """A state is saved every ``train.save_every`` steps, at each epoch end and at the last step."""
        every = self.cfg.train.save_every
        return last or position.window == 0 or (every is not None and position.step % every == 0)

    def save(self, position: Position, writer: CheckpointWriter, rng: dict | None = None, wait: bool = False) -> Path:
        """Save the state at ``position``: copied now, written by ``writer`` (``wait``: on disk
        before this returns). With ``rng`` (``rng_state()`` taken earlier), the torch RNGs as
        they were then: the state of a step before the one that just ran (a non-finite one).
        Every process calls it; the main one writes."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        final = self._dir(position.step)
        rngs = gather_object([rng_file(rng or rng_state())])  # a collective: every process's, in rank order
        if acc.is_main_process:
            files = {
                "adapter": adapter_weights(acc, self.model),
                "optimizer": host_copy(self.optimizer.state_dict()),
                "rngs": rngs,
                TRAINER_STATE: json.dumps({
                    "format": FORMAT, "step": position.step, "epoch": position.epoch,
                    "window": position.window, "num_processes": acc.num_processes,
                    "examples_sha256": self.examples_sha256,
                }, indent=1),
                "config.yaml": yaml.safe_dump(self.cfg.to_dict(), sort_keys=False),
            }
            what = f"the training state of step {position.step}"
            writer.submit(what, final, lambda: self._write(files, position.step))
            if wait:
                writer.wait()
        return final

    def _dir(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def _write(self, files: dict, step: int) -> None:
        """Write what ``save`` copied: every file into ``.tmp-step-<step>``, the manifest last,
        then rename it into place and prune the older states (on the writer's thread)."""
        final = self._dir(step)
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        tmp.mkdir(parents=True)
        write_adapter(self.accelerator, self.model, files["adapter"], tmp)
        torch.save(files["optimizer"], tmp / "optimizer.bin")
        for rank, rng in enumerate(files["rngs"]):
            torch.save(rng, tmp / f"random_states_{rank}.pkl")
        for name in (TRAINER_STATE, "config.yaml"):
            (tmp / name).write_text(files[name])
        self._write_manifest(tmp)
        if final.exists():  # left by a run resumed from an older state
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.root)
        self._prune(step)

    @staticmethod
    def _write_manifest(tmp: Path) -> None:
        """fsync every file, then write the manifest: it exists only once they are all on disk."""
        files = {}
        for file in sorted(tmp.iterdir()):
            _fsync(file)
            files[file.name] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
        with (tmp / MANIFEST).open("w") as f:
            json.dump({"format": FORMAT, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)

    def _prune(self, step: int) -> None:
        """Keep the newest train.keep_states states. States after ``step`` are dropped: they were
        left by the run this one resumed from an older state of, so are no longer its past."""
        states = state_dirs(self.cfg.output_dir)
        newer = [p for p in states if step_of(p) > step]
        older = [p for p in states if step_of(p) <= step][self.cfg.train.keep_states :]
        for path in newer + older + list(self.root.glob(".tmp-step-*")):
            shutil.rmtree(path)

    @contextlib.contextmanager
    def stop_on_signals(self):
        """While training, SIGTERM/SIGINT ask for a stop after the current window (a second one
        acts as usual: SIGTERM kills, Ctrl-C raises KeyboardInterrupt)."""

        def request_stop(signum, frame):
            self.signum = signum
            signal.signal(signum, previous[signum])
            print(
                f"medqa train: {signal.Signals(signum).name}: finishing this step, then saving a "
                "training state (send it again to stop at once)",
                file=sys.stderr, flush=True,
            )

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

"""The state before optimizer step N, read from whichever checkpoint of a run holds it:

  a debug bundle ``debug/step-N/``         weights, optimizer, the window's RNG, its gradients
  a training state ``state/step-<N-1>/``   weights, optimizer, every RNG (checked against its manifest)
  an epoch adapter ``epoch-k/``            weights only (for N = k * steps_per_epoch + 1)

A training state is saved after step N-1's evaluation and checkpoints, which draw no random
numbers, so its RNG is the one step N's dropout draws from, as a bundle's is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from medqa_loop.checkpoint import bundle, state
from medqa_loop.checkpoint.adapter import ADAPTER_WEIGHTS


@dataclass
class SavedStep:
    path: Path
    kind: str  # "debug bundle", "training state" or "adapter"
    adapter: Path  # the directory holding adapter_model.safetensors
    world: int = 1  # processes of the run that saved it
    optimizer: dict | None = None  # AdamW's state dict; None for an adapter
    rng: dict | None = None  # {"cpu": torch RNG state, "cuda": [per device]} at the window's start
    lr: float | None = None  # the step's lr, where the checkpoint records it
    window_rows: set[int] | None = None  # the rows the run's window held (bundles)
    grads: Path | None = None  # the run's gradients of the step (bundles)


def read_saved(path: str | Path) -> SavedStep:
    """Read a bundle, a training state or an adapter directory; errors name what is missing."""
    path = Path(path)
    if (path / bundle.STATE).is_file():
        saved = torch.load(path / bundle.STATE, weights_only=True)
        window = json.loads((path / bundle.WINDOW).read_text()) if (path / bundle.WINDOW).is_file() else None
        rows = {r for mb in window["micro_batches"] for r in mb["rows"]} if window else None
        grads = path / bundle.GRADS
        return SavedStep(
            path, "debug bundle", path / "adapter", saved["world"], saved["optimizer"], saved["rng"],
            saved["lr"], rows, grads if grads.is_file() else None,
        )
    if (path / state.TRAINER_STATE).is_file():
        from accelerate.utils import load

        info = state.verify_state(path)
        rng = load(path / "random_states_0.pkl")
        return SavedStep(
            path, "training state", path, info["num_processes"],
            torch.load(path / "optimizer.bin", weights_only=True),
            {"cpu": rng["torch_manual_seed"], "cuda": rng.get("torch_cuda_manual_seed", [])},
        )
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"checkpoint {path} holds no {ADAPTER_WEIGHTS}")
    return SavedStep(path, "adapter", path)


def find_saved(run: Path, step: int, per_epoch: int) -> Path:
    """The checkpoint of ``run`` holding the state before ``step`` (a bundle first: it also has
    the run's gradients to compare with); an error lists what exists."""
    epoch, rest = divmod(step - 1, per_epoch)
    candidates = [run / "debug" / f"step-{step}", run / state.STATE_DIR / f"step-{step - 1}"]
    if rest == 0:
        candidates.append(run / f"epoch-{epoch}")
    for path in candidates:
        if path.is_dir():
            return path
    bundles = sorted(int(p.name.split("-")[1]) for p in (run / "debug").glob("step-*"))
    states = sorted(state.step_of(p) + 1 for p in state.state_dirs(run))
    epochs = sorted(int(p.name.split("-")[1]) * per_epoch + 1 for p in run.glob("epoch-*"))
    raise ValueError(
        f"no checkpoint in {run} holds the state before step {step}: debug bundles exist for steps "
        f"{bundles}, training states for steps {states}, epoch adapters for steps {epochs}. Rerun "
        f"with --set debug.enabled=true --set 'debug.snapshot_steps=[{step}]'"
    )

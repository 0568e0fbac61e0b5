"""Debug bundles: what recomputing optimizer step N needs besides the run's config, base and data,
saved by the gradient debugger (``debug.snapshot_steps``, or on a non-finite step) under
``<output_dir>/debug/step-<N>/``:

  adapter/            the LoRA weights before step N (PEFT layout)
  state.pt            optimizer state, RNG state at the start of the window, lr, world size
                      (loads with ``torch.load(..., weights_only=True)``)
  window.json         rows and token ids of every micro-batch, why the bundle was written
  grads.safetensors   the gradients backward produced, before hooks and clipping

``medqa_loop.checkpoint.saved`` reads it back for replay.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medqa_loop.batching import Batch
from medqa_loop.checkpoint.adapter import save_adapter

STATE = "state.pt"
WINDOW = "window.json"
GRADS = "grads.safetensors"


def write_bundle(
    path: Path, accelerator, model, optimizer, params: dict[str, torch.nn.Parameter], step: int,
    rng: dict, batches: list[Batch], loss: float, reason: str, info: dict | None = None,
) -> Path:
    """Write the bundle of ``step`` to ``path`` (every process calls it; the main one writes).
    ``rng`` is the RNG state the window's dropout drew from: {"cpu": ..., "cuda": [...]}."""
    from safetensors.torch import save_file

    save_adapter(accelerator, model, path / "adapter")
    if accelerator.is_main_process:
        torch.save(
            {
                "step": step,
                "world": accelerator.num_processes,
                "lr": optimizer.param_groups[0]["lr"],
                "rng": rng,
                "optimizer": optimizer.state_dict(),
            },
            path / STATE,
        )
        grads = {n: p.grad.detach().contiguous() for n, p in params.items() if p.grad is not None}
        save_file(grads, str(path / GRADS))
        window = {
            "step": step,
            "reason": reason,
            "loss": loss,
            "nonfinite": info,
            # This process's micro-batches (all of them on one process), unpadded.
            "micro_batches": [
                {
                    "rows": b["rows"].tolist(),
                    "input_ids": [ids[m.bool()].tolist() for ids, m in zip(b["input_ids"], b["attention_mask"])],
                    "loss_weights": [w[m.bool()].tolist() for w, m in zip(b["loss_weights"], b["attention_mask"])],
                }
                for b in batches
            ],
        }
        (path / WINDOW).write_text(json.dumps(window))
    return path

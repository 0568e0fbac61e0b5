"""Several processes (data parallel through Accelerate's DDP): what one process does not need.

Most of it is arithmetic already in the loop: each accumulation window is ``grad_accum_steps *
world`` micro-batches shared out round-robin (data.accumulation_windows), its target weight is
summed over all processes before the first backward (loop.window_counts), and evaluation shards
the validation split and sums the shards (evaluation.evaluate). Two things need code of their own:

* an epoch's short last window can leave a process without a micro-batch, yet every process must
  enter DDP's gradient all-reduce or the others wait forever (``zero_weight_batch``);
* a launch whose processes do not see each other (``accelerate launch --multi_gpu`` where no GPU
  is visible) would run N independent copies writing the same files (``check_processes``).
"""

from __future__ import annotations

import os

import torch

from medqa_loop.losses import IGNORE_INDEX


class LaunchError(ValueError):
    """The processes the launcher started do not form one distributed run."""


def check_processes(accelerator, environ=os.environ) -> str:
    """Fail if the launcher started more processes than Accelerate joined into one run; return a
    one-line description of the layout for the log."""
    launched = int(environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate "
            f"runs this one alone ({accelerator.distributed_type.value}): each would train on its "
            "own and write the same files. No GPU visible? To run several processes on the CPU, "
            "set ACCELERATE_USE_CPU=1 (README, 'Several GPUs')."
        )
    backend = accelerator.state.backend  # None for a single process
    return (
        f"processes: {accelerator.num_processes} ({accelerator.distributed_type.value}"
        f"{', ' + backend if backend else ''}); main process on {accelerator.device}"
    )


def zero_weight_batch(example: dict, collate_fn, device) -> dict[str, torch.Tensor]:
    """One pair with no loss on any token, for a process with no micro-batch in a window.

    Its backward runs through every LoRA matrix, so the process joins DDP's all-reduce, and
    contributes exactly zero gradient. The window's normaliser is the target weight summed over
    all processes, which this batch does not change, so the update is that of the real pairs.
    """
    batch = {k: v.to(device) for k, v in collate_fn([example]).items()}
    batch["labels"].fill_(IGNORE_INDEX)
    batch["loss_weights"].zero_()
    return batch

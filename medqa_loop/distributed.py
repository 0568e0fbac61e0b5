"""Several processes (data parallel through Accelerate's DDP): what one process does not need.

Most of it is arithmetic already in the loop: each accumulation window is ``grad_accum_steps *
world`` micro-batches shared out round-robin (batching.accumulation_windows), its target weight is
summed over all processes before the first backward (loop.window_counts), and evaluation shards
the validation split and sums the shards (evaluation.evaluate). Two things need code of their
own:

* an epoch's short last window can leave a process without a micro-batch, yet every process must
  enter DDP's gradient all-reduce or the others wait forever (``batching.zero_weight_batch``);
* a launch whose processes do not see each other (``accelerate launch --multi_gpu`` where no GPU
  is visible) would run N independent copies writing the same files (``check_processes``).
"""

from __future__ import annotations

import os


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

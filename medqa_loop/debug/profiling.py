"""torch.profiler around chosen optimizer steps of a run (``train.profile_steps``).

For each listed step N, under ``<output_dir>/profile/`` (``-rank<r>`` added with several processes):

  step-N.json.gz  the Chrome trace (open it in Perfetto or chrome://tracing): every op and kernel
                  on a timeline, CPU and GPU, with the gaps where the GPU waited for the CPU
  step-N.txt      the ops by their own device time (CPU time on a CPU), then one JSON line with
                  the step's wall time and, on a GPU, the time a kernel was running

A recording runs from the end of step N-1 (for step 1: the start of training, the sanity eval
included) to the end of step N (its eval and adapter save included, where step N has them; a
training-state save is not), and the profiler's overhead
lands in that step's ``step_time_s``: read speed from the steps that were not recorded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def report(prof, wall_s: float, rows: int = 45) -> str:
    """The op table of a finished torch.profiler recording, by own device time when there was a
    device, and a JSON line: wall seconds and seconds a kernel was running (a gap between the two
    is time the GPU waited for the CPU)."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    sort = "self_cuda_time_total" if kernels else "self_cpu_time_total"
    summary = {"wall_s": round(wall_s, 4)}
    if kernels:  # an op's own device time repeats its kernels' time: count kernels only
        summary["gpu_kernel_s"] = round(sum(e.self_device_time_total for e in kernels) / 1e6, 4)
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70)
    return f"{table}\n{json.dumps(summary)}\n"


class StepProfiler:
    """Starts a recording before each step in ``steps`` and writes it after (see the module
    docstring). ``start(step)`` / ``stop(step)`` do nothing for steps not listed."""

    def __init__(self, steps: list[int], out_dir: Path, rank: int | None = None):
        self.steps, self.out = set(steps), Path(out_dir)
        self.suffix = "" if rank is None else f"-rank{rank}"
        self.prof, self.started = None, 0.0

    def start(self, step: int) -> None:
        if step not in self.steps or self.prof is not None:
            return
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize()  # the recording starts with no earlier work in flight
        self.prof = profile(activities=activities)
        self.prof.__enter__()
        self.started = time.perf_counter()

    def stop(self, step: int) -> None:
        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels have all run
        wall = time.perf_counter() - self.started
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out / f"step-{step}{self.suffix}.json.gz"))
        (self.out / f"step-{step}{self.suffix}.txt").write_text(report(prof, wall))

"""Experiment trackers through Accelerate (``train.report_to``): which ones, their extras,
starting them, forwarding a record.

``metrics.jsonl`` stays the record that resume, plot and replay read; a tracker gets a copy of
each of its lines (``MetricsLog(forward=...)``): the numbers, at the line's step. Nothing here
imports a tracker's package: Accelerate does that when the tracker starts, so only a tracker the
config names is imported, and only such a tracker can reach the network.
"""

from __future__ import annotations

import json
from functools import partial
from importlib.util import find_spec
from pathlib import Path

from medqa_loop.config import ConfigError, flatten

# Accelerate 1.x's trackers (accelerate.tracking.LOGGER_TYPE_TO_CLASS): name -> (the module it
# needs, what to pip install for it). TensorBoard's tracker writes through
# torch.utils.tensorboard, which needs the tensorboard package.
TRACKERS = {
    "tensorboard": ("tensorboard", "'medqa_loop[tensorboard]'"),
    "wandb": ("wandb", "'medqa_loop[wandb]'"),
    "mlflow": ("mlflow", "'medqa_loop[mlflow]'"),
    "trackio": ("trackio", "'medqa_loop[trackio]'"),
    "comet_ml": ("comet_ml", "comet_ml"),
    "aim": ("aim", "'aim<4'"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
}
# The project every tracker files the run under (wandb/trackio project, mlflow experiment,
# TensorBoard's folder <output_dir>/medqa_loop/).
PROJECT = "medqa_loop"


def _installed(module: str) -> bool:
    try:
        return find_spec(module) is not None  # looks the module up; imports nothing
    except (ImportError, ValueError):
        return False


def check_trackers(names: list[str]) -> None:
    """ConfigError for a name Accelerate has no tracker for (reading a config: nothing is looked up)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"config key 'train.report_to' names an unknown tracker {name!r}; known: {', '.join(TRACKERS)}"
            )


def check_installed(names: list[str]) -> None:
    """ConfigError for a tracker whose package is not installed, naming what to install. Only a
    run that trains asks: an adapter's run config names trackers its reader need not have."""
    for name in names:
        module, install = TRACKERS[name]
        if not _installed(module):
            raise ConfigError(
                f"config key 'train.report_to': the {name} tracker needs the {module} package, "
                f"which is not installed: pip install {install}"
            )


def flat_config(tree: dict) -> dict:
    """The resolved config as trackers take it: dotted keys, scalar values (lists as JSON text)."""
    scalar = (bool, int, float, str)
    return {k: v if v is None or isinstance(v, scalar) else json.dumps(v) for k, v in flatten(tree).items()}


def start_trackers(accelerator, cfg, start_step: int = 0):
    """Start the trackers ``train.report_to`` names (on the main process) with the resolved config
    and return what ``MetricsLog`` forwards each record to; None when none are named.

    ``start_step`` > 0 is a resumed run: the trackers already hold its steps up to there (and
    take only increasing steps), so records up to it are not forwarded again.
    """
    names = list(dict.fromkeys(cfg.train.report_to))
    if not names:
        return None
    # Accelerate leaves out, silently, a tracker it cannot use (e.g. aim >= 4).
    dropped = [n for n in names if n not in {str(t) for t in accelerator.log_with}]
    if dropped:
        raise ConfigError(f"config key 'train.report_to': Accelerate cannot use the {', '.join(dropped)} tracker here")
    run_name = Path(cfg.output_dir).name
    accelerator.init_trackers(
        PROJECT,
        config=flat_config(cfg.to_dict()),
        # Files inside the run directory, under the run's name.
        init_kwargs={"wandb": {"name": run_name, "dir": str(cfg.output_dir)}, "mlflow": {"run_name": run_name}},
    )
    return partial(forward, accelerator, start_step=start_step)


def forward(accelerator, record: dict, start_step: int = 0) -> None:
    """Log a metrics.jsonl record's numbers at its step (Accelerate logs on the main process only)."""
    step = record.get("step")
    if not isinstance(step, int) or (start_step and step <= start_step):
        return
    values = {
        k: int(v) if isinstance(v, bool) else v
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float))
    }
    if values:
        accelerator.log(values, step=step)

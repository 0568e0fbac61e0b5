"""Deterministic replay: recompute one optimizer step of a run and print its per-module table.

    python -m medqa_loop.replay --run RUN_DIR --step N [--checkpoint DIR] [--fresh-dropout]

Needs the state *before* step N, from either
  - a debug bundle ``RUN_DIR/debug/step-N/`` (``debug.snapshot_steps``, or the bundle a
    non-finite step left): LoRA weights, optimizer state, the RNG state the window's dropout drew
    from. On the CPU the replayed gradients are then bitwise equal to the run's (checked against
    the bundle's ``grads.safetensors``) and the table equals the run's ``grad_trace.jsonl`` line;
  - an epoch adapter ``RUN_DIR/epoch-k/`` for step k * steps_per_epoch + 1: the weights only, so
    no update ratios, and with LoRA dropout > 0 other dropout masks than the run drew.
The rest is recomputed, not stored: the run's ``config.yaml`` and base model, the data, and the
window of step N from the pure order functions (data.epoch_order / accumulation_windows).
A multi-process run replays on one process: the same pairs and normaliser, so the same gradient
up to summation order, but not bitwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from medqa_loop.config import Config, ConfigError, DebugConfig, config_from_dict
from medqa_loop.data import DataError, accumulation_windows, epoch_order, load_pairs, split_pairs, steps_per_epoch
from medqa_loop.debug import GradientDebugger, format_table
from medqa_loop.metrics import read_metrics
from medqa_loop.model import ModelLoadError


@dataclass
class Replay:
    trace: dict  # the replayed step, in grad_trace.jsonl's format
    grads: dict[str, torch.Tensor]  # the replayed gradients, before clipping
    source: Path  # the checkpoint it started from
    bitwise_equal: bool | None = None  # vs the bundle's grads.safetensors; None: nothing to compare
    run_trace: dict | None = None  # the run's own grad_trace.jsonl line for this step
    run_metrics: dict | None = None  # the run's metrics.jsonl line for this step
    notes: list[str] = field(default_factory=list)


def load_run_config(run: Path) -> Config:
    path = run / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run} is not a run directory (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()))


def find_checkpoint(run: Path, step: int, per_epoch: int) -> Path:
    """The bundle or epoch adapter holding the state before ``step``; an error lists what exists."""
    bundle = run / "debug" / f"step-{step}"
    if bundle.is_dir():
        return bundle
    epoch, rest = divmod(step - 1, per_epoch)
    if rest == 0 and (run / f"epoch-{epoch}").is_dir():
        return run / f"epoch-{epoch}"
    bundles = sorted(int(p.name.split("-")[1]) for p in (run / "debug").glob("step-*"))
    epochs = sorted(int(p.name.split("-")[1]) * per_epoch + 1 for p in run.glob("epoch-*"))
    raise ValueError(
        f"no checkpoint in {run} holds the state before step {step}: debug bundles exist for steps "
        f"{bundles}, epoch adapters for steps {epochs}. Rerun with --set debug.enabled=true "
        f"--set 'debug.snapshot_steps=[{step}]'"
    )


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, shapes, dtypes and bytes (so NaNs with the same payload count as equal)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8))
        for k in a
    )


def replay(run_dir: str | Path, step: int, checkpoint: str | Path | None = None, fresh_dropout: bool = False) -> Replay:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from medqa_loop.loop import EPS, backward_window, window_batches, window_counts
    from medqa_loop.train import build_parts

    run = Path(run_dir)
    cfg = load_run_config(run)
    t = cfg.train
    if step < 1:
        raise ValueError(f"--step counts optimizer steps from 1, got {step}")
    # Everything that fails fast first: the window of step N and the checkpoint, before the model.
    train_pairs, _ = split_pairs(load_pairs(cfg.data), cfg.data.val_fraction, cfg.seed)
    if checkpoint is None:  # epoch adapters: numbered as on one process
        per_epoch = steps_per_epoch(len(train_pairs), t.micro_batch_size, t.grad_accum_steps)
        source = find_checkpoint(run, step, per_epoch)
    else:
        source = Path(checkpoint)
    state = torch.load(source / "state.pt", weights_only=True) if (source / "state.pt").is_file() else None
    adapter = source / "adapter" if (source / "adapter").is_dir() else source
    if not (adapter / "adapter_model.safetensors").is_file():
        raise ValueError(f"checkpoint {source} holds no adapter_model.safetensors")
    world = state["world"] if state else 1
    per_epoch = steps_per_epoch(len(train_pairs), t.micro_batch_size, t.grad_accum_steps, world)
    epoch, index = divmod(step - 1, per_epoch)
    if epoch >= t.epochs:
        raise ValueError(f"step {step} is past the run's last possible step ({per_epoch * t.epochs})")
    # All processes' micro-batches of the window, in one process.
    window = accumulation_windows(
        epoch_order(len(train_pairs), cfg.seed, epoch), t.micro_batch_size, t.grad_accum_steps * world
    )[index]
    steps = {}  # the run's metrics line per optimizer step
    if (run / "metrics.jsonl").is_file():
        steps = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    if state is not None:
        lr = state["lr"]
    elif step in steps:
        lr = steps[step]["lr"]
    else:
        raise ValueError(f"no lr for step {step}: neither a debug bundle nor {run / 'metrics.jsonl'} records it")

    # The run's own base (random_init runs saved it under RUN_DIR/base), built in a scratch dir.
    if cfg.model.random_init is not None:
        cfg.model.tokenizer = cfg.model.tokenizer or cfg.model.name_or_path
        cfg.model.name_or_path, cfg.model.random_init = str(run / "base"), None
    cfg.debug = DebugConfig(enabled=True, hooks=[])  # trace every step, no hooks, no snapshots
    with tempfile.TemporaryDirectory() as tmp:
        cfg.output_dir = tmp
        parts = build_parts(cfg)
    accelerator, model = parts.accelerator, parts.model
    loaded = set_peft_model_state_dict(accelerator.unwrap_model(model), load_file(adapter / "adapter_model.safetensors"))
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if missing or loaded.unexpected_keys:
        raise ValueError(f"adapter {adapter} does not fit the run's model: missing {missing[:3]}, unexpected {loaded.unexpected_keys[:3]}")
    # The micro-batches the loop ran, built by the loop's own function (packing, grouping).
    batches = window_batches(window, parts.train_examples, cfg, parts.collate_fn, accelerator.device)
    rows = [b["rows"].tolist() for b in batches]
    if (source / "window.json").is_file():
        saved = [mb["rows"] for mb in json.loads((source / "window.json").read_text())["micro_batches"]]
        if not {r for mb in saved for r in mb} <= {r for mb in rows for r in mb}:
            raise ValueError(f"{source}/window.json holds rows {saved}, the recomputed step {step} {rows}: config or data changed?")

    notes = []
    if state is not None:
        parts.optimizer.load_state_dict(state["optimizer"])
        if not fresh_dropout:
            torch.set_rng_state(state["rng"]["cpu"])
            if state["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    elif cfg.lora.dropout > 0:
        notes.append(f"{source} holds no RNG state: LoRA dropout {cfg.lora.dropout} draws other masks than the run did")
    if fresh_dropout and cfg.lora.dropout > 0:
        notes.append("fresh dropout masks (--fresh-dropout): the gradient differs from the run's by the dropout noise")
    if world > 1:
        notes.append(f"the run had {world} processes: replayed on one, equal up to summation order, not bitwise")

    debugger = GradientDebugger(cfg, accelerator, model, parts.optimizer, out_dir=None, guard=False)
    model.train()
    model.zero_grad(set_to_none=True)
    counts = window_counts(accelerator, batches)
    loss_sum = backward_window(accelerator, model, batches, counts[0], debugger.watch(step))
    grads = {n: p.grad.detach().clone() for n, p in debugger.params.items() if p.grad is not None}
    loss = (loss_sum / counts[0].clamp(min=EPS)).item()
    debugger.before_clip(step, model, batches, loss)
    # The loop's clip and step, so the update ratios are the run's (they need its optimizer state).
    for group in parts.optimizer.param_groups:
        group["lr"] = lr
    grad_norm = accelerator.clip_grad_norm_(list(debugger.params.values()), debugger.clip_at)
    if state is not None:
        parts.optimizer.step()
    debugger.after_step(step, {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "target_tokens": int(counts[1])})
    debugger.close()
    trace = debugger.last_trace
    if state is None:
        for m in trace["modules"].values():
            m["update_ratio"] = None  # no optimizer state: the run's update can't be redone

    result = Replay(trace, grads, source, run_metrics=steps.get(step), notes=notes)
    if (source / "grads.safetensors").is_file():
        result.bitwise_equal = bitwise_equal(grads, load_file(source / "grads.safetensors"))
    if (run / "grad_trace.jsonl").is_file():
        result.run_trace = next((r for r in read_metrics(run / "grad_trace.jsonl") if r["step"] == step), None)
    if result.run_metrics and result.run_metrics["target_tokens"] != trace["target_tokens"]:
        notes.append(f"the run logged {result.run_metrics['target_tokens']} target tokens for step {step}, replay has {trace['target_tokens']}: not the same window")
    return result


def report(r: Replay) -> str:
    lines = [f"replay of step {r.trace['step']} from {r.source}", format_table(r.trace)]
    if r.run_metrics is not None:
        lines.append(f"the run logged: loss {r.run_metrics['loss']:.6f}, grad_norm {r.run_metrics['grad_norm']:.6f}")
    if r.bitwise_equal is not None:
        lines.append(f"gradients bitwise equal to the run's ({r.source / 'grads.safetensors'}): {'yes' if r.bitwise_equal else 'NO'}")
    if r.run_trace is not None:
        same = r.run_trace["modules"] == r.trace["modules"]
        lines.append(f"per-module table equal to the run's grad_trace.jsonl line: {'yes' if same else 'NO'}")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="medqa_loop.replay", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the run directory (holds config.yaml)")
    p.add_argument("--step", required=True, type=int, help="optimizer step to recompute, from 1")
    p.add_argument("--checkpoint", help="a debug bundle or adapter directory (default: found in --run)")
    p.add_argument("--fresh-dropout", action="store_true", help="draw new dropout masks instead of the run's")
    args = p.parse_args(argv)
    try:
        print(report(replay(args.run, args.step, args.checkpoint, args.fresh_dropout)))
    except (ConfigError, DataError, ModelLoadError, ValueError) as e:
        print(f"medqa_loop.replay: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

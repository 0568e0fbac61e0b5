"""Deterministic replay: recompute one optimizer step of a run and print its per-module table.

    medqa replay --run RUN_DIR --step N [--checkpoint DIR] [--fresh-dropout]

Needs the state *before* step N (medqa_loop.checkpoint.saved), from
  - a debug bundle ``RUN_DIR/debug/step-N/`` (``debug.snapshot_steps``, or the bundle a
    non-finite step left), or a training state ``RUN_DIR/state/step-<N-1>/``: LoRA weights,
    optimizer state, the RNG state the window's dropout draws from. On the CPU the replayed
    gradients are then bitwise those of the run: checked against a bundle's
    ``grads.safetensors``, and the table equals the run's ``grad_trace.jsonl`` line where it
    has one;
  - an epoch adapter ``RUN_DIR/epoch-k/`` for step k * steps_per_epoch + 1: the weights only, so
    no update ratios, and with LoRA dropout > 0 other dropout masks than the run drew.
The rest is recomputed, not stored: the run's ``config.yaml`` and base model, the data, and the
window of step N from the pure order functions (batching.epoch_order / accumulation_windows).
A multi-process run replays on one process, and a run whose micro-batches were CUDA graphs
(``model.cuda_graphs``) replays eagerly: the same pairs and normaliser, so the same gradient up
to summation order, but not bitwise.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from medqa_loop import hub
from medqa_loop.batching import accumulation_windows, epoch_order, steps_per_epoch, window_batches
from medqa_loop.checkpoint.adapter import ADAPTER_WEIGHTS
from medqa_loop.checkpoint.saved import find_saved, read_saved
from medqa_loop.checkpoint.state import set_rng_state
from medqa_loop.config import Config, ConfigError, DebugConfig, config_from_dict
from medqa_loop.data import load_pairs, split_pairs
from medqa_loop.debug.trace import GradientDebugger, format_table
from medqa_loop.metrics import read_metrics
from medqa_loop.optim import clip_gradients, optimizer_step, set_lr


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

    from medqa_loop.loop import EPS, backward_window, window_counts
    from medqa_loop.train import prepare_run

    run = Path(run_dir)
    cfg = load_run_config(run)
    t = cfg.train
    if step < 1:
        raise ValueError(f"--step counts optimizer steps from 1, got {step}")
    # Everything that fails fast first: the window of step N and the checkpoint, before the model.
    hub.use_local_files_if_unreachable(hub.run_sources(cfg))
    train_pairs, _ = split_pairs(load_pairs(cfg.data), cfg.data.val_fraction, cfg.seed)
    if checkpoint is None:  # epoch adapters: numbered as on one process
        per_epoch = steps_per_epoch(len(train_pairs), t.micro_batch_size, t.grad_accum_steps)
        checkpoint = find_saved(run, step, per_epoch)
    saved = read_saved(checkpoint)
    world = saved.world
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
    if saved.lr is not None:
        lr = saved.lr
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
        parts = prepare_run(cfg)
    accelerator, model = parts.accelerator, parts.model
    adapter = saved.adapter / ADAPTER_WEIGHTS
    loaded = set_peft_model_state_dict(accelerator.unwrap_model(model), load_file(adapter))
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if missing or loaded.unexpected_keys:
        raise ValueError(f"adapter {adapter} does not fit the run's model: missing {missing[:3]}, unexpected {loaded.unexpected_keys[:3]}")
    # The micro-batches the loop ran, built by the loop's own function (packing, grouping).
    batches = window_batches(window, parts.train_examples, parts.cfg, parts.collate_fn, accelerator.device)
    rows = [b["rows"].tolist() for b in batches]
    if saved.window_rows is not None and not saved.window_rows <= {r for mb in rows for r in mb}:
        raise ValueError(
            f"{saved.path} holds rows {sorted(saved.window_rows)}, the recomputed step {step} {rows}: "
            "config or data changed?"
        )

    notes = []
    if saved.optimizer is not None:
        parts.optimizer.load_state_dict(saved.optimizer)
    if saved.rng is not None and not fresh_dropout:
        set_rng_state({"cpu": saved.rng["cpu"], "cuda": saved.rng["cuda"] if torch.cuda.is_available() else []})
    elif saved.rng is None and cfg.lora.dropout > 0:
        notes.append(f"{saved.path} holds no RNG state: LoRA dropout {cfg.lora.dropout} draws other masks than the run did")
    if fresh_dropout and cfg.lora.dropout > 0:
        notes.append("fresh dropout masks (--fresh-dropout): the gradient differs from the run's by the dropout noise")
    if world > 1:
        notes.append(f"the run had {world} processes: replayed on one, equal up to summation order, not bitwise")
    if parts.graphs is not None:  # replay runs eagerly, where the debugger's hooks run
        notes.append("the run replayed its micro-batches as CUDA graphs (model.cuda_graphs, rows padded to a "
                     "multiple of 512 tokens): replayed eagerly, equal up to summation order, not bitwise")

    debugger = GradientDebugger(cfg, accelerator, model, parts.optimizer, out_dir=None, guard=False)
    model.train()
    model.zero_grad(set_to_none=True)
    counts = window_counts(accelerator, batches)
    loss_sum = backward_window(accelerator, model, batches, counts[0], debugger.watch(step))
    grads = {n: p.grad.detach().clone() for n, p in debugger.params.items() if p.grad is not None}
    loss = (loss_sum / counts[0].clamp(min=EPS)).item()
    debugger.before_clip(step, model, batches, loss)
    # The loop's update, so the update ratios are the run's (they need its optimizer state).
    set_lr(parts.optimizer, lr)
    params = list(debugger.params.values())
    if saved.optimizer is not None:
        grad_norm, _ = optimizer_step(accelerator, parts.optimizer, params, t.max_grad_norm, torch.tensor(loss))
    else:
        grad_norm = clip_gradients(accelerator, params, t.max_grad_norm)
    debugger.after_step(step, {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "target_tokens": int(counts[1])})
    debugger.close()
    trace = debugger.last_trace
    if saved.optimizer is None:
        for m in trace["modules"].values():
            m["update_ratio"] = None  # no optimizer state: the run's update can't be redone

    result = Replay(trace, grads, saved.path, run_metrics=steps.get(step), notes=notes)
    if saved.grads is not None:
        result.bitwise_equal = bitwise_equal(grads, load_file(saved.grads))
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

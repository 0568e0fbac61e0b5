"""Gradient debugging: what each optimizer step did to each LoRA module, and which pairs did it.

With ``debug.enabled=true`` the loop calls a ``GradientDebugger`` at three points of each step:

  watch(step)            before the window's backward; returns backward_window's per-micro-batch
                         callback (gradient attribution, which micro-batch a non-finite came from)
  before_clip(...)       after backward, before clipping: the snapshot (``debug.snapshot_steps``),
                         the user hooks (``debug.pause_at``), per-module norms; for a non-finite
                         step, which LoRA output and gradient went non-finite first (a NonFinite
                         the loop adds to its message) and a bundle. The loop's own check stops
                         or skips the step (``train.nan_policy``), debugging on or off
  after_step(...)        after the optimizer step: the ``grad_trace.jsonl`` line

With debugging off the loop has no debugger and calls nothing.

Names: a LoRA matrix is named ``layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>`` (PEFT's wrapper
and adapter name stripped, model.module_name); an 8-bit layer ``layers.<i>.<self_attn|mlp>.<proj>``.
A bundle (medqa_loop.checkpoint.bundle) is saved for snapshot steps and on a non-finite step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch

from medqa_loop.batching import Batch
from medqa_loop.checkpoint.bundle import write_bundle
from medqa_loop.checkpoint.state import rng_state
from medqa_loop.debug.int8 import Int8Outliers
from medqa_loop.losses import target_tokens, target_weight
from medqa_loop.model import module_name, trainable
from medqa_loop.optim import clip_coef

MicroBatchCallback = Callable[[int, Batch, torch.Tensor], None]


@dataclass
class NonFinite:
    """Where a non-finite step's values went non-finite, for the loop's message."""

    message: str  # the first LoRA output and gradient that did, and where the bundle went


# What before_clip passes every pause hook, by name (what load_pause_hooks checks a hook accepts).
HOOK_PARAMS = ("step", "model", "batches")


def load_pause_hooks(debug) -> list[Callable]:
    """The hooks ``debug.hooks`` names, imported only when they will be called: debugging on and
    a ``debug.pause_at`` step set (otherwise nothing is imported). Raises ConfigError naming the
    hook's key when one cannot be imported or cannot be called as fn(step, model, batches)."""
    from medqa_loop.user_code import load_callable

    if not (debug.enabled and debug.pause_at):
        return []
    return [load_callable(spec, f"debug.hooks[{i}]", HOOK_PARAMS) for i, spec in enumerate(debug.hooks)]


def pdb_hook(step: int, model, batches: list[Batch]) -> None:
    """The default pause hook: a pdb prompt after backward, before clipping.

    In scope: ``step``, ``model`` (gradients in ``p.grad``) and ``batches`` (the window's
    micro-batches). ``c`` continues training.
    """
    breakpoint()


class GradientDebugger:
    """Trace, attribution, where a NaN/inf was born, pause hooks and snapshots (module docstring).

    ``out_dir`` None writes no trace and no bundles (replay keeps the trace in ``last_trace``);
    ``guard`` False looks for no non-finite value (replay shows them as they are); ``hooks`` are
    called at the ``debug.pause_at`` steps (load_pause_hooks imports them).
    """

    def __init__(
        self, cfg, accelerator, model, optimizer, out_dir: Path | None, guard: bool = True,
        hooks: Sequence[Callable] = (),
    ):
        self.cfg, self.accelerator, self.model, self.optimizer = cfg.debug, accelerator, model, optimizer
        self.out = Path(out_dir) if out_dir is not None else None
        self.guard = guard
        self.max_grad_norm = cfg.train.max_grad_norm
        self.nan_policy = cfg.train.nan_policy
        self.hooks = list(hooks)
        unwrapped = accelerator.unwrap_model(model)
        self.params = trainable(unwrapped)
        self._bundled_non_finite = False
        self.last_trace: dict | None = None
        self.outliers = Int8Outliers(unwrapped)
        self.outliers.active = False
        self.int8_threshold = cfg.model.llm_int8_threshold if cfg.model.load_in_8bit else 0.0
        self._noted_int8 = False
        self._watching = self._tracing = False
        self._micro = 0
        # (micro-batch, module, finite?) per LoRA output (forward) and LoRA gradient (backward),
        # in the order they happened; kept as tensors so the GPU is not synced per module.
        self._act_flags: list[tuple[int, str, torch.Tensor]] = []
        self._grad_flags: list[tuple[int, str, torch.Tensor]] = []
        self.handles = [p.register_hook(partial(self._on_grad, n)) for n, p in self.params.items()]
        lora_modules = {n.rsplit(".", 1)[0] for n in self.params}
        for name, module in unwrapped.named_modules():
            if module_name(name) in lora_modules and hasattr(module, "base_layer"):
                self.handles.append(module.register_forward_hook(partial(self._on_output, module_name(name))))

    def close(self) -> None:
        """Remove every hook from the model."""
        for handle in self.handles:
            handle.remove()
        self.outliers.remove()

    # -- hooks --------------------------------------------------------------------------------

    def _on_output(self, name: str, module, args, output) -> None:
        if self._watching:
            self._act_flags.append((self._micro, name, torch.isfinite(output).all()))

    def _on_grad(self, name: str, grad: torch.Tensor) -> None:
        if self._watching:
            self._grad_flags.append((self._micro, name, torch.isfinite(grad).all()))

    # -- the loop's three calls ----------------------------------------------------------------

    def watch(self, step: int) -> MicroBatchCallback:
        self._watching, self._micro = True, 0
        self._act_flags.clear()
        self._grad_flags.clear()
        self._rng = rng_state()  # what the window's dropout draws from: a bundle redoes them
        self._tracing = (step - 1) % self.cfg.every == 0
        self._micro_records: list[dict] = []
        self.outliers.reset()
        self.outliers.active = self._tracing
        if self._tracing and self.cfg.attribution:
            self._prev = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in self.params.items()}
        return self._after_micro_batch

    def _after_micro_batch(self, i: int, batch: Batch, micro_loss: torch.Tensor) -> None:
        """After micro-batch i's backward: its share of the window's gradient (traced steps).

        On several processes each sees its own micro-batches, and the last one's share also
        carries the all-reduce (DDP syncs on the window's last backward).
        """
        self._micro = i + 1
        if not (self._tracing and self.cfg.attribution):
            return
        sq = torch.zeros((), dtype=torch.float64, device=micro_loss.device)
        for name, p in self.params.items():
            grad = torch.zeros_like(p) if p.grad is None else p.grad.detach()
            sq += (grad - self._prev[name]).double().pow(2).sum()
            self._prev[name] = grad.clone()
        weight = float(target_weight(batch))
        self._micro_records.append({
            "rows": batch["rows"].tolist(),
            "target_tokens": int(target_tokens(batch)),
            "loss": float(micro_loss) / weight if weight > 0 else None,  # its weighted mean
            "grad_norm": math.sqrt(float(sq)),  # norm of what it added to the window's gradient
        })

    def before_clip(self, step: int, model, batches: list[Batch], loss: torch.Tensor | float) -> NonFinite | None:
        """Snapshot, hooks, per-module norms; for a non-finite step, where it went non-finite
        (the loop decides what to do with the step: train.nan_policy)."""
        self._watching = self.outliers.active = False
        loss = float(loss)  # the loop hands over the GPU tensor: only debug mode waits for it here
        if step in self.cfg.snapshot_steps:
            self._save_bundle(step, batches, loss, reason="snapshot")
        if step in self.cfg.pause_at:
            for hook in self.hooks:
                hook(step, model, batches)
        norms = torch.stack([
            p.grad.detach().float().norm() if p.grad is not None else torch.zeros((), device=p.device)
            for p in self.params.values()
        ])
        finding = None
        if self.guard and not (math.isfinite(loss) and bool(torch.isfinite(norms).all())):
            finding = self._non_finite(step, batches, loss, norms)
        if self._tracing:
            self._grad_norms = dict(zip(self.params, norms.tolist()))
            self._before = {n: p.detach().clone() for n, p in self.params.items()}
        return finding

    def after_step(self, step: int, record: dict, skipped: bool = False) -> None:
        """Write the trace line of a traced step from its metrics ``record``."""
        if not self._tracing:
            return
        trace = {
            "step": step,
            "loss": record["loss"],
            "target_tokens": record["target_tokens"],
            "lr": record["lr"],
            "grad_norm": record["grad_norm"],
            # A skipped step applied no update: coefficient 0.
            "clip_coef": 0.0 if skipped else clip_coef(record["grad_norm"], self.max_grad_norm),
            "modules": self._module_table(),
        }
        if self.cfg.attribution:
            trace["micro_batches"] = self._micro_records
        if self.outliers.columns:
            trace["int8_outliers"] = self.outliers.counts()
        elif self.outliers.handles and self.int8_threshold > 0 and not self._noted_int8:
            self._noted_int8 = True
            self.accelerator.print(
                "debug: bitsandbytes did not take its LLM.int8 outlier path in this step's training "
                "forwards (on the CPU it multiplies dequantized weights in fp32): no outlier columns to report"
            )
        if skipped:
            trace["skipped"] = True
        self.last_trace = trace
        if self.out is not None and self.accelerator.is_main_process:
            with (self.out / "grad_trace.jsonl").open("a") as f:
                f.write(json.dumps(trace) + "\n")

    def _module_table(self) -> dict[str, dict]:
        table = {}
        for name, p in self.params.items():
            before = self._before[name]
            weight = float(before.float().norm())
            update = float((p.detach() - before).float().norm())
            table[name] = {
                "grad_norm": self._grad_norms[name],
                "weight_norm": weight,
                # LoRA B starts at 0: its first update has no ratio (null).
                "update_ratio": update / weight if weight > 0 else None,
            }
        return table

    # -- the NaN/inf guard ---------------------------------------------------------------------

    def _first_bad(self, flags: list[tuple[int, str, torch.Tensor]]) -> tuple[int, str] | None:
        if not flags:
            return None
        bad = (~torch.stack([f for _, _, f in flags])).nonzero()
        return flags[int(bad[0])][:2] if len(bad) else None

    def _non_finite(self, step: int, batches: list[Batch], loss: float, norms: torch.Tensor) -> NonFinite:
        forward = self._first_bad(self._act_flags)
        backward = self._first_bad(self._grad_flags)
        if backward is None:  # backward's gradients were finite: did something change them after?
            name = next((n for n, v in zip(self.params, norms.tolist()) if not math.isfinite(v)), None)
            backward = None if name is None else (None, name)

        def where(found):
            if found is None:
                return None
            micro, name = found
            rows = batches[micro]["rows"].tolist() if micro is not None else None
            return {"module": name, "micro_batch": micro, "rows": rows}

        info = {"loss": loss, "forward": where(forward), "backward": where(backward)}
        text = f"first non-finite LoRA output (forward): {_describe(info['forward'])}" if forward is not None else ""
        text += f"{'; ' if text else ''}first non-finite LoRA gradient (backward): {_describe(info['backward'])}"
        # One bundle a run: under train.nan_policy=skip a diverged run would write one per step.
        if not self._bundled_non_finite and (path := self._save_bundle(step, batches, loss, "non-finite", info)):
            self._bundled_non_finite = True
            text += f"; its state, window and gradients are in {path} (medqa replay --run {self.out} --step {step})"
        return NonFinite(text)

    def _save_bundle(self, step: int, batches: list[Batch], loss: float, reason: str, info=None) -> Path | None:
        if self.out is None:
            return None
        return write_bundle(
            self.out / "debug" / f"step-{step}", self.accelerator, self.model, self.optimizer,
            self.params, step, self._rng, batches, loss, reason, info,
        )


def _describe(where: dict | None) -> str:
    if where is None:
        return "none"
    micro = "" if where["micro_batch"] is None else f" in micro-batch {where['micro_batch']}, rows {where['rows']}"
    return f"{where['module']}{micro}"


def build_debugger(
    cfg, accelerator, model, optimizer, out_dir: Path, hooks: Sequence[Callable] = ()
) -> GradientDebugger | None:
    return GradientDebugger(cfg, accelerator, model, optimizer, out_dir, hooks=hooks) if cfg.debug.enabled else None


def format_table(trace: dict) -> str:
    """A grad_trace line as a readable table (what ``medqa replay`` prints)."""

    def num(v):
        return "null" if v is None else f"{v:.4e}"

    lines = [
        f"step {trace['step']}: loss {trace['loss']:.6f}, target tokens {trace['target_tokens']}, "
        f"lr {trace['lr']:.3e}, grad_norm {trace['grad_norm']:.6f} (pre-clip), clip_coef {trace['clip_coef']:.4f}",
        f"{'module':<40} {'grad_norm':>11} {'weight_norm':>11} {'update_ratio':>12}",
    ]
    for name, m in trace["modules"].items():
        lines.append(f"{name:<40} {num(m['grad_norm']):>11} {num(m['weight_norm']):>11} {num(m['update_ratio']):>12}")
    for i, mb in enumerate(trace.get("micro_batches", [])):
        loss = "all masked" if mb["loss"] is None else f"loss {mb['loss']:.4f}"
        lines.append(
            f"micro-batch {i}: rows {mb['rows']}, {mb['target_tokens']} target tokens, {loss}, "
            f"gradient contribution {mb['grad_norm']:.4e}"
        )
    for name, cols in trace.get("int8_outliers", {}).items():
        lines.append(f"int8 outlier columns {name}: {cols}")
    return "\n".join(lines)

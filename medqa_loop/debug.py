"""Gradient debugging: what each optimizer step did to each LoRA module, and which pairs did it.

With ``debug.enabled=true`` the loop hands its steps to a ``GradientDebugger`` at three points:

  watch(step)            before the window's backward; returns backward_window's per-micro-batch
                         callback (gradient attribution, which micro-batch a non-finite came from)
  before_clip(...)       after backward, before clipping: the snapshot (``debug.snapshot_steps``),
                         the user hooks (``debug.pause_at``), the NaN/inf guard, per-module norms
  after_step(...)        after the optimizer step: the ``grad_trace.jsonl`` line

With debugging off the loop gets ``Debugger()``, whose methods do nothing.

Names: a LoRA matrix is named ``layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>`` (PEFT's wrapper
and adapter name stripped); an 8-bit layer ``layers.<i>.<self_attn|mlp>.<proj>``.

A state bundle (``<output_dir>/debug/step-<N>/``, written for snapshot steps and on a non-finite
step) holds what recomputing step N needs besides the run's config and base model: ``adapter/``
(the LoRA weights before step N, PEFT layout), ``state.pt`` (optimizer state, RNG state at the
start of the window, lr, world size; loads with ``torch.load(..., weights_only=True)``),
``window.json`` (rows and token ids of every micro-batch) and ``grads.safetensors`` (the
gradients backward produced, before hooks and clipping).
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from medqa_loop.losses import target_tokens, target_weight

Batch = dict[str, torch.Tensor]
MicroBatchCallback = Callable[[int, Batch, torch.Tensor], None]


class NonFiniteError(ValueError):
    """A non-finite loss or gradient stopped the run; the message says where and what was saved."""


def module_name(name: str) -> str:
    """'base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight' -> 'layers.0.mlp.up_proj.lora_A'."""
    parts = name.split(".")
    while parts and parts[0] in ("module", "base_model", "model"):  # DDP, PEFT and HF wrappers
        parts = parts[1:]
    if parts and parts[-1] == "weight":
        parts.pop()
    if len(parts) >= 2 and parts[-2].startswith("lora_"):
        parts.pop()  # PEFT's adapter name ("default")
    if parts and parts[-1] == "base_layer":
        parts.pop()
    return ".".join(parts)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters (the LoRA matrices) by module name, in model order."""
    return {module_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def clip_coef(grad_norm: float, max_norm: float) -> float:
    """The factor clipping multiplied the gradients by (torch.nn.utils.clip_grad_norm_'s formula)."""
    return min(1.0, max_norm / (grad_norm + 1e-6))


def pdb_hook(step: int, model, batches: list[Batch]) -> None:
    """The default pause hook: a pdb prompt after backward, before clipping.

    In scope: ``step``, ``model`` (gradients in ``p.grad``) and ``batches`` (the window's
    micro-batches). ``c`` continues training.
    """
    breakpoint()


def schedule_warnings(train_cfg, total_steps: int) -> list[str]:
    """Warnings about a warmup or an eval interval that is long for this run's step count."""
    t, messages = train_cfg, []
    if t.warmup_steps >= total_steps:
        messages.append(
            f"train.warmup_steps={t.warmup_steps} is not shorter than the run's {total_steps} "
            f"optimizer steps: the learning rate never reaches train.lr={t.lr:g}"
        )
    elif t.warmup_steps > total_steps / 4:
        messages.append(
            f"train.warmup_steps={t.warmup_steps} is {100 * t.warmup_steps / total_steps:.0f}% of "
            f"the run's {total_steps} optimizer steps"
        )
    if t.eval_every > total_steps / 2:
        messages.append(
            f"train.eval_every={t.eval_every} evaluates {total_steps // t.eval_every} time(s) in "
            f"the run's {total_steps} optimizer steps, besides epoch ends"
        )
    return messages


class Int8Outliers:
    """Per 8-bit layer, the activation columns LLM.int8 split off into its fp16 matmul.

    bitsandbytes stores the outlier columns it used (``|x| >= llm_int8_threshold`` anywhere in
    the column) in ``module.state.idx``; we clear it before each forward and read it after, so a
    layer appears only when that path really ran. bitsandbytes 0.50 takes it on CUDA, and on the
    CPU only in eval mode: CPU training dequantizes the weights and multiplies in fp32.
    With a threshold of 0 there is no outlier split, so nothing is recorded.
    """

    def __init__(self, model):
        from medqa_loop.model import is_int8_linear

        self.active = True
        self.columns: dict[str, set[int]] = {}
        self.handles = []
        for name, module in model.named_modules():
            if is_int8_linear(module):
                self.handles.append(module.register_forward_pre_hook(self._clear))
                self.handles.append(module.register_forward_hook(partial(self._record, module_name(name))))

    @staticmethod
    def _clear(module, args) -> None:
        module.state.idx = None

    def _record(self, name: str, module, args, output) -> None:
        if self.active and module.state.idx is not None:
            self.columns.setdefault(name, set()).update(module.state.idx.tolist())

    def counts(self) -> dict[str, int]:
        return {name: len(cols) for name, cols in self.columns.items()}

    def reset(self) -> None:
        self.columns = {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Debugger:
    """Debugging off: the loop's calls cost nothing."""

    def watch(self, step: int) -> MicroBatchCallback | None:
        return None

    def before_clip(self, step: int, model, batches: list[Batch], loss: torch.Tensor | float) -> None:
        pass

    def after_step(self, step: int, record: dict) -> dict:
        return {}


OFF = Debugger()


class GradientDebugger(Debugger):
    """Trace, attribution, NaN/inf guard, pause hooks and snapshots (see the module docstring).

    ``out_dir`` None writes no trace and no bundles (replay keeps the trace in ``last_trace``);
    ``guard`` False lets non-finite steps through (replay shows them instead of stopping).
    """

    def __init__(self, cfg, accelerator, model, optimizer, out_dir: Path | None, guard: bool = True):
        from medqa_loop.plugins import load_callable

        self.cfg, self.accelerator, self.model, self.optimizer = cfg.debug, accelerator, model, optimizer
        self.out = Path(out_dir) if out_dir is not None else None
        self.guard = guard
        self.clip_at = cfg.train.max_grad_norm or math.inf  # 0 = no clipping, as in the loop
        self.hooks = [load_callable(spec, "hook") for spec in self.cfg.hooks]
        unwrapped = accelerator.unwrap_model(model)
        self.params = trainable(unwrapped)
        self.skipped = 0
        self.last_trace: dict | None = None
        self.outliers = Int8Outliers(unwrapped)
        self.outliers.active = False
        self.int8_threshold = cfg.model.llm_int8_threshold if cfg.model.load_in_8bit else 0.0
        self._noted_int8 = False
        self._watching = self._tracing = False
        self._micro = 0
        self._skip_norm: float | None = None  # the pre-skip gradient norm of a skipped step
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
        self._skip_norm = None
        # The RNG state the window's dropout draws from: what a bundle needs to redo them.
        self._rng = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
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

    def before_clip(self, step: int, model, batches: list[Batch], loss: torch.Tensor | float) -> None:
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
        if self.guard and not (math.isfinite(loss) and bool(torch.isfinite(norms).all())):
            self._non_finite(step, batches, loss, norms)
        if self._tracing:
            self._grad_norms = dict(zip(self.params, norms.tolist()))
            self._before = {n: p.detach().clone() for n, p in self.params.items()}

    def after_step(self, step: int, record: dict) -> dict:
        """Write the trace line of a traced step; return fields to add to the metrics line."""
        extra = {}
        if self._skip_norm is not None:
            extra = {"grad_norm": self._skip_norm, "skipped_nonfinite": self.skipped}
        if not self._tracing:
            return extra
        grad_norm = extra.get("grad_norm", record["grad_norm"])
        trace = {
            "step": step,
            "loss": record["loss"],
            "target_tokens": record["target_tokens"],
            "lr": record["lr"],
            "grad_norm": grad_norm,
            # A skipped step applied no update: coefficient 0.
            "clip_coef": 0.0 if extra else clip_coef(grad_norm, self.clip_at),
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
        if extra:
            trace["skipped"] = True
        self.last_trace = trace
        if self.out is not None and self.accelerator.is_main_process:
            with (self.out / "grad_trace.jsonl").open("a") as f:
                f.write(json.dumps(trace) + "\n")
        return extra

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

    def _non_finite(self, step: int, batches: list[Batch], loss: float, norms: torch.Tensor) -> None:
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
        text = f"non-finite loss or gradient at step {step} (loss {loss})"
        if forward is not None:
            text += f"; first non-finite LoRA output (forward): {_describe(info['forward'])}"
        text += f"; first non-finite LoRA gradient (backward): {_describe(info['backward'])}"
        if self.cfg.nan_policy == "stop":
            path = self._save_bundle(step, batches, loss, "non-finite", info)
            raise NonFiniteError(
                f"{text}. Stopped before the optimizer step; state, window and gradients saved in "
                f"{path} (replay: python -m medqa_loop.replay --run {self.out} --step {step})"
            )
        self.skipped += 1
        if self.skipped == 1:  # one bundle: a diverged run would otherwise write one per step
            text += f"; state saved in {self._save_bundle(step, batches, loss, 'non-finite', info)}"
        self._skip_norm = float(norms.double().norm())
        for p in self.params.values():
            p.grad = None  # AdamW skips parameters without a gradient: no update, no decay
        self.accelerator.print(f"debug: skipped step ({self.skipped} so far): {text}")

    def _save_bundle(self, step: int, batches: list[Batch], loss: float, reason: str, info=None) -> Path | None:
        if self.out is None:
            return None
        from safetensors.torch import save_file

        from medqa_loop.checkpoint import save_adapter

        path = self.out / "debug" / f"step-{step}"
        save_adapter(self.accelerator, self.model, path / "adapter")
        if self.accelerator.is_main_process:
            torch.save(
                {
                    "step": step,
                    "world": self.accelerator.num_processes,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "rng": self._rng,
                    "optimizer": self.optimizer.state_dict(),
                },
                path / "state.pt",
            )
            grads = {n: p.grad.detach().contiguous() for n, p in self.params.items() if p.grad is not None}
            save_file(grads, str(path / "grads.safetensors"))
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
            (path / "window.json").write_text(json.dumps(window))
        return path


def _describe(where: dict | None) -> str:
    if where is None:
        return "none"
    micro = "" if where["micro_batch"] is None else f" in micro-batch {where['micro_batch']}, rows {where['rows']}"
    return f"{where['module']}{micro}"


def build_debugger(cfg, accelerator, model, optimizer, out_dir: Path) -> Debugger:
    return GradientDebugger(cfg, accelerator, model, optimizer, out_dir) if cfg.debug.enabled else OFF


def format_table(trace: dict) -> str:
    """A grad_trace line as a readable table (what ``medqa_loop.replay`` prints)."""

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

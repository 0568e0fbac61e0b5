"""Optimizer, learning-rate schedule, gradient clipping: the update, written once.

The schedule is a pure function of the optimizer step, set on the param groups by the loop before
each step (nanoGPT-style) instead of a ``LambdaLR``: nothing to save or restore besides the step,
and no prepared-scheduler surprise (Accelerate's ``AcceleratedScheduler`` steps once per process
unless told otherwise).
"""

from __future__ import annotations

import torch


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then linear decay.

    Like transformers' ``get_linear_schedule_with_warmup`` but shifted by one step, so the first
    update is not wasted at lr 0: step k < warmup gets base * (k+1)/warmup; after warmup the rate
    falls linearly and reaches 0 only after the last step.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    remaining = max(total_steps - step, 0)
    return base_lr * remaining / max(total_steps - warmup_steps, 1)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (the LoRA matrices); the frozen base has none.

    Weight decay applies to matrices, not to 1-D parameters (biases, norms) should a user make
    those trainable: the usual convention, and what HF's Trainer does.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (did LoRA attach to any module?)")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused implementation, on CUDA and the CPU alike: the whole update in a few kernel
    # launches, where the default (foreach) makes a dozen multi-tensor passes per group, on the
    # CPU time that a 7B step is short of (BENCHMARKS.md); and it takes ``found_inf``, which lets
    # optimizer_step drop a non-finite update without waiting for the GPU. Same state dict.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)


def clip_limit(max_grad_norm: float) -> float:
    """The norm clipping clips to: ``train.max_grad_norm``, where 0 means "don't clip" (clipping
    at 0 would zero every update; the norm is still computed and logged)."""
    return max_grad_norm if max_grad_norm > 0 else float("inf")


def clip_coef(grad_norm: float, max_grad_norm: float) -> float:
    """The factor clipping multiplied the gradients by (torch.nn.utils.clip_grad_norm_'s formula)."""
    return min(1.0, clip_limit(max_grad_norm) / (grad_norm + 1e-6))


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_grad_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to ``train.max_grad_norm``; return the pre-clip global
    norm (a GPU tensor: reading it waits for the GPU)."""
    return accelerator.clip_grad_norm_(params, clip_limit(max_grad_norm))


def optimizer_step(
    accelerator, optimizer, params: list[torch.nn.Parameter], max_grad_norm: float, loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The update, after a window's backward: clip, AdamW step, drop the gradients. Returns the
    pre-clip norm and whether the step was finite, as device tensors: nothing here waits for the
    GPU. A step whose ``loss`` or gradient norm is not finite applies no update at all (no
    decay, no moment update, AdamW's step count unchanged): fused AdamW skips it on the device
    when its ``found_inf`` is 1, as it does for GradScaler. The loop, replay and the benchmarks
    step through this one function."""
    grad_norm = clip_gradients(accelerator, params, max_grad_norm)
    finite = torch.isfinite(grad_norm) & torch.isfinite(loss)
    adamw = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    adamw.found_inf = (~finite).to(torch.float32)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


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


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

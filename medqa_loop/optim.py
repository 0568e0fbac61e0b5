"""Optimizer and learning-rate schedule.

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
    # On CUDA the fused implementation: the whole update in a few kernel launches, where the
    # default (foreach) makes a dozen multi-tensor passes per group, 19 ms of CPU time a step on
    # the H100 host (BENCHMARKS.md, run H). Same maths, same state dict.
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None)

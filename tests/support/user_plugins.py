"""Masks and debug hooks the tests select by import path (``user_plugins:name``), as a user's
own module would be: tests/support is on sys.path under pytest (tests/conftest.py)."""

import torch

from medqa_loop.masking import MaskInput, completion_only


def even_rows_only(ex: MaskInput) -> list[float]:
    """completion_only for pairs from even dataset rows; odd rows are masked out entirely."""
    return completion_only(ex) if ex.row % 2 == 0 else [0.0] * len(ex.input_ids)


def completion_x3(ex: MaskInput) -> list[float]:
    """completion_only times 3: the normalised loss, hence the gradient, must not change."""
    return [3.0 * w for w in completion_only(ex)]


def answer_as_bools(ex: MaskInput) -> list[bool]:
    """completion_only as a boolean mask."""
    return [i >= ex.prompt_len for i in range(len(ex.input_ids))]


CALLS: list[dict] = []


def record(step, model, batches):
    """Record what a pause hook is given: the step, the window's rows, the gradient's norm."""
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    CALLS.append({
        "step": step,
        "rows": [b["rows"].tolist() for b in batches],
        "grad_norm": float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))),
    })


def _param(model, suffix: str) -> torch.nn.Parameter:
    return next(p for n, p in model.named_parameters() if n.endswith(suffix))


def poison_grad(step, model, batches):
    """A transient NaN: one entry of one gradient, after backward."""
    _param(model, "layers.0.mlp.up_proj.lora_B.default.weight").grad[0, 0] = float("nan")


def poison_weight(step, model, batches):
    """A lasting NaN: one LoRA weight entry, so the next forward goes non-finite at that module."""
    with torch.no_grad():
        _param(model, "layers.0.self_attn.o_proj.lora_A.default.weight")[0, 0] = float("nan")

"""Evaluation: validation loss (its exp is the perplexity) and token accuracy over the whole
split, each example counted once however many processes run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from medqa_loop.batching import Batch, to_device
from medqa_loop.losses import eval_sums
from medqa_loop.model import model_logits


@dataclass(frozen=True)
class Best:
    """The lowest eval loss so far, its step, and the evaluations since it (early stopping's
    count). The sanity eval at step 0 is partial and never counts."""

    loss: float = float("inf")
    step: int | None = None
    stale: int = 0

    def after(self, step: int, loss: float) -> "Best":
        if loss < self.loss:
            return Best(loss, step, 0)
        return Best(self.loss, self.step, self.stale + 1)


def best_so_far(records: list[dict]) -> Best:
    """``Best`` from metrics.jsonl's evaluation lines: how a resumed run knows it."""
    best = Best()
    for r in records:
        if "eval_loss" in r and r["step"] > 0:
            best = best.after(r["step"], r["eval_loss"])
    return best


@dataclass
class EvalResult:
    loss: float  # summed token loss / summed weight
    token_acc: float  # fraction of target tokens whose shifted argmax is the label


@torch.no_grad()
def evaluate(
    accelerator,
    model,
    examples: list[dict],
    collate_fn: Callable[[list[dict]], Batch],
    micro_batches: list[list[int]],
    graphs=None,
) -> EvalResult:
    """Validation loss (summed token loss / summed weight) and token accuracy over
    ``micro_batches`` (indices into ``examples``: batching.eval_micro_batches).

    Each process takes every world-th micro-batch and the sums are reduced, so every pair counts
    exactly once however many processes run. With ``graphs`` (kernels.graphs.MicroBatchGraphs,
    one process) each micro-batch's forward is the replay of a CUDA graph. The model goes back
    to train mode even on error.
    """
    mine = micro_batches[accelerator.process_index :: accelerator.num_processes]
    totals = torch.zeros(4, device=accelerator.device)  # loss sum, weight, correct, counted
    # The bare model, not the DDP wrapper: a DDP forward may broadcast buffers (a collective),
    # and processes run different numbers of batches here, some none at all.
    model = accelerator.unwrap_model(model)
    model.eval()  # dropout off
    try:
        for indices in mine:
            batch = to_device(collate_fn([examples[i] for i in indices]), accelerator.device)
            totals += graphs.evaluate(batch) if graphs is not None else eval_sums(model_logits(model, batch), batch)
    finally:
        model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    if totals[1] <= 0:
        raise ValueError("the validation split has no target tokens to evaluate on")
    return EvalResult(loss=(totals[0] / totals[1]).item(), token_acc=(totals[2] / totals[3]).item())

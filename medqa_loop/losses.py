"""Token-level loss: a *sum* over target tokens, so the loop can divide once by the window's
weight (torchtune-style) and the mean over an accumulation window is exact however the tokens are
spread over micro-batches and processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


CE_CHUNK = 4096  # positions per cross-entropy chunk: 4096 x 32k fp32 = 0.5 GB at a time


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy, (B, T-1), zero where the label is IGNORE_INDEX.

    Shifts like HF causal LMs do: logits at position t predict the label at t+1. Computed in fp32
    whatever the logits' dtype (bf16 log-softmax over 32k classes loses ~2 digits), in chunks
    whose fp32 softmax is recomputed in backward rather than kept: an 8k-token packed row would
    otherwise hold ~3 GB of fp32 logits, softmax and gradient at once.
    """
    targets = labels[:, 1:]
    return _chunked_cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1)).view_as(targets)


def _chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``_cross_entropy`` of each row of the 2-D ``logits``, CE_CHUNK rows at a time; where
    autograd records, each chunk through a checkpoint (its fp32 softmax recomputed in backward)."""
    chunks = [
        checkpoint(_cross_entropy, logits[i : i + CE_CHUNK], targets[i : i + CE_CHUNK], use_reentrant=False)
        if torch.is_grad_enabled()
        else _cross_entropy(logits[i : i + CE_CHUNK], targets[i : i + CE_CHUNK])
        for i in range(0, targets.numel(), CE_CHUNK)
    ]
    return torch.cat(chunks) if chunks else logits.new_zeros(0, dtype=torch.promote_types(logits.dtype, torch.float32))


def shifted_targets(labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, targets, their weights) of a [B, T] batch: the positions, flattened over its
    rows, whose *next* label is a target, and those labels. What the fused loss head reads
    (medqa_loop.kernels.patch): the final hidden states there, never a logit of a prompt
    position. The collate computes them on the host, so the GPU needs no ``nonzero``."""
    following = labels[:, 1:]
    keep = following != IGNORE_INDEX
    rows, cols = keep.nonzero(as_tuple=True)
    return rows * labels.size(1) + cols, following[keep], weights[:, 1:][keep]


def weighted_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Sum over target tokens of weight * token loss (weights aligned with labels, unshifted)."""
    return (token_losses(logits, labels) * weights[:, 1:]).sum()


def target_weight(batch: dict) -> torch.Tensor:
    """The normaliser this batch contributes: the sum of the weights of its predicted labels."""
    return batch["loss_weights"][:, 1:].sum()


def eval_sums(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """[weighted loss sum, summed weight, correct, counted] of one batch, fp32, from its logits
    at its target positions (``shifted_targets``: the positions whose *next* label is a target):
    the cross-entropy there (fp32, in chunks) times the target's weight, and the accuracy: a
    target counts where its weight is > 0 (each counted token is right or wrong, so the ratio is
    a plain "fraction of answer tokens the model would have produced greedily given the truth"),
    right where the argmax is its label. Only the target fields are read, so a row padded with
    weight-0 targets (kernels.graphs) sums the same."""
    rows = logits.flatten(0, 1)[batch["target_positions"]]
    targets, weights = batch["targets"], batch["target_weights"]
    losses = _chunked_cross_entropy(rows, targets)
    counted = weights > 0
    correct = (rows.argmax(dim=-1) == targets) & counted
    return torch.stack([(losses * weights).sum(), weights.sum(), correct.sum().float(), counted.sum().float()])


def target_tokens(batch: dict) -> int:
    """How many labels of this batch are predicted (weight aside): the count logged per step.
    The length of its targets (shifted_targets, derived on the host): no reduction on the GPU."""
    return batch["targets"].numel()

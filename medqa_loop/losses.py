"""Token-level loss: a *sum* over target tokens, so the loop can divide once by the window's
weight (torchtune-style) and the mean over an accumulation window is exact however the tokens are
spread over micro-batches and processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy, (B, T-1), zero where the label is IGNORE_INDEX.

    Shifts like HF causal LMs do: logits at position t predict the label at t+1. Computed in fp32
    whatever the logits' dtype, since bf16 log-softmax over 32k classes loses ~2 digits.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)


def weighted_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Sum over target tokens of weight * token loss (weights aligned with labels, unshifted)."""
    return (token_losses(logits, labels) * weights[:, 1:]).sum()


def target_weight(batch: dict) -> torch.Tensor:
    """The normaliser this batch contributes: the sum of the weights of its predicted labels."""
    return batch["loss_weights"][:, 1:].sum()


def target_tokens(batch: dict) -> torch.Tensor:
    """How many labels of this batch are predicted (weight aside): the count logged per step."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

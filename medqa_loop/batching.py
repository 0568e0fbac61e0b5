"""Batching: the epoch order, the accumulation windows, and how a window's pairs become the
micro-batches that run. ``Batch`` is the one batch type: what ``collate`` makes, the loss, the
loop, evaluation and the debugging tools read.

Padding is dynamic: a batch is padded to its own longest pair, never to ``data.max_length``;
packed, a row holds several pairs and no padding at all.
"""

from __future__ import annotations

import itertools
import math
from typing import NotRequired, TypedDict

import torch

from medqa_loop.losses import IGNORE_INDEX, shifted_targets


class Batch(TypedDict):
    """One micro-batch on its way to the model. Padded: [B, T] rows, pads at attention_mask 0,
    label -100, weight 0. Packed: one [1, T] row of several pairs, with the pairs' positions and
    boundaries."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] 1 on tokens, 0 on padding
    labels: torch.Tensor  # [B, T] long, -100 where the loss weight is 0 (unshifted)
    loss_weights: torch.Tensor  # [B, T] float32, the loss mask's weight per label
    rows: torch.Tensor  # [pairs] the pairs' rows in the loaded dataset
    # derived from labels and loss_weights (with_targets): where the fused loss head reads
    target_positions: torch.Tensor  # [targets] long, flattened [B, T] positions whose next label is a target
    targets: torch.Tensor  # [targets] long, those next labels
    target_weights: torch.Tensor  # [targets] float32, their weights
    position_ids: NotRequired[torch.Tensor]  # packed only: [1, T], restarting at 0 per pair
    cu_seq_lens: NotRequired[torch.Tensor]  # packed only: [pairs + 1] int32 pair boundaries
    longest_pair: NotRequired[int]  # packed only: the longest pair's tokens, on the host (FlashAttention's grid)


def to_device(batch: Batch, device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def collate(examples: list[dict], pad_id: int, packed: bool = False) -> Batch:
    """One micro-batch. Padded: right-pad to the longest example of this batch (pads get label
    -100 and weight 0). Packed: concatenate the examples into one row with ``position_ids``
    restarting at 0 for each pair and the pairs' boundaries in ``cu_seq_lens``; attention never
    crosses a boundary (medqa_loop.kernels.attention; SDPA gets a block-diagonal mask from the restarts),
    so each pair's loss equals its loss alone.
    """
    if packed:
        def cat(key: str, first) -> list:
            # Each pair's first label would be "predicted" from the previous pair's last token.
            return [v for e in examples for v in [first, *e[key][1:]]]

        row = {
            "input_ids": [t for e in examples for t in e["input_ids"]],
            "labels": cat("labels", -100),
            "loss_weights": cat("loss_weights", 0.0),
            "position_ids": [p for e in examples for p in range(len(e["input_ids"]))],
        }
        return with_targets({
            "input_ids": torch.tensor([row["input_ids"]]),
            "attention_mask": torch.ones(1, len(row["input_ids"]), dtype=torch.long),
            "position_ids": torch.tensor([row["position_ids"]]),
            # Pair boundaries [0, l0, l0+l1, ...] for FlashAttention (int32, as its kernel wants).
            "cu_seq_lens": torch.tensor(
                [0, *itertools.accumulate(len(e["input_ids"]) for e in examples)], dtype=torch.int32
            ),
            # Known here, on the host: read from cu_seq_lens on the GPU it would cost a sync per
            # micro-batch, which stalls the CPU's queue of kernels until the GPU has drained it.
            "longest_pair": max(len(e["input_ids"]) for e in examples),
            "labels": torch.tensor([row["labels"]]),
            "loss_weights": torch.tensor([row["loss_weights"]], dtype=torch.float32),
            "rows": torch.tensor([e["row"] for e in examples]),
        })
    width = max(len(e["input_ids"]) for e in examples)

    def pad(key: str, value, dtype) -> torch.Tensor:
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples], dtype=dtype)

    return with_targets({
        "input_ids": pad("input_ids", pad_id, torch.long),
        "attention_mask": torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
        ),
        "labels": pad("labels", -100, torch.long),
        "loss_weights": pad("loss_weights", 0.0, torch.float32),
        "rows": torch.tensor([e["row"] for e in examples]),
    })


def with_targets(batch: dict) -> Batch:
    """``batch`` with its target positions, targets and their weights derived from its labels
    and loss weights (losses.shifted_targets), on the host. Code that changes a collated batch's
    labels or weights derives them again with this: they are never edited on their own."""
    positions, targets, weights = shifted_targets(batch["labels"], batch["loss_weights"])
    return {**batch, "target_positions": positions, "targets": targets, "target_weights": weights}


def arrange_window(
    window: list[list[int]], lengths: list[int], batching: str, micro_batch: int, pack_tokens: int
) -> list[list[int]]:
    """Regroup one window's pairs into the micro-batches actually run; the pairs never change.

    ``pad``: as drawn. ``group_by_length``: sorted by length, then ``micro_batch`` at a time, so
    pairs of similar length share a batch and little is padding. ``pack``: first-fit decreasing
    into rows of at most ``pack_tokens`` tokens (one row per micro-batch; no padding at all).
    """
    pairs = [i for mb in window for i in mb]
    if batching == "pad":
        return window
    if batching == "group_by_length":
        pairs.sort(key=lambda i: lengths[i])
        return [pairs[j : j + micro_batch] for j in range(0, len(pairs), micro_batch)]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(pairs, key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([i])
            room.append(pack_tokens - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


def eval_micro_batches(
    lengths: list[int], batching: str, batch_size: int, pack_tokens: int, max_batches: int | None = None
) -> list[list[int]]:
    """The validation split's micro-batches: its first ``max_batches * batch_size`` pairs (all
    of them by default), packed into rows of up to ``pack_tokens`` tokens like training's
    (``data.batching: pack``), or else sorted by length and ``batch_size`` at a time. Losses and
    accuracy are sums over target tokens, so any grouping gives the same result; packed rows
    give it with no padding and in far fewer forwards (a 16k-token row holds ~35 pairs)."""
    n = len(lengths) if max_batches is None else min(len(lengths), max_batches * batch_size)
    grouping = "group_by_length" if batching == "pad" else batching
    return arrange_window([list(range(n))], lengths, grouping, batch_size, pack_tokens)


# ---------------------------------------------------------------------------------------------
# Order and accumulation windows. Pure functions of (n, seed, epoch, rank, world): the order of
# every epoch can be recomputed, which resume and replay rely on.


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch (a fresh permutation per epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def accumulation_windows(
    order: list[int], micro_batch: int, grad_accum: int, rank: int = 0, world: int = 1
) -> list[list[list[int]]]:
    """Split one epoch into optimizer-step windows; return this rank's micro-batches of each.

    A window is ``grad_accum * world`` consecutive micro-batches; rank r takes micro-batches
    r, r+world, ... of it, so N processes x GA g see exactly the pairs one process x GA N*g
    sees. The last window of an epoch may be short (it still makes an optimizer step, with its
    loss normalised by its own token count); no pair is dropped or duplicated. In a short last
    window a rank may get no micro-batch (the loop then gives it a zero-weight stand-in).
    """
    batches = [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]
    span = grad_accum * world
    return [batches[i : i + span][rank::world] for i in range(0, len(batches), span)]


def steps_per_epoch(n: int, micro_batch: int, grad_accum: int, world: int = 1) -> int:
    return math.ceil(math.ceil(n / micro_batch) / (grad_accum * world))


def run_steps(n: int, train_cfg, world: int = 1) -> int:
    """Optimizer steps of the whole run: every epoch's windows, or ``train.max_steps`` if fewer."""
    t = train_cfg
    total = steps_per_epoch(n, t.micro_batch_size, t.grad_accum_steps, world) * t.epochs
    return total if t.max_steps is None else min(t.max_steps, total)


def window_batches(window: list[list[int]], examples: list[dict], cfg, collate_fn, device) -> list[Batch]:
    """The micro-batches run for one window: its pairs regrouped as ``data.batching`` says
    (arrange_window), collated, on ``device``. The loop, replay and the benchmarks build a step's
    micro-batches with this."""
    lengths = [len(e["input_ids"]) for e in examples]
    micro_batches = arrange_window(
        window, lengths, cfg.data.batching, cfg.train.micro_batch_size, cfg.data.pack_tokens
    )
    return [to_device(collate_fn([examples[i] for i in mb]), device) for mb in micro_batches]


def zero_weight_batch(example: dict, collate_fn, device) -> Batch:
    """One pair with no loss on any token, for a process with no micro-batch in a window.

    Its backward runs through every LoRA matrix, so the process joins DDP's all-reduce, and
    contributes exactly zero gradient. The window's normaliser is the target weight summed over
    all processes, which this batch does not change, so the update is that of the real pairs.
    """
    batch = collate_fn([example])
    batch["labels"].fill_(IGNORE_INDEX)
    batch["loss_weights"].zero_()
    return to_device(with_targets(batch), device)

"""Batching (medqa_loop.batching): the epoch order and accumulation windows, how a window's pairs
become micro-batches, and packing: a packed row's per-pair losses equal the pairs' losses alone;
pairs don't interact."""

import pytest
import torch

from medqa_loop.batching import (
    accumulation_windows, arrange_window, collate, epoch_order, eval_micro_batches, run_steps, steps_per_epoch,
)
from medqa_loop.losses import token_losses
from medqa_loop.model import model_logits
from medqa_loop.train import prepare_run


def per_pair_losses(model, batch, sizes):
    """Summed token loss of each pair of a packed row (segments of the shifted loss vector),
    through the loop's forward (position restarts and, for varlen, the pair boundaries)."""
    with torch.no_grad():
        logits = model_logits(model, batch)
    losses = token_losses(logits, batch["labels"])[0] * batch["loss_weights"][0, 1:]
    out, start = [], 0
    for n in sizes:
        out.append(losses[max(start - 1, 0) : start + n - 1].sum())
        start += n
    return torch.stack(out)


def alone(model, ex):
    b = collate([ex], pad_id=2)
    with torch.no_grad():
        logits = model_logits(model, b)
    return (token_losses(logits, b["labels"]) * b["loss_weights"][:, 1:]).sum()


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["varlen", "sdpa"])
@pytest.mark.parametrize("overrides", [["model.load_in_8bit=false"], []], ids=["float", "int8"])
def test_packed_row_equals_pairs_alone_and_pairs_do_not_interact(tiny_cfg, overrides, attn, monkeypatch):
    import medqa_loop.kernels.attention as A

    parts = prepare_run(tiny_cfg("data.mask=full_sequence", f"model.attn_implementation={attn}", *overrides))
    model = parts.model.eval()
    assert model.config._attn_implementation == attn
    # Count the packed forwards that run attention one pair at a time (varlen on CPU).
    per_pair_calls = []
    per_pair = A._per_pair
    monkeypatch.setattr(A, "_per_pair", lambda *a, **k: per_pair_calls.append(1) or per_pair(*a, **k))
    exs = parts.train_examples[:4]
    sizes = [len(e["input_ids"]) for e in exs]
    packed = collate(exs, pad_id=2, packed=True)
    assert packed["input_ids"].shape == (1, sum(sizes))
    got = per_pair_losses(model, packed, sizes)
    assert len(per_pair_calls) == (2 if attn == "varlen" else 0)  # one per layer of the tiny model
    want = torch.stack([alone(model, e) for e in exs])
    assert len(per_pair_calls) == (2 if attn == "varlen" else 0)  # padded batches: transformers' SDPA
    assert torch.allclose(got, want, rtol=1e-5)
    # Scramble pair 1's tokens: the other pairs' losses do not move at all.
    scrambled = dict(exs[1], input_ids=exs[1]["input_ids"][:1] + exs[1]["input_ids"][:0:-1])
    moved = per_pair_losses(model, collate([exs[0], scrambled, *exs[2:]], pad_id=2, packed=True), sizes)
    assert not torch.allclose(moved[1], got[1])
    assert torch.allclose(moved[[0, 2, 3]], got[[0, 2, 3]], rtol=1e-6)
    # Evaluation on packed batches equals evaluation on padded ones.
    from functools import partial

    from medqa_loop.evaluation import evaluate

    lengths = [len(e["input_ids"]) for e in parts.val_examples]
    rows = eval_micro_batches(lengths, "pack", 4, 2048)
    assert len(rows) < len(lengths) / 4  # fewer, larger forwards than batches of 4
    packed_eval = evaluate(parts.accelerator, model, parts.val_examples, partial(collate, pad_id=2, packed=True), rows)
    in_order = [list(range(i, min(i + 4, len(lengths)))) for i in range(0, len(lengths), 4)]
    padded_eval = evaluate(parts.accelerator, model, parts.val_examples, partial(collate, pad_id=2), in_order)
    assert packed_eval.loss == pytest.approx(padded_eval.loss, rel=1e-5)
    assert packed_eval.token_acc == pytest.approx(padded_eval.token_acc, abs=1e-6)


def test_packed_row_masks_each_pairs_first_label():
    exs = [
        {"input_ids": [1, 5, 6, 2], "labels": [1, 5, 6, 2], "loss_weights": [1.0] * 4, "row": 7},
        {"input_ids": [1, 8, 2], "labels": [1, 8, 2], "loss_weights": [1.0] * 3, "row": 9},
    ]
    b = collate(exs, pad_id=2, packed=True)
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert b["labels"].tolist() == [[-100, 5, 6, 2, -100, 8, 2]]  # never predict BOS from EOS
    assert b["loss_weights"].tolist() == [[0.0, 1, 1, 1, 0.0, 1, 1]] and b["rows"].tolist() == [7, 9]


def test_arrange_window_keeps_the_pairs_and_respects_the_budget():
    lengths = [500, 300, 900, 120, 700, 260, 1000, 80]
    window = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert arrange_window(window, lengths, "pad", 2, 2048) == window
    grouped = arrange_window(window, lengths, "group_by_length", 2, 2048)
    assert grouped == [[7, 3], [5, 1], [0, 4], [2, 6]]
    rows = arrange_window(window, lengths, "pack", 2, 2048)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum(lengths[i] for i in r) <= 2048 for r in rows)
    assert len(rows) == 2  # 3,860 tokens: first-fit decreasing needs the minimum, 2 rows


def test_windows_cover_each_pair_once_and_shard_like_one_big_window():
    order = epoch_order(37, seed=1, epoch=0)
    assert sorted(order) == list(range(37)) and order != epoch_order(37, seed=1, epoch=1)
    one = accumulation_windows(order, micro_batch=2, grad_accum=4)
    assert len(one) == steps_per_epoch(37, 2, 4) == 5
    assert sorted(i for w in one for mb in w for i in mb) == list(range(37))
    # 2 processes x GA 2 see, per window, exactly the pairs of 1 process x GA 4.
    ranks = [accumulation_windows(order, 2, 2, rank=r, world=2) for r in (0, 1)]
    assert len(ranks[0]) == steps_per_epoch(37, 2, 2, world=2) == 5
    for w, (w0, w1) in enumerate(zip(*ranks)):
        assert sorted(i for mb in w0 + w1 for i in mb) == sorted(i for mb in one[w] for i in mb)


def test_run_steps_counts_every_epochs_windows_or_stops_at_max_steps():
    from medqa_loop.config import TrainConfig

    t = TrainConfig(epochs=3, micro_batch_size=2, grad_accum_steps=4)
    # 96 pairs: 48 micro-batches, 12 windows an epoch (the tiny preset's run: 36 steps).
    assert run_steps(96, t) == 3 * steps_per_epoch(96, 2, 4) == 36
    assert run_steps(96, t, world=2) == 3 * 6  # windows of 4 micro-batches on each of 2 processes
    assert run_steps(97, t) == 3 * 13  # a short last window is a step too
    assert run_steps(96, TrainConfig(epochs=3, micro_batch_size=2, grad_accum_steps=4, max_steps=5)) == 5
    assert run_steps(96, TrainConfig(epochs=3, micro_batch_size=2, grad_accum_steps=4, max_steps=100)) == 36


@pytest.mark.parametrize("batching", ["pack", "group_by_length", "pad"])
def test_eval_micro_batches_hold_each_pair_once(batching):
    lengths = [int(n) for n in torch.randint(5, 120, (53,), generator=torch.Generator().manual_seed(0))]
    rows = eval_micro_batches(lengths, batching, 4, 256)
    assert sorted(i for r in rows for i in r) == list(range(53))
    if batching == "pack":  # rows as full as first-fit makes them, none over the budget
        assert all(sum(lengths[i] for i in r) <= 256 for r in rows)
        assert len(rows) <= sum(lengths) / 256 + 2
    else:  # padded: batches of 4 pairs of similar length
        assert [len(r) for r in rows] == [4] * 13 + [1]
        assert all(max(lengths[i] for i in r) <= min(lengths[i] for i in b) for r, b in zip(rows, rows[1:]))
    # A cap (train.eval_max_batches, the sanity eval) takes the first batches x batch_size pairs.
    assert sorted(i for r in eval_micro_batches(lengths, batching, 4, 256, max_batches=2) for i in r) == list(range(8))

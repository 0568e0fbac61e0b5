"""Token losses and accuracy as pure functions of logits, labels and weights (no model)."""

import pytest
import torch

from medqa_loop.batching import with_targets
from medqa_loop.losses import IGNORE_INDEX, eval_sums


def token_accuracy_counts(logits, labels, weights) -> tuple[int, int]:
    """(correct, counted) of eval_sums for a batch of these labels and weights."""
    sums = eval_sums(logits, with_targets({"labels": labels, "loss_weights": weights}))
    return int(sums[2]), int(sums[3])


def one_hot_logits(predicted: list[list[int]], vocab: int = 10) -> torch.Tensor:
    """Logits whose argmax at each position is the given token."""
    return torch.nn.functional.one_hot(torch.tensor(predicted), vocab).float() * 5.0


def test_token_accuracy_is_shifted_and_counts_only_weighted_targets():
    ids = [[1, 4, 5, 6, 7, 2, 0]]
    # Prompt = positions 0..2 (label -100), answer 3..5 (EOS at 5), pad at 6.
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 7, 2, IGNORE_INDEX]])
    weights = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    # Position t predicts the token at t+1: right for labels 6 and 2, wrong for 7 (predicts 9).
    predicted = [[4, 5, 6, 9, 2, 0, 0]]
    correct, counted = token_accuracy_counts(one_hot_logits(predicted), labels, weights)
    assert (int(correct), int(counted)) == (2, 3)

    # Unshifted predictions (position t "predicts" token t) would all be wrong.
    correct, _ = token_accuracy_counts(one_hot_logits(ids), labels, weights)
    assert int(correct) == 0

    # A label kept but weighted 0 by a mask is not counted, right or wrong.
    zero_eos = weights.clone()
    zero_eos[0, 5] = 0.0
    assert token_accuracy_counts(one_hot_logits(predicted), labels, zero_eos) == (1, 2)
    # Up-weighting a token does not change its count: accuracy is a plain fraction of tokens.
    assert token_accuracy_counts(one_hot_logits(predicted), labels, weights * 3) == (2, 3)


def test_token_accuracy_sums_over_the_batch_and_ignores_padding():
    labels = torch.tensor([[IGNORE_INDEX, 3, 3], [IGNORE_INDEX, 3, IGNORE_INDEX]])
    weights = (labels != IGNORE_INDEX).float()
    logits = one_hot_logits([[3, 3, 0], [3, 0, 3]])  # row 2 is wrong only where its label is padding
    correct, counted = token_accuracy_counts(logits, labels, weights)
    assert (int(correct), int(counted)) == (3, 3)


def test_eval_loss_is_the_weighted_cross_entropy_and_padding_targets_add_nothing(monkeypatch):
    import medqa_loop.losses as L

    torch.manual_seed(0)
    logits = torch.randn(2, 11, 50)
    labels = torch.randint(0, 50, (2, 11))
    labels[0, :4] = IGNORE_INDEX
    weights = (labels != IGNORE_INDEX).float() * torch.rand(2, 11)
    batch = with_targets({"labels": labels, "loss_weights": weights})
    monkeypatch.setattr(L, "CE_CHUNK", 3)  # 17 targets -> 6 chunks, the last one short
    loss, weight, correct, counted = eval_sums(logits, batch).tolist()
    assert loss == pytest.approx(float(L.weighted_loss_sum(logits, labels, weights)), rel=1e-6)
    assert weight == pytest.approx(float(weights[:, 1:].sum()), rel=1e-6) and counted == (labels[:, 1:] != IGNORE_INDEX).sum()
    # targets at position 0 with weight 0 (a padded graph row's) change no sum
    padded = {**batch, "target_positions": torch.cat([batch["target_positions"], torch.zeros(5, dtype=torch.long)]),
              "targets": torch.cat([batch["targets"], torch.zeros(5, dtype=torch.long)]),
              "target_weights": torch.cat([batch["target_weights"], torch.zeros(5)])}
    assert eval_sums(logits, padded).tolist() == pytest.approx([loss, weight, correct, counted], rel=1e-6)


def test_chunked_cross_entropy_matches_the_plain_one(monkeypatch):
    import medqa_loop.losses as L

    torch.manual_seed(0)
    logits = torch.randn(2, 11, 50, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 11))
    labels[0, :4] = -100
    weights = (labels != -100).float()
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    (ref_grad,) = torch.autograd.grad(ref, logits)
    monkeypatch.setattr(L, "CE_CHUNK", 3)  # 20 positions -> 7 chunks, the last one short
    got = L.weighted_loss_sum(logits, labels, weights)
    (grad,) = torch.autograd.grad(got, logits)
    assert torch.allclose(got, ref, rtol=1e-6) and torch.allclose(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-4)


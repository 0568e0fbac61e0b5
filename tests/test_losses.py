"""Token losses and accuracy as pure functions of logits, labels and weights (no model)."""

import pytest
import torch

from medqa_loop.losses import IGNORE_INDEX, token_accuracy_counts, weighted_loss_sum


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
    assert [int(x) for x in token_accuracy_counts(one_hot_logits(predicted), labels, zero_eos)] == [1, 2]
    # Up-weighting a token does not change its count: accuracy is a plain fraction of tokens.
    assert [int(x) for x in token_accuracy_counts(one_hot_logits(predicted), labels, weights * 3)] == [2, 3]


def test_token_accuracy_sums_over_the_batch_and_ignores_padding():
    labels = torch.tensor([[IGNORE_INDEX, 3, 3], [IGNORE_INDEX, 3, IGNORE_INDEX]])
    weights = (labels != IGNORE_INDEX).float()
    logits = one_hot_logits([[3, 3, 0], [3, 0, 3]])  # row 2 is wrong only where its label is padding
    correct, counted = token_accuracy_counts(logits, labels, weights)
    assert (int(correct), int(counted)) == (3, 3)


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


def test_fused_linear_loss_sum_equals_the_head_then_the_loss(monkeypatch):
    """Over the target rows only, in chunks recomputed in backward: the same loss and the same
    gradient as logits = hidden @ W.T followed by weighted_loss_sum over every position."""
    import medqa_loop.losses as losses

    monkeypatch.setattr(losses, "CE_CHUNK", 64)  # several chunks, the last one short
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=gen)
    labels = torch.randint(0, 50, (300,), generator=gen)
    labels[:100] = IGNORE_INDEX  # a prompt
    weights = (labels != IGNORE_INDEX).double() * torch.rand(300, dtype=torch.float64, generator=gen)
    want = weighted_loss_sum((hidden @ weight.T)[None], labels[None], weights[None])
    (want_grad,) = torch.autograd.grad(want, hidden)
    keep = labels[1:] != IGNORE_INDEX  # the rows whose next token is a target
    got = losses.fused_linear_loss_sum(hidden[:-1][keep], weight, labels[1:][keep], weights[1:][keep])
    (got_grad,) = torch.autograd.grad(got, hidden)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert want_grad[:99].abs().max() == 0  # row 99 predicts the first target and torch.allclose(got_grad, want_grad, rtol=0, atol=1e-12)

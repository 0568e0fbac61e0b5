"""The fused loss head (medqa_loop.kernels.patch._target_loss_forward, ops.linear_cross_entropy_sum):
the loss from the final hidden states at the target positions alone, equal to every position's
logits followed by losses.weighted_loss_sum."""

import pytest
import torch

from conftest import OpLog, rel
from medqa_loop.batching import collate, to_device, zero_weight_batch
from medqa_loop.kernels import ops, patch, reference
from medqa_loop.losses import shifted_targets, weighted_loss_sum
from medqa_loop.model import model_logits, model_loss_sum
from medqa_loop.train import prepare_run


def test_shifted_targets_are_the_positions_before_each_target():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, 6, -100, -100]])  # row 1 padded after 6
    weights = torch.tensor([[0.0, 0.0, 1.0, 0.5, 0.0], [0.0, 2.0, 1.0, 0.0, 0.0]])
    positions, targets, w = shifted_targets(labels, weights)
    # Position t predicts label t + 1; the flattened index of (row, t) is row * 5 + t.
    assert positions.tolist() == [1, 2, 5, 6]
    assert targets.tolist() == [7, 8, 5, 6] and w.tolist() == [1.0, 0.5, 2.0, 1.0]


def test_collate_carries_the_targets_of_packed_and_padded_batches():
    exs = [
        {"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2], "loss_weights": [0.0, 0.0, 1.0, 1.0], "row": 0},
        {"input_ids": [1, 8, 2], "labels": [-100, 8, 2], "loss_weights": [0.0, 1.0, 1.0], "row": 1},
    ]
    packed = collate(exs, pad_id=2, packed=True)
    assert packed["target_positions"].tolist() == [1, 2, 4, 5] and packed["targets"].tolist() == [6, 2, 8, 2]
    padded = collate(exs, pad_id=2)  # [2, 4]: row 1 padded at position 3
    assert padded["target_positions"].tolist() == [1, 2, 4, 5] and padded["targets"].tolist() == [6, 2, 8, 2]
    assert padded["target_weights"].tolist() == [1.0, 1.0, 1.0, 1.0]
    # The loop's stand-in for a process without pairs: no targets at all.
    assert zero_weight_batch(exs[0], lambda e: collate(e, pad_id=2), "cpu")["target_positions"].numel() == 0


def test_the_chunked_head_is_weighted_cross_entropy_with_its_exact_gradient(monkeypatch):
    """LinearCrossEntropySum, on the CPU's reference cross-entropy: the weighted sum of each row's
    cross-entropy, and the gradient it makes in the forward (chunk by chunk, scaled in backward)
    is the exact derivative (gradcheck, float64, two chunks, the last one short)."""
    from torch.autograd import gradcheck

    from medqa_loop.kernels.autograd import LinearCrossEntropySum

    monkeypatch.setattr(LinearCrossEntropySum, "CHUNK", 4)
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(9, 4, generator=gen, dtype=torch.float64)
    targets, weights = torch.randint(0, 9, (6,), generator=gen), torch.rand(6, generator=gen, dtype=torch.float64)
    weights[2] = 0.0
    want = sum(w * -torch.log_softmax(hidden[i] @ weight.T, -1)[t] for i, (t, w) in enumerate(zip(targets, weights)))
    got = ops.linear_cross_entropy_sum(hidden, weight, targets, weights)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert got.item() == pytest.approx(reference.linear_cross_entropy_sum(hidden, weight, targets, weights).item(), rel=1e-12)
    hidden.requires_grad_()
    assert gradcheck(lambda h: ops.linear_cross_entropy_sum(h * 2.5, weight, targets, weights), (hidden,))
    (grad,) = torch.autograd.grad(ops.linear_cross_entropy_sum(hidden, weight, targets, weights), hidden)
    assert torch.all(grad[2] == 0)  # weight 0: no gradient


@pytest.fixture(scope="module")
def fused_tiny(tmp_path_factory):
    from medqa_loop.config import load_config

    from conftest import TINY

    cfg = load_config(TINY, [f"output_dir={tmp_path_factory.mktemp('head') / 'run'}", "model.attn_implementation=sdpa"])
    parts = prepare_run(cfg)
    with torch.no_grad():  # a non-zero B, so every LoRA matrix has a gradient
        for name, p in parts.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    return parts


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_fused_head_loss_and_gradients_equal_the_logits_path(fused_tiny, packed):
    model = fused_tiny.model.train()
    assert patch.uses_target_loss(model)
    batch = to_device(collate(fused_tiny.train_examples[:3], pad_id=fused_tiny.tokenizer.pad_token_id, packed=packed),
                      fused_tiny.accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)  # the same LoRA dropout seeds for both
    got = model_loss_sum(model, batch)
    got_grads = torch.autograd.grad(got, params)
    torch.manual_seed(0)
    want = weighted_loss_sum(model_logits(model, batch), batch["labels"], batch["loss_weights"])
    want_grads = torch.autograd.grad(want, params)
    assert rel(got, want) < 1e-6
    for g, w in zip(got_grads, want_grads):
        assert w.norm() > 0 and rel(g, w) < 1e-5


def test_fused_head_computes_no_logit_of_a_prompt_position(fused_tiny):
    model = fused_tiny.model.train()
    batch = to_device(collate(fused_tiny.train_examples[:3], pad_id=fused_tiny.tokenizer.pad_token_id, packed=True),
                      fused_tiny.accelerator.device)
    hidden_size, vocab = model.config.hidden_size, model.config.vocab_size
    tokens, targets = batch["input_ids"].numel(), batch["targets"].numel()
    assert targets < tokens  # the prompts are not targets
    with OpLog() as log:
        model_loss_sum(model, batch).backward()
    shapes = log.matmul_shapes()
    # The head's two matmuls, over the target rows only and once each: the logits, then (their
    # gradient, made in place) back to the hidden states' gradient, both in the forward.
    assert [s for s in shapes if s[1] == (hidden_size, vocab)] == [((targets, hidden_size), (hidden_size, vocab))]
    assert [s for s in shapes if s[1] == (vocab, hidden_size)] == [((targets, vocab), (vocab, hidden_size))]
    model.zero_grad(set_to_none=True)


def test_zero_weight_batch_gives_zero_loss_and_gradient_through_the_fused_head(fused_tiny):
    model = fused_tiny.model.train()
    pad = fused_tiny.tokenizer.pad_token_id
    batch = zero_weight_batch(fused_tiny.train_examples[0], lambda e: collate(e, pad_id=pad, packed=True),
                              fused_tiny.accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model_loss_sum(model, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # Every LoRA matrix gets a gradient, all zeros: the process still joins DDP's all-reduce.
    assert loss.item() == 0.0 and all(g is not None and g.abs().max() == 0 for g in grads)


@pytest.mark.cuda
def test_the_triton_head_on_cuda_equals_the_reference():
    """bf16 logits made a chunk at a time, the Triton cross-entropy, the gradient written in the
    forward: the fp32 reference's loss and gradient, within bf16's rounding; no host sync."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(5000, 256, device="cuda", generator=gen) / 16).bfloat16()
    targets = torch.randint(0, 5000, (3000,), device="cuda", generator=gen)
    weights = torch.rand(3000, device="cuda", generator=gen)
    weights[::7] = 0.0
    ops.linear_cross_entropy_sum(hidden.detach(), weight, targets, weights)  # compile before capturing
    torch.cuda.synchronize()
    with torch.cuda.graphs.graph(torch.cuda.CUDAGraph()):  # capture fails on any host read
        ops.linear_cross_entropy_sum(hidden.detach(), weight, targets, weights)
    got = ops.linear_cross_entropy_sum(hidden, weight, targets, weights)
    (got_grad,) = torch.autograd.grad(got, hidden)
    want = reference.linear_cross_entropy_sum(hidden.float(), weight.float(), targets, weights)
    (want_grad,) = torch.autograd.grad(want, hidden)
    assert rel(got, want) < 1e-4
    assert rel(got_grad.float(), want_grad.float()) < 2e-2  # bf16 gradients
    assert torch.all(got_grad[::7] == 0)  # weight 0: no gradient

"""Attention for packed rows (medqa_loop.kernels.attention): per-pair causal attention equals SDPA with the
block-diagonal causal mask, padded batches go to transformers' SDPA, and the collate's pair
boundaries reach the model as the keyword arguments the attention reads."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import OpLog, rel
from medqa_loop.batching import collate
from medqa_loop.kernels import attention
from medqa_loop.kernels.attention import varlen_attention, varlen_kwargs


class Attn(torch.nn.Module):
    """What transformers' attention functions read from the calling module."""

    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


def boundaries(lengths, device="cpu"):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def qkv(lengths, heads, kv_heads, dim, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    t = sum(lengths)
    return [
        torch.randn(1, h, t, dim, generator=gen, dtype=dtype, device=device).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    ]


def block_causal_mask(lengths):
    """[T, T] bool: query i sees key j iff same pair and j <= i."""
    pair = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    t = len(pair)
    return (pair[:, None] == pair[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()


@pytest.mark.parametrize("scaling", [None, 0.2])
def test_per_pair_attention_equals_sdpa_with_block_diagonal_mask(scaling):
    lengths = [5, 1, 9]  # a one-token pair too
    q, k, v = qkv(lengths, heads=4, kv_heads=2, dim=8)
    cu = boundaries(lengths)
    kwargs = varlen_kwargs({"cu_seq_lens": cu, "longest_pair": max(lengths)})
    out, weights = varlen_attention(Attn(2), q, k, v, None, scaling=scaling, **kwargs)
    assert weights is None and out.shape == (1, 15, 4, 8)
    # The reference: query head h reads KV head h // 2 (transformers' repeat_kv).
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1),
        attn_mask=block_causal_mask(lengths), scale=scaling,
    ).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", got, want):
        assert b.abs().max() > 0 and torch.allclose(a, b, atol=1e-5, rtol=0), name
    # A non-block mask would differ: a pair's tokens do attend across the boundary without one.
    plain = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True, scale=scaling
    ).transpose(1, 2)
    assert not torch.allclose(out[:, 5:], plain[:, 5:], atol=1e-3)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
def test_without_boundaries_it_is_transformers_sdpa(masked):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 6, 8, generator=gen)
    k, v = torch.randn(2, 2, 6, 8, generator=gen), torch.randn(2, 2, 6, 8, generator=gen)
    mask = None
    if masked:  # causal, and row 1's last two tokens are padding
        keys = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
        mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]
    out, weights = varlen_attention(Attn(2), q, k, v, mask, scaling=0.3, sliding_window=None)
    want, _ = sdpa_attention_forward(Attn(2), q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (2, 6, 4, 8)
    assert torch.equal(out, want)


def test_varlen_kwargs_for_padded_and_packed_batches():
    exs = [
        {"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1)), "loss_weights": [1.0] * n, "row": i}
        for i, n in enumerate([4, 2, 7])
    ]
    assert varlen_kwargs(collate(exs, pad_id=2)) == {}
    packed = collate(exs, pad_id=2, packed=True)
    kw = varlen_kwargs(packed)
    assert set(kw) == {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert kw["cu_seq_lens_q"] is packed["cu_seq_lens"] and kw["cu_seq_lens_k"] is packed["cu_seq_lens"]
    assert kw["max_length_q"] == kw["max_length_k"] == 7 and type(kw["max_length_q"]) is int


def test_collate_cu_seq_lens_are_the_pair_boundaries():
    lengths = [5, 1, 3, 8]
    exs = [
        {"input_ids": [1] + [9] * (n - 1), "labels": [1] + [9] * (n - 1), "loss_weights": [1.0] * n, "row": i}
        for i, n in enumerate(lengths)
    ]
    b = collate(exs, pad_id=2, packed=True)
    cu = b["cu_seq_lens"]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 6, 9, 17]
    assert cu[-1] == b["input_ids"].shape[1]
    pos = b["position_ids"][0]
    assert torch.nonzero(pos == 0).flatten().tolist() == cu[:-1].tolist()  # restarts at boundaries
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert pos[s:e].tolist() == list(range(e - s))


@pytest.mark.cuda
def test_flash_path_equals_per_pair_path_on_cuda(monkeypatch):
    lengths = [300, 1, 517, 1024]
    q, k, v = qkv(lengths, heads=32, kv_heads=8, dim=128, dtype=torch.bfloat16, device="cuda")
    cu = boundaries(lengths, "cuda")
    scale = 128**-0.5
    assert attention.flash_available(q[0].transpose(0, 1))
    per_pair = attention._per_pair

    def not_here(*args, **kwargs):
        raise AssertionError("the CUDA bf16 path must not fall back to one SDPA per pair")

    monkeypatch.setattr(attention, "_per_pair", not_here)
    out, _ = varlen_attention(Attn(4), q, k, v, None, scaling=scale, **varlen_kwargs({"cu_seq_lens": cu, "longest_pair": max(lengths)}))
    ref = per_pair(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, scale).unsqueeze(0)
    assert out.shape == ref.shape == (1, sum(lengths), 32, 128)
    g = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(3))
    with OpLog() as backward_ops:
        got = torch.autograd.grad(out, (q, k, v), g)
    # The gradients leave as views of the kernel's output: no zero-filled buffer to copy into
    # (select's backward did that for each of q, k, v when the batch dim was taken with [0]).
    assert "_flash_attention_backward" in backward_ops.names
    assert not backward_ops.names & {"select_backward", "copy_"}, backward_ops.names
    want = torch.autograd.grad(ref, (q, k, v), g)
    # bf16 tolerance: the two kernels sum in different orders. Measured on an H100 (torch 2.11):
    # at most one bf16 step of the largest value apart (dv reaches ~11, so 0.06 there), norm-wise
    # 2-3e-3 apart; a wrong mask or KV-head mapping is off by O(1).
    for name, a, b in zip(["out", "dq", "dk", "dv"], (out, *got), (ref, *want)):
        peak = b.abs().max().item()
        assert peak > 0, name
        torch.testing.assert_close(a, b, atol=2e-2 * max(1.0, peak), rtol=2e-2, msg=lambda m: f"{name}: {m}")
        assert rel(a, b) < 1e-2, name

"""Attention for packed rows: each pair attends only to its own tokens, and only those are computed.

A packed row (medqa_loop.batching.collate) holds many pairs. Through SDPA that needs a
block-diagonal T x T mask, and SDPA's masked kernel computes every block of it: for a 2k-token
row of four pairs three quarters of the attention work is thrown away, for an 8k row of 17 pairs
94%, about half of a step's time (BENCHMARKS.md). ``varlen`` hands FlashAttention the pairs' boundaries
(``cu_seq_lens``, made by the collate) instead, through aten's FlashAttention-2 varlen kernel
on CUDA in bf16/fp16, so the work is that of the pairs alone. Where that kernel cannot run (CPU,
fp32) the same boundaries drive one causal SDPA per pair; tests check both against SDPA with
the mask.

``model.attn_implementation: varlen`` registers this under that name with transformers
(``medqa_loop.kernels.patch.register_varlen_attention``). Batches without boundaries (padded
batches, generation with a KV cache) go to transformers' own SDPA, for which the same name gets
the SDPA mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "varlen"


def varlen_kwargs(batch: dict[str, torch.Tensor]) -> dict:
    """Model-forward keyword arguments telling the attention where the pairs of a packed batch
    are (transformers passes them through to the attention function); {} for padded batches."""
    if "cu_seq_lens" not in batch:
        return {}
    cu, longest = batch["cu_seq_lens"], batch["longest_pair"]
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def flash_available(query: torch.Tensor) -> bool:
    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)


def _flash(q, k, v, cu, longest: int, scale: float) -> torch.Tensor:
    """FlashAttention-2 over the pairs of a packed row ([T, H, D] in and out): aten's varlen
    kernel, the one ``torch.nn.attention.varlen.varlen_attn`` runs on. Called directly because
    it takes grouped K/V as they are (8 KV heads for Mistral's 32), while varlen_attn accepts
    them only in releases after 2.11 (``enable_gqa``); repeating K/V to 32 heads first cost two
    copies a layer and their reductions in backward. The op is differentiable (its backward is
    aten's _flash_attention_backward)."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, longest, longest, 0.0, True, False, scale=scale
    )[0]


def _per_pair(q, k, v, cu, scale: float) -> torch.Tensor:
    """The reference: one causal SDPA per pair ([T, H, D] in, [T, H, D] out)."""
    bounds = cu.tolist()
    outs = [
        F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=True,
        ).transpose(0, 1)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs)


def varlen_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
):
    """transformers attention function: query [B, H, T, D], key/value [B, Hkv, T, D] ->
    ([B, T, H, D], None). Packed (``cu_seq_lens_q`` given, one row): per-pair causal attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, dim = query.size(0), query.size(-1)
    windowed = sliding_window is not None and max_length_q is not None and max_length_q > sliding_window
    if cu_seq_lens_q is None or batch != 1 or dropout > 0 or windowed:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask,
            dropout=dropout, scaling=scaling, sliding_window=sliding_window, **kwargs,
        )
    scale = dim**-0.5 if scaling is None else scaling
    # [T, H, D]: views of the projections' [1, T, H, D] memory. squeeze, not t[0]: select's
    # backward writes the gradient into a zeroed [1, H, T, D] buffer (a fill and a strided
    # copy per tensor, and the rotary backward then copied it back to the projections' layout).
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))
    if flash_available(q):
        out = _flash(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq_lens_q, max_length_q, scale)
    else:
        out = _per_pair(q, k, v, cu_seq_lens_q, scale)
    return out.unsqueeze(0), None

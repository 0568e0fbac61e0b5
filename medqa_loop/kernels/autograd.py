"""The fast path's autograd functions: the same maths as the modules they replace, fewer tensors
kept. ``medqa_loop.kernels.patch`` routes transformers' and PEFT's modules through them; their
small kernels come from ``medqa_loop.kernels.ops`` (Triton on CUDA, the eager reference elsewhere).

Without activation checkpointing, what a step can hold is set by what each op saves for its
backward. The stock modules save a lot that backward can cheaply recompute:

* PEFT's LoRA on a bf16 base casts the input to the adapters' fp32 (one fp32 copy per
  projection), applies dropout (another copy, plus its mask) and runs lora_A on that copy, which
  saves it. Per layer that is ~230 KB a token, more than everything else together.
  ``LoraLinear`` runs base + LoRA as one node in the activation dtype and saves the input (the
  same tensor the sibling projections save), the r-wide ``dropout(x) A^T`` and a seed: the
  dropout mask is drawn again from the seed in backward. The base weight may be bitsandbytes'
  int8 (then dequantized per matmul, as in ``DequantLinear``) or a plain frozen weight.
* RMSNorm up-casts to fp32 and keeps three fp32 intermediates; ``RMSNormFn`` keeps the bf16
  input and one fp32 scalar per token.
* SiLU(gate) * up keeps gate, SiLU(gate) and up; ``SiluMul`` keeps gate and up.
* transformers' rotary embedding runs four broadcasting multiplies, a ``cat`` and a ``neg`` on
  strided q and k, and keeps them for backward; ``RotaryFn`` keeps cos and sin.
* bitsandbytes' LLM.int8 matmul quantizes the activations to int8 on every call (and splits off
  outlier columns in fp16). ``DequantLinear`` keeps the frozen weight as bitsandbytes' int8
  (row-wise absmax, ``CB``/``SCB``) and dequantizes it to the activation dtype right before a
  regular matmul, in the forward and again in the backward; nothing but the int8 weight is kept
  between them, so no full-precision copy of the base lives longer than one matmul. Numerically
  it is weight-only int8 quantization: closer to the unquantized model than LLM.int8, which also
  rounds the activations.

One more change costs no memory and saves time: the MLP's down_proj, the last matmul of a
decoder layer, runs its frozen matmul in a node after its LoRA node (``BaseAfterLora``), so an
activation-checkpointed layer's recompute stops before it, since its output is never needed by
backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medqa_loop.kernels import ops
from medqa_loop.kernels.reference import dropout_args


class DequantLinear(torch.autograd.Function):
    """y = x W^T + b with the int8 W dequantized per call; gradient for x only (W, b are frozen)."""

    @staticmethod
    def forward(ctx, x, cb, scb, bias):
        ctx.save_for_backward(cb, scb)
        return F.linear(x, ops.dequantize(cb, scb, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        cb, scb = ctx.saved_tensors
        return grad_out @ ops.dequantize(cb, scb, grad_out.dtype), None, None, None


def _frozen_weight(w: torch.Tensor, scb: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight in ``dtype``: bitsandbytes' int8 (``scb`` given) dequantized, else cast."""
    return ops.dequantize(w, scb, dtype) if scb is not None else w.to(dtype)


class LoraLinear(torch.autograd.Function):
    """y = x W^T + b + scale * (dropout(x) A^T) B^T, W and b frozen, A and B trained.

    Matmuls run in x's dtype (A, B are cast; their gradients are returned in their own dtype,
    fp32, as autograd's cast would). An int8 W (``scb`` given) is dequantized per matmul
    (``DequantLinear``'s maths). Saved: x, W (int8 or frozen, no copy), the cast A and B (r wide, so
    backward does not cast again), xa = scale/(1-p) * dropout(x) A^T (LoRA's scale and dropout's
    1/(1-p) go on this r-wide tensor, where they are cheap). The dropout mask is the hash of
    ``seed`` (medqa_loop.kernels.reference), applied inside the kernels that read x or write its gradient.

    The LoRA output is computed first and the frozen matmul adds onto it in its epilogue
    (``addmm_``), forward and backward: a separate add of two [tokens, out] tensors re-read and
    re-wrote the frozen matmul's output. ``with_base=False`` leaves ``x W^T`` out of the output
    (``BaseAfterLora`` adds it); x's gradient still includes W's part.
    """

    @staticmethod
    def forward(ctx, x, w, scb, bias, lora_a, lora_b, scale: float, p: float, seed: int, with_base: bool = True):
        dtype = x.dtype
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        x2 = x.reshape(-1, x.size(-1))  # 2-D here and in backward: the same mask indices
        if p > 0:
            xa = ops.dropped_linear(x2, a, dropout_args(p, seed, x2.numel()), scale / (1.0 - p))
        else:
            xa = F.linear(x2, a).mul_(scale)
        y = torch.mm(xa, b.t()) if bias is None else torch.addmm(bias.to(dtype), xa, b.t())
        if with_base:
            y.addmm_(x2, _frozen_weight(w, scb, dtype).t())
        ctx.save_for_backward(x, w, scb, a, b, xa)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        ctx.grad_dtypes = lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], y.size(-1))

    @staticmethod
    def backward(ctx, grad_y):
        x, w, scb, a, b, xa = ctx.saved_tensors
        p, dtype = ctx.p, grad_y.dtype
        drop = dropout_args(p, ctx.seed, x.numel())
        a_dtype, b_dtype = ctx.grad_dtypes
        g = grad_y.reshape(-1, grad_y.size(-1))
        x2 = x.reshape(-1, x.size(-1))
        grad_b = (g.t() @ xa).to(b_dtype)
        # d loss / d (dropout(x) A^T), r wide: the scale and 1/(1-p) the forward put on xa.
        g_xa = (g @ b).mul_(ctx.scale / (1.0 - p))
        grad_a = (ops.dropped_grad(g_xa, x2, drop) if p > 0 else g_xa.t() @ x2).to(a_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:  # the first layer's input comes from frozen embeddings
            lora_part = ops.dropped_product(g_xa, a, drop) if p > 0 else g_xa @ a  # zero where x was dropped
            grad_x = lora_part.addmm_(g, _frozen_weight(w, scb, dtype)).view_as(x)
        return grad_x, None, None, None, grad_a, grad_b, None, None, None, None


class BaseAfterLora(torch.autograd.Function):
    """y = x W^T + lora_out, for ``lora_out`` from ``LoraLinear(..., with_base=False)`` (which adds
    the bias) on the same x, which owns x's whole gradient: this node saves nothing and passes
    the gradient on.

    Why split: an activation-checkpointed layer's recompute exists only to refill the tensors
    backward saved, and stops once the last of them is back (torch.utils.checkpoint's early
    stop). The layer's last projection (the MLP's down_proj) saves its tensors in the LoRA node
    and computes its frozen matmul after it, in this node, so the recompute stops before that
    matmul, whose output backward never reads: ~1/4 of the recomputed FLOPs of a Mistral layer.
    """

    @staticmethod
    def forward(ctx, x, w, scb, lora_out):
        # lora_out is added in the matmul's epilogue, as LoraLinear does with its base.
        c = lora_out.reshape(-1, lora_out.size(-1))
        y = torch.addmm(c, x.reshape(-1, x.size(-1)), _frozen_weight(w, scb, x.dtype).t())
        return y.view_as(lora_out)

    @staticmethod
    def backward(ctx, grad_y):
        return None, None, None, grad_y


class RMSNormFn(torch.autograd.Function):
    """y = weight * (x / rms(x)), normalised in fp32 like transformers' RMSNorm; keeps x and
    1/rms (fp32, one per token). The weight is frozen (LoRA never trains norms)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, rstd = ops.rmsnorm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        return ops.rmsnorm_backward(x, weight, rstd, grad_y), None, None


class SiluMul(torch.autograd.Function):
    """h = silu(gate) * up (Mistral's SwiGLU); keeps gate and up, recomputes silu in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return ops.silu_mul(gate, up)

    @staticmethod
    def backward(ctx, grad_h):
        gate, up = ctx.saved_tensors
        return ops.silu_mul_backward(gate, up, grad_h)


class RotaryFn(torch.autograd.Function):
    """(q, k) rotated by the position embedding (cos, sin), as transformers' apply_rotary_pos_emb,
    in one Triton kernel each way (for the inputs ``ops.rotary_covers`` accepts); keeps only cos
    and sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grads = [None if g is None else ops.rotary(g, cos, sin, backward=True) for g in (grad_q, grad_k)]
        return *grads, None, None

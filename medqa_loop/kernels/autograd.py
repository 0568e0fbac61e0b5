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


# -- one frozen projection and its LoRA: the maths LoraLinear and the decoder layer's nodes share --
#
# A projection is given as the 8 arguments (w, scb, bias, lora_a, lora_b, scale, p, seed):
# lora_a = lora_b = None for a frozen linear with no adapter; seed, where p > 0, is this forward's
# 0-d int64 device tensor (medqa_loop.kernels.seeds). _project is its forward on a 2-D
# input, _project_backward its gradients.


def _project(x2, w, scb, bias, lora_a, lora_b, scale: float, p: float, seed, with_base: bool = True,
             inference: bool = False):
    """(y, xa, a, b) for one projection of the 2-D x2: y = x2 W^T + b + scale * (dropout(x2) A^T) B^T
    (``x2 W^T`` left out without ``with_base``), xa = scale/(1-p) * dropout(x2) A^T, and A, B cast to
    x2's dtype (None, None, None for a projection without LoRA, or when LoRA is folded in).

    ``inference``: no backward follows (the caller runs under torch.no_grad). Then, with no
    dropout and the base included, LoRA is folded into the frozen weight, x2 (W + scale B A)^T:
    one matmul over a weight made per call, as the dequantized one is, in place of LoRA's r-wide
    matmul, its [tokens, out] product with B and that product read back by the frozen matmul.
    The same maths; the weight is rounded once to x2's dtype after the sum (ops.merged_weight)."""
    dtype = x2.dtype
    bias = None if bias is None else bias.to(dtype)
    if lora_a is None:
        if with_base:
            return F.linear(x2, _frozen_weight(w, scb, dtype), bias), None, None, None
        y = x2.new_zeros(x2.size(0), w.size(0))
        return (y if bias is None else y.add_(bias)), None, None, None
    if inference and with_base and p == 0:
        return F.linear(x2, ops.merged_weight(w, scb, lora_a, lora_b, scale, dtype), bias), None, None, None
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    if p > 0:
        xa = ops.dropped_linear(x2, a, dropout_args(p, seed, x2.numel()), scale / (1.0 - p))
    else:
        xa = F.linear(x2, a).mul_(scale)
    y = torch.mm(xa, b.t()) if bias is None else torch.addmm(bias, xa, b.t())
    if with_base:  # the frozen matmul adds onto the LoRA output in its epilogue (see LoraLinear)
        y.addmm_(x2, _frozen_weight(w, scb, dtype).t())
    return y, xa, a, b


def _project_backward(g, x2, w, scb, a, b, xa, scale: float, p: float, seed, grad_dtypes,
                      grad_x=None, need_x: bool = True):
    """(grad_a, grad_b, grad_x) of one projection, for the 2-D output gradient g and input x2:
    LoRA's gradients in ``grad_dtypes`` (None without LoRA), and x's gradient through this
    projection added into ``grad_x`` (in place) when given, else a new tensor (None without ``need_x``)."""
    grad_a = grad_b = part = None
    if a is not None:
        drop = dropout_args(p, seed, x2.numel()) if p > 0 else None
        grad_b = (g.t() @ xa).to(grad_dtypes[1])
        # d loss / d (dropout(x) A^T), r wide: the scale and 1/(1-p) the forward put on xa.
        g_xa = (g @ b).mul_(scale / (1.0 - p))
        grad_a = (ops.dropped_grad(g_xa, x2, drop) if p > 0 else g_xa.t() @ x2).to(grad_dtypes[0])
        if need_x:
            part = ops.dropped_product(g_xa, a, drop) if p > 0 else g_xa @ a  # zero where x was dropped
    if need_x:
        weight = _frozen_weight(w, scb, g.dtype)
        part = torch.mm(g, weight) if part is None else part.addmm_(g, weight)
        grad_x = part if grad_x is None else grad_x.add_(part)
    return grad_a, grad_b, grad_x


def _grad_dtypes(lora_a, lora_b):
    return None if lora_a is None else (lora_a.dtype, lora_b.dtype)


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
    (``BaseAfterLora`` adds it); x's gradient still includes W's part. ``inference`` (the caller
    runs under torch.no_grad): LoRA folds into the weight where there is no dropout (``_project``).
    """

    @staticmethod
    def forward(ctx, x, w, scb, bias, lora_a, lora_b, scale: float, p: float, seed, with_base: bool = True,
                inference: bool = False):
        x2 = x.reshape(-1, x.size(-1))  # 2-D here and in backward: the same mask indices
        y, xa, a, b = _project(x2, w, scb, bias, lora_a, lora_b, scale, p, seed, with_base, inference)
        ctx.save_for_backward(x, w, scb, a, b, xa)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        ctx.grad_dtypes = lora_a.dtype, lora_b.dtype
        return y.view(*x.shape[:-1], y.size(-1))

    @staticmethod
    def backward(ctx, grad_y):
        x, w, scb, a, b, xa = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.size(-1))
        # the first layer's input comes from frozen embeddings: no gradient for it
        grad_a, grad_b, grad_x = _project_backward(
            g, x.reshape(-1, x.size(-1)), w, scb, a, b, xa, ctx.scale, ctx.p, ctx.seed, ctx.grad_dtypes,
            need_x=ctx.needs_input_grad[0],
        )
        return None if grad_x is None else grad_x.view_as(x), None, None, None, grad_a, grad_b, None, None, None, None, None


PROJECTION_ARGS = 8  # (w, scb, bias, lora_a, lora_b, scale, p, seed): one projection, flattened


def _projections(flat) -> list[tuple]:
    return [tuple(flat[i : i + PROJECTION_ARGS]) for i in range(0, len(flat), PROJECTION_ARGS)]


def _projection_grads(grads) -> list:
    """The ``backward`` return values for one projection's 8 arguments: only A and B have gradients."""
    grad_a, grad_b = grads
    return [None, None, None, grad_a, grad_b, None, None, None]


class _SavedProjections:
    """What the fused nodes keep of their projections: the tensors (w, scb, A, B cast, xa) go
    through ``save_for_backward``, the rest (scale, p, seed, gradient dtypes) on ctx."""

    @staticmethod
    def save(ctx, leading: list, projections: list[tuple], outputs: list[tuple]) -> None:
        tensors, ctx.projection_meta = list(leading), []
        for (w, scb, _bias, lora_a, lora_b, scale, p, seed), (_y, xa, a, b) in zip(projections, outputs):
            tensors += [w, scb, a, b, xa]
            ctx.projection_meta.append((scale, p, seed, _grad_dtypes(lora_a, lora_b)))
        ctx.n_leading = len(leading)
        ctx.save_for_backward(*tensors)

    @staticmethod
    def load(ctx) -> tuple[list, list[tuple]]:
        saved = ctx.saved_tensors
        leading, rest = list(saved[: ctx.n_leading]), saved[ctx.n_leading :]
        return leading, [(*rest[5 * i : 5 * i + 5], *meta) for i, meta in enumerate(ctx.projection_meta)]


def _backward_projections(grads, x2, saved, need_x: bool, grad_x=None):
    """(x's gradient summed over the projections that read x2, added into ``grad_x`` when given,
    [(grad_a, grad_b)] of each projection)."""
    lora_grads = []
    for g, (w, scb, a, b, xa, scale, p, seed, dtypes) in zip(grads, saved):
        if g is None:  # an output backward never reached
            lora_grads.append((None, None))
            continue
        g = g.reshape(-1, g.size(-1))
        grad_a, grad_b, grad_x = _project_backward(g, x2, w, scb, a, b, xa, scale, p, seed, dtypes, grad_x, need_x)
        lora_grads.append((grad_a, grad_b))
    return grad_x, lora_grads


class NormedProjections(torch.autograd.Function):
    """[proj(rmsnorm(x)) for each projection]: the projections that read one normed input (a
    decoder layer's q, k and v) as one node, each given as PROJECTION_ARGS arguments.

    It keeps x and 1/rms, not the normed input: backward normalises x again (one elementwise
    pass, the same bits as the forward's). RMSNormFn followed by LoraLinears keeps both, x in the
    norm and the normed input in the projections: hidden_size x 2 bytes a token more per norm.
    The norm's weight is frozen, as in RMSNormFn. ``inference``: as in LoraLinear.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, eps: float, inference: bool, *flat):
        ctx.set_materialize_grads(False)  # an output backward never reached gets None, not zeros
        normed, rstd = ops.rmsnorm(x, norm_weight, eps)
        n2 = normed.reshape(-1, normed.size(-1))
        projections = _projections(flat)
        outputs = [_project(n2, *proj, inference=inference) for proj in projections]
        # Where x has no gradient (the first layer's input: the frozen embeddings) backward needs
        # the normed input alone: that is kept instead.
        ctx.need_x = ctx.needs_input_grad[0]
        leading = [x, norm_weight, rstd] if ctx.need_x else [normed, None, None]
        _SavedProjections.save(ctx, leading, projections, outputs)
        ctx.eps = eps
        return tuple(y.view(*x.shape[:-1], y.size(-1)) for y, *_ in outputs)

    @staticmethod
    def backward(ctx, *grads):
        (x, norm_weight, rstd), saved = _SavedProjections.load(ctx)
        normed = ops.rmsnorm(x, norm_weight, ctx.eps)[0] if ctx.need_x else x
        grad_n, lora_grads = _backward_projections(grads, normed.reshape(-1, x.size(-1)), saved, ctx.need_x)
        grad_x = ops.rmsnorm_backward(x, norm_weight, rstd, grad_n.view_as(x)) if ctx.need_x else None
        return grad_x, None, None, None, *[g for pair in lora_grads for g in _projection_grads(pair)]


class NormedSwiGLU(torch.autograd.Function):
    """A SiLU-gated MLP up to its last frozen matmul, as one node: with n = rmsnorm(x),
    h = silu(gate(n)) * up(n), it returns (h, down's LoRA output on h, bias included, without
    ``h W_down^T``), which ``BaseAfterLora`` adds so that a checkpointed layer's recompute stops
    before that matmul; with ``inference`` (no backward follows: no recompute to stop, and each
    LoRA folds into its weight, see ``_project``) down's whole output instead. The arguments
    after inference: gate's, up's and down's PROJECTION_ARGS.

    It keeps x, 1/rms, gate(n) and up(n): neither n (as NormedProjections) nor h, which backward
    recomputes from gate and up (one elementwise pass). SiluMul followed by a LoraLinear keeps h
    too: intermediate_size x 2 bytes a token, a fifth of an uncheckpointed Mistral layer's
    activations. down's input gradient, W's part included, is computed here (BaseAfterLora passes
    none), so gate and up's gradients come out of one pass.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, eps: float, inference: bool, *flat):
        ctx.set_materialize_grads(False)  # h's gradient (none: see BaseAfterLora) stays None, not zeros
        normed, rstd = ops.rmsnorm(x, norm_weight, eps)
        n2 = normed.reshape(-1, normed.size(-1))
        gate, up, down = _projections(flat)
        gate_out, up_out = _project(n2, *gate, inference=inference), _project(n2, *up, inference=inference)
        h = ops.silu_mul(gate_out[0], up_out[0])
        down_out = _project(h, *down, with_base=inference, inference=inference)
        _SavedProjections.save(ctx, [x, norm_weight, rstd, gate_out[0], up_out[0]], [gate, up, down],
                               [gate_out, up_out, down_out])
        ctx.eps = eps
        shape = x.shape[:-1]
        return h.view(*shape, h.size(-1)), down_out[0].view(*shape, down_out[0].size(-1))

    @staticmethod
    def backward(ctx, grad_h, grad_down):
        (x, norm_weight, rstd, g, u), (gate, up, down) = _SavedProjections.load(ctx)
        h = ops.silu_mul(g, u)
        # BaseAfterLora gives h no gradient; one would come from another use of h.
        grad_h = None if grad_h is None else grad_h.reshape(-1, grad_h.size(-1)).clone()
        grad_h, down_grads = _backward_projections([grad_down], h, [down], True, grad_h)
        del h
        grad_g, grad_u = ops.silu_mul_backward(g, u, grad_h)
        del grad_h
        normed = ops.rmsnorm(x, norm_weight, ctx.eps)[0]
        need_x = ctx.needs_input_grad[0]
        grad_n, gate_up_grads = _backward_projections([grad_g, grad_u], normed.reshape(-1, x.size(-1)), [gate, up], need_x)
        grad_x = ops.rmsnorm_backward(x, norm_weight, rstd, grad_n.view_as(x)) if need_x else None
        return grad_x, None, None, None, *[g for pair in gate_up_grads + down_grads for g in _projection_grads(pair)]


class BaseAfterLora(torch.autograd.Function):
    """y = x W^T + lora_out, for ``lora_out`` from ``LoraLinear(..., with_base=False)`` or
    ``NormedSwiGLU`` (which add the bias) on the same x, and which own x's whole gradient: this
    node saves nothing and passes the gradient on.

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


class LinearCrossEntropySum(torch.autograd.Function):
    """sum_i weights[i] * cross_entropy(hidden[i] @ W^T, targets[i]) for a frozen W (the lm_head),
    a chunk of rows at a time: each chunk's [rows, vocab] logits are made, turned into their own
    gradient in place (``ops.cross_entropy_rows``) and multiplied back into hidden's gradient at
    once, so no logit outlives its chunk and backward only scales what the forward kept
    ([rows, hidden]): two matmuls a chunk, not three as with a recompute.

    Liger-Kernel's fused linear cross-entropy does the same, and reads its target count to the
    host (``.item()``) on every call; that sync holds the CPU until the GPU has run the whole
    forward, so the backward is never queued ahead (BENCHMARKS.md). Nothing here reads the GPU.
    """

    CHUNK = 1024  # rows: a [1024, 32k] bf16 logits chunk is 66 MB

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights):
        w = weight.to(hidden.dtype)
        need = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if need else None
        # fp32 (fp64 stays fp64), as the cross-entropy returns it
        losses = torch.empty(hidden.size(0), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for s in range(0, hidden.size(0), LinearCrossEntropySum.CHUNK):
            e = s + LinearCrossEntropySum.CHUNK
            logits = hidden[s:e] @ w.t()
            losses[s:e] = ops.cross_entropy_rows(logits, targets[s:e], weights[s:e], need)
            if need:
                torch.mm(logits, w, out=grad_hidden[s:e])
        ctx.save_for_backward(grad_hidden)
        return losses @ weights.to(losses.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None

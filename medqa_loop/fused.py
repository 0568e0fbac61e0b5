"""Fused autograd functions: the same maths as the modules they replace, fewer tensors kept.

Without activation checkpointing, what a step can hold is set by what each op saves for its
backward. The stock modules save a lot that backward can cheaply recompute:

* PEFT's LoRA on a bf16 base casts the input to the adapters' fp32 (one fp32 copy per
  projection), applies dropout (another copy, plus its mask) and runs lora_A on that copy, which
  saves it. Per layer that is ~230 KB a token, more than everything else together.
  ``LoraLinear`` runs base + LoRA as one node in the activation dtype and saves the input (the
  same tensor the sibling projections save), the r-wide ``dropout(x) A^T`` and a seed: the dropout
  mask is drawn again from the seed in backward. The base weight may be bitsandbytes' int8 (then
  dequantized per matmul, as medqa_loop.quant) or a plain frozen weight.
* RMSNorm up-casts to fp32 and keeps three fp32 intermediates; ``RMSNormFn`` keeps the bf16 input
  and one fp32 scalar per token.
* SiLU(gate) * up keeps gate, SiLU(gate) and up; ``SiluMul`` keeps gate and up.
* transformers' rotary embedding runs four broadcasting multiplies, a ``cat`` and a ``neg`` on
  strided q and k, and keeps them for backward; ``RotaryFn`` keeps cos and sin.

Two more changes cost no memory and save time:

* The MLP's down_proj, the last matmul of a decoder layer, runs its frozen matmul in a node
  after its LoRA node (``BaseAfterLora``): an activation-checkpointed layer's recompute then
  stops before it, since its output is never needed by backward.
* On CUDA the elementwise maths of the norm, SwiGLU and rotary embedding (forward and backward)
  runs as one Triton kernel each (``medqa_loop.triton_kernels``), and LoRA's dropout (a hash of
  a seed, ``medqa_loop.dropout``) is applied inside lora_A's matmul; on the CPU, and wherever a
  kernel does not cover its inputs, the eager maths (transformers' own, for the rotary) runs.

Measured on Mistral-7B without checkpointing (bf16, 2k-token rows, BENCHMARKS.md): 32 GB peak
with the stock modules and SDPA, 19 GB with these and varlen attention (~5 MB of activations a
token over 32 layers, from ~12). ``use_fused_ops`` swaps the forward of each module instance;
parameters, state dicts, PEFT saving/merging and hooks on the modules are unchanged, and
anything the fused path does not cover (merged or disabled adapters, several adapters,
trainable norms) runs the stock forward. The attention's forward is transformers' own code with
only its rotary function swapped (``_with_fused_rotary``).
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F

from medqa_loop.dropout import dropout_args, dropped_grad, dropped_linear, dropped_product
from medqa_loop.gpu import triton_ops
from medqa_loop.quant import dequantize, int8_state, uses_dequant_matmul


def _f32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64: the gradient checks run in it)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# The eager maths of the norm and SwiGLU: what the CPU runs, the reference for the Triton kernels
# that run on CUDA (medqa_loop.triton_kernels; fp32 inside, so fp64 stays here).


def _gpu(t: torch.Tensor):
    return triton_ops(t) if t.dtype != torch.float64 else None


def _rmsnorm(x, weight, eps: float):
    if (gpu := _gpu(x)) is not None:
        return gpu.rmsnorm(x, weight, eps)
    rstd = torch.rsqrt(_f32(x).pow(2).mean(-1, keepdim=True) + eps)
    return weight * (_f32(x) * rstd).to(x.dtype), rstd


def _rmsnorm_backward(x, weight, rstd, grad_y):
    if (gpu := _gpu(x)) is not None:
        return gpu.rmsnorm_backward(x, weight, rstd, grad_y)
    x_hat = _f32(x) * rstd
    dy = _f32(grad_y) * _f32(weight)
    return (rstd * (dy - x_hat * (dy * x_hat).mean(-1, keepdim=True))).to(x.dtype)


def _silu_mul(gate, up):
    if (gpu := _gpu(gate)) is not None:
        return gpu.silu_mul(gate, up)
    return F.silu(_f32(gate)).to(gate.dtype) * up


def _silu_mul_backward(gate, up, grad_h):
    if (gpu := _gpu(gate)) is not None:
        return gpu.silu_mul_backward(gate, up, grad_h)
    g, grad_f = _f32(gate), _f32(grad_h)
    sig = torch.sigmoid(g)
    grad_gate = grad_f * _f32(up) * sig * (1 + g * (1 - sig))
    return grad_gate.to(gate.dtype), (grad_f * g * sig).to(up.dtype)


def _frozen_weight(w: torch.Tensor, scb: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight in ``dtype``: bitsandbytes' int8 (``scb`` given) dequantized, else cast."""
    return dequantize(w, scb, dtype) if scb is not None else w.to(dtype)


class LoraLinear(torch.autograd.Function):
    """y = x W^T + b + scale * (dropout(x) A^T) B^T, W and b frozen, A and B trained.

    Matmuls run in x's dtype (A, B are cast; their gradients are returned in their own dtype,
    fp32, as autograd's cast would). An int8 W (``scb`` given) is dequantized per matmul
    (medqa_loop.quant). Saved: x, W (int8 or frozen, no copy), the cast A and B (r wide, so
    backward does not cast again), xa = scale/(1-p) * dropout(x) A^T (LoRA's scale and dropout's
    1/(1-p) go on this r-wide tensor, where they are cheap). The dropout mask is the hash of
    ``seed`` (medqa_loop.dropout), applied inside the kernels that read x or write its gradient.

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
            xa = dropped_linear(x2, a, dropout_args(p, seed, x2.numel()), scale / (1.0 - p))
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
        grad_a = (dropped_grad(g_xa, x2, drop) if p > 0 else g_xa.t() @ x2).to(a_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:  # the first layer's input comes from frozen embeddings
            lora_part = dropped_product(g_xa, a, drop) if p > 0 else g_xa @ a  # zero where x was dropped
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
        y, rstd = _rmsnorm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        return _rmsnorm_backward(x, weight, rstd, grad_y), None, None


class SiluMul(torch.autograd.Function):
    """h = silu(gate) * up (Mistral's SwiGLU); keeps gate and up, recomputes silu in backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _silu_mul(gate, up)

    @staticmethod
    def backward(ctx, grad_h):
        gate, up = ctx.saved_tensors
        return _silu_mul_backward(gate, up, grad_h)


class RotaryFn(torch.autograd.Function):
    """(q, k) rotated by the position embedding (cos, sin), as transformers' apply_rotary_pos_emb,
    in one Triton kernel each way (``_rotary_covers`` says when); keeps only cos and sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        gpu = triton_ops(q)
        return gpu.rotary(q, cos, sin), gpu.rotary(k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        gpu = triton_ops(cos)
        grads = [None if g is None else gpu.rotary(_as_bthd(g), cos, sin, backward=True) for g in (grad_q, grad_k)]
        return *grads, None, None


def _bthd(t: torch.Tensor) -> bool:
    """[batch, heads, tokens, dim] laid out as [batch, tokens, heads, dim] (the projections' layout)."""
    return t.dim() == 4 and t.transpose(1, 2).is_contiguous()


def _as_bthd(t: torch.Tensor) -> torch.Tensor:
    return t if _bthd(t) else t.transpose(1, 2).contiguous().transpose(1, 2)


def _rotary_covers(q, k, cos, sin) -> bool:
    dim = q.size(-1)
    return (
        triton_ops(q) is not None and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and _bthd(q) and _bthd(k) and k.dtype == q.dtype and k.shape[::2] == q.shape[::2] and k.size(-1) == dim
        and cos.shape == sin.shape == (q.size(0), q.size(2), dim) and dim % 2 == 0 and (dim // 2) & (dim // 2 - 1) == 0
    )


def _rotary_with_fallback(eager):
    """An apply_rotary_pos_emb that runs RotaryFn where it covers the inputs, else ``eager`` (the
    model's own function: on the CPU, in fp64, with other layouts or arguments)."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or kwargs or not _rotary_covers(q, k, cos, sin):
            return eager(q, k, cos, sin, *args, **kwargs)
        return RotaryFn.apply(q, k, cos, sin)

    return apply_rotary_pos_emb


def _with_fused_rotary(forward):
    """A copy of an attention class's forward (transformers' own code, its decorators peeled off:
    they only rename deprecated keywords, which medqa_loop's layers do not pass) whose global
    ``apply_rotary_pos_emb`` is ``_rotary_with_fallback`` of the original; None if the forward
    does not call it. Per instance, unlike patching transformers' module."""
    fn = inspect.unwrap(forward)
    eager = fn.__globals__.get("apply_rotary_pos_emb")
    if eager is None or "apply_rotary_pos_emb" not in fn.__code__.co_names:
        return None
    globals_ = {**fn.__globals__, "apply_rotary_pos_emb": _rotary_with_fallback(eager)}
    copy = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


# -- swapping the forwards --------------------------------------------------------------------


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT LoRA layer forward through LoraLinear, when it is the plain single-adapter case."""
    names = [n for n in self.active_adapters if n in self.lora_A]
    variants = getattr(self, "lora_variant", {})  # DoRA and friends (newer PEFT)
    if self.disable_adapters or self.merged or args or kwargs or len(names) != 1 or names[0] in variants:
        return type(self).forward(self, x, *args, **kwargs)
    name = names[0]
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and self.training else 0.0
    # Drawn from the global CPU generator: seeded runs repeat, and activation checkpointing
    # (which restores the RNG state for its recompute) draws the same seed again.
    seed = int(torch.randint(2**62, ())) if p > 0 else 0
    base = self.get_base_layer()
    w, scb = int8_state(base) if base.weight.dtype == torch.int8 else (base.weight, None)
    lora = (self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p, seed)
    if getattr(self, "_medqa_base_last", False):  # the layer's last projection: see BaseAfterLora
        return BaseAfterLora.apply(x, w, scb, LoraLinear.apply(x, w, scb, base.bias, *lora, False))
    return LoraLinear.apply(x, w, scb, base.bias, *lora)


def _rmsnorm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad:
        return type(self).forward(self, x)
    return RMSNormFn.apply(x, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def use_fused_ops(model: torch.nn.Module) -> dict[str, int]:
    """Route LoRA linears, RMSNorms and SiLU MLPs of ``model`` (after PEFT wrapping) through the
    fused functions; return how many of each. Call after ``use_dequant_matmul``/``get_peft_model``.
    LoRA layers over bitsandbytes' LLM.int8 matmul (``model.int8_matmul: bnb``) are left alone."""
    from peft.tuners.lora import LoraLayer

    counts = {"lora": 0, "rmsnorm": 0, "mlp": 0, "rotary": 0}
    for module in model.modules():
        kind = type(module).__name__
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), torch.nn.Linear):
            base = module.get_base_layer()
            if base.weight.dtype == torch.int8 and not uses_dequant_matmul(base):
                continue  # LLM.int8 was asked for
            module.forward = types.MethodType(_lora_forward, module)
            counts["lora"] += 1
        elif kind.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rmsnorm_forward, module)
            counts["rmsnorm"] += 1
        elif kind.endswith("Attention") and (forward := _with_fused_rotary(type(module).forward)) is not None:
            module.forward = types.MethodType(forward, module)
            counts["rotary"] += 1
        elif kind.endswith("MLP") and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_mlp_forward, module)
            module.down_proj._medqa_base_last = True  # the last matmul of a decoder layer
            counts["mlp"] += 1
    return counts

"""The fast compute path for the 8-bit base: int8 weights in memory, bf16 (or fp32) matmuls.

bitsandbytes' LLM.int8 matmul quantizes the *activations* to int8 on every call (and splits off
outlier columns in fp16); on an H100 its backward is the slowest part of a LoRA step. Here the
frozen weight stays bitsandbytes' int8 (row-wise absmax, ``CB``/``SCB``) and is dequantized to
the activation dtype right before a regular matmul, in the forward and again in the backward:
one Triton kernel reads the int8 weight and its row scales and writes the scaled weight.
Nothing but the int8 weight is kept between forward and backward (the input is not saved: the
frozen weight needs no gradient), so no full-precision copy of the base is ever alive for
longer than one matmul. Numerically it is weight-only int8 quantization: closer to the
unquantized model than LLM.int8, which also rounds the activations.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from medqa_loop.gpu import triton_ops


def int8_state(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [out, in], SCB fp32 [out]) of a bitsandbytes Linear8bitLt.

    bitsandbytes moves SCB from the weight to ``module.state`` on its first forward; either place.
    """
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return module.weight.data, scb


def dequantize(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = CB * SCB/127 in ``dtype``, computed in at least fp32 and rounded once, as
    bitsandbytes dequantizes; one Triton kernel on CUDA. One pass over the weight; scaling the
    matmul's output instead costs a pass over [tokens, out], which is larger than the weight
    once a batch holds more than ~3k tokens."""
    if (gpu := triton_ops(cb)) is not None and dtype != torch.float64:  # the kernel is fp32 inside
        return gpu.dequantize(cb, scb, dtype)
    wide = torch.promote_types(dtype, torch.float32)
    return (cb.to(wide) * (scb * (1 / 127.0)).to(wide)[:, None]).to(dtype)


class DequantLinear(torch.autograd.Function):
    """y = x W^T + b with the int8 W dequantized per call; gradient for x only (W, b are frozen)."""

    @staticmethod
    def forward(ctx, x, cb, scb, bias):
        ctx.save_for_backward(cb, scb)
        return F.linear(x, dequantize(cb, scb, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        cb, scb = ctx.saved_tensors
        return grad_out @ dequantize(cb, scb, grad_out.dtype), None, None, None


def _dequant_forward(self, x: torch.Tensor) -> torch.Tensor:
    cb, scb = int8_state(self)
    return DequantLinear.apply(x, cb, scb, self.bias)


def uses_dequant_matmul(module) -> bool:
    """Whether ``use_dequant_matmul`` routed this bitsandbytes layer (else: LLM.int8)."""
    return getattr(module.forward, "__func__", None) is _dequant_forward


def use_dequant_matmul(model: torch.nn.Module) -> int:
    """Route every bitsandbytes Linear8bitLt of ``model`` through DequantLinear; return how many.

    The modules, their int8 weights and their state dict stay bitsandbytes' own, so saving,
    PEFT wrapping and ``model.int8_matmul: bnb`` (which skips this) are unaffected.
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            module.forward = types.MethodType(_dequant_forward, module)
            n += 1
    return n

"""Patching transformers' and PEFT's modules onto the fast path: each swap replaces the forward
of a module *instance* with one that calls ``medqa_loop.kernels.autograd``; transformers' and
PEFT's classes and modules are never touched.

Parameters, state dicts, PEFT saving/merging and hooks on the modules are unchanged, and
anything the fused path does not cover (merged or disabled adapters, several adapters, trainable
norms, DoRA) runs the stock forward. The attention's forward is transformers' own code with only
its rotary function swapped (``_with_fused_rotary``). The swaps:

* ``use_dequant_matmul`` (``model.int8_matmul: dequant``): every bitsandbytes Linear8bitLt
  through ``DequantLinear``; its int8 weight and state dict stay bitsandbytes' own.
* ``use_fused_ops`` (``model.fused_ops: true``): LoRA linears through ``LoraLinear`` (the MLP's
  down_proj through ``BaseAfterLora`` too), RMSNorms through ``RMSNormFn``, SiLU MLPs through
  ``SiluMul``, the attention's ``apply_rotary_pos_emb`` through ``RotaryFn`` where it covers the
  inputs, and the causal LM's loss head (``_target_loss_forward``): called with a batch's target
  positions, it returns the weighted loss sum from the final hidden states at those positions
  (``ops.linear_cross_entropy_sum``), never computing a logit elsewhere or keeping one. Then
  each Mistral or Llama decoder layer whose projections those swaps routed gets
  ``medqa_loop.kernels.decoder``'s forward: the whole layer as four fused nodes (less memory a
  token, less CPU time), which runs the per-module path above where it might differ. The
  decoder stack's forward draws each forward's LoRA dropout seeds first (``_seeding_forward``,
  ``medqa_loop.kernels.seeds``).
* ``register_varlen_attention`` (``model.attn_implementation: varlen``): the packed-pair attention
  of ``medqa_loop.kernels.attention`` under that name in transformers' attention registry.
"""

from __future__ import annotations

import inspect
import types

import torch

from medqa_loop.kernels import attention, decoder, ops
from medqa_loop.kernels.autograd import BaseAfterLora, DequantLinear, LoraLinear, RMSNormFn, RotaryFn, SiluMul
from medqa_loop.kernels.seeds import DropoutSeeds


def int8_state(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [out, in], SCB fp32 [out]) of a bitsandbytes Linear8bitLt.

    bitsandbytes moves SCB from the weight to ``module.state`` on its first forward; either place.
    """
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return module.weight.data, scb


def _dequant_forward(self, x: torch.Tensor) -> torch.Tensor:
    cb, scb = int8_state(self)
    return DequantLinear.apply(x, cb, scb, self.bias)


def uses_dequant_matmul(module) -> bool:
    """Whether ``use_dequant_matmul`` routed this bitsandbytes layer (else: LLM.int8)."""
    return getattr(module.forward, "__func__", None) is _dequant_forward


def use_dequant_matmul(model: torch.nn.Module) -> int:
    """Route every bitsandbytes Linear8bitLt of ``model`` through DequantLinear; return how many."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            module.forward = types.MethodType(_dequant_forward, module)
            n += 1
    return n


def register_varlen_attention() -> None:
    """Make ``attn_implementation="varlen"`` known to transformers (idempotent). Batches without
    pair boundaries go to transformers' SDPA, for which the same name gets the SDPA mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(attention.NAME, attention.varlen_attention)
    AttentionMaskInterface.register(attention.NAME, sdpa_mask)


def _rotary_with_fallback(eager):
    """An apply_rotary_pos_emb that runs RotaryFn where it covers the inputs, else ``eager`` (the
    model's own function: on the CPU, in fp64, with other layouts or arguments)."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or kwargs or not ops.rotary_covers(q, k, cos, sin):
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
    copy._medqa_fused_rotary = True  # what fast_path_report counts
    return copy


def _plain_adapter(self) -> str | None:
    """The name of a PEFT LoRA layer's one active adapter when it is the plain case the fused
    functions compute (not merged or disabled, one adapter, no DoRA-like variant), else None."""
    names = [n for n in self.active_adapters if n in self.lora_A]
    variants = getattr(self, "lora_variant", {})  # DoRA and friends (newer PEFT)
    if self.disable_adapters or self.merged or len(names) != 1 or names[0] in variants:
        return None
    return names[0]


def projection_args(module, seeded: bool = True) -> tuple | None:
    """The 8 arguments (autograd.PROJECTION_ARGS) the fused functions take for one projection:
    a routed PEFT LoRA layer in the plain case (with, when it trains with dropout and
    ``seeded``, the running forward's seed for it: kernels.seeds), or a frozen linear without
    LoRA (a dequantized bitsandbytes layer or a plain Linear); None for anything else (LLM.int8,
    several adapters, a trained base...)."""
    if getattr(module.forward, "__func__", None) is _lora_forward:
        name = _plain_adapter(module)
        if name is None:
            return None
        dropout = module.lora_dropout[name]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) and module.training else 0.0
        seed = module._medqa_seeds.seed(module._medqa_seed_slot) if p > 0 and seeded else None
        base = module.get_base_layer()
        w, scb = int8_state(base) if base.weight.dtype == torch.int8 else (base.weight, None)
        return w, scb, base.bias, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name], p, seed
    if uses_dequant_matmul(module):
        return (*int8_state(module), module.bias, None, None, 0.0, 0.0, None)
    if type(module) is torch.nn.Linear and not module.weight.requires_grad:
        return module.weight, None, module.bias, None, None, 0.0, 0.0, None
    return None


def dropout_seeds(model) -> DropoutSeeds | None:
    """The LoRA dropout seeds of a model ``use_fused_ops`` patched (its DDP and PEFT wrappers
    looked through), or None."""
    for module in model.modules():
        if getattr(module.forward, "__func__", None) is _seeding_forward:
            return module._medqa_seeds
    return None


def _seeding_forward(self, *args, **kwargs):
    """The decoder stack's forward, after drawing the LoRA dropout seeds of this forward
    (kernels.seeds): once per forward of the model, never in a checkpointed layer's recompute."""
    self._medqa_seeds.draw(self.embed_tokens.weight.device)
    return type(self).forward(self, *args, **kwargs)


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT LoRA layer forward through LoraLinear, when it is the plain single-adapter case."""
    projection = None if args or kwargs else projection_args(self)  # None: not the plain case
    if projection is None:
        return type(self).forward(self, x, *args, **kwargs)
    w, scb, bias, *lora = projection
    inference = not torch.is_grad_enabled()  # no backward to come: LoRA folds into the weight
    if getattr(self, "_medqa_base_last", False) and not inference:  # the layer's last projection: see BaseAfterLora
        return BaseAfterLora.apply(x, w, scb, LoraLinear.apply(x, w, scb, bias, *lora, False))
    return LoraLinear.apply(x, w, scb, bias, *lora, True, inference)


def _target_loss_forward(
    self, input_ids=None, attention_mask=None, position_ids=None, *, target_positions=None, targets=None,
    target_weights=None, **kwargs,
):
    """A causal LM's forward that, given a batch's target positions (batching.Batch), returns as
    ``.loss`` the sum of target_weights x cross-entropy of the next token there, from the final
    hidden states at those positions: no lm_head over prompt positions, no [tokens, vocab] logits
    kept. Without them (generation, evaluation) it is the stock forward. Called through PEFT's and
    DDP's forwards like any forward, so DDP's gradient bookkeeping sees it."""
    if target_positions is None:
        return type(self).forward(self, input_ids, attention_mask, position_ids, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # PEFT passes labels=None and the like
    hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    rows = hidden.last_hidden_state.flatten(0, 1)[target_positions]
    return CausalLMOutputWithPast(
        loss=ops.linear_cross_entropy_sum(rows, self.lm_head.weight, targets, target_weights)
    )


def uses_target_loss(model) -> bool:
    """Whether ``model`` (its DDP and PEFT wrappers looked through) has the fused loss head."""
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return getattr(model.forward, "__func__", None) is _target_loss_forward


def _rmsnorm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad:
        return type(self).forward(self, x)
    return RMSNormFn.apply(x, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def use_fused_ops(model: torch.nn.Module) -> dict[str, int]:
    """Route LoRA linears, RMSNorms, SiLU MLPs, the attention's rotary embedding and the loss head
    of ``model`` (after PEFT wrapping) through the fused functions; return how many of each. Call after
    ``use_dequant_matmul`` and ``get_peft_model``.
    LoRA layers over bitsandbytes' LLM.int8 matmul (``model.int8_matmul: bnb``) are left alone."""
    from peft.tuners.lora import LoraLayer

    counts = {"lora": 0, "rmsnorm": 0, "mlp": 0, "rotary": 0, "loss_head": 0, "decoder_layer": 0}
    seeds = DropoutSeeds()
    modules = list(model.modules())
    for module in modules:
        kind = type(module).__name__
        if kind.endswith("ForCausalLM") and hasattr(module._modules.get("model"), "embed_tokens"):
            stack = module.model  # the decoder stack: each forward draws the LoRA dropout seeds
            stack._medqa_seeds = seeds
            stack.forward = types.MethodType(_seeding_forward, stack)
        # transformers' causal LM itself, whose own child is a plain lm_head (not PEFT's wrapper,
        # which only forwards attribute reads to it, nor an lm_head LoRA trains)
        if kind.endswith("ForCausalLM") and type(module._modules.get("lm_head")) is torch.nn.Linear:
            module.forward = types.MethodType(_target_loss_forward, module)
            counts["loss_head"] += 1
        elif isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), torch.nn.Linear):
            base = module.get_base_layer()
            if base.weight.dtype == torch.int8 and not uses_dequant_matmul(base):
                continue  # LLM.int8 was asked for
            module.forward = types.MethodType(_lora_forward, module)
            module._medqa_seeds, module._medqa_seed_slot = seeds, seeds.slot(module)
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
    # Last: whether a layer is covered depends on its projections' swaps above.
    for module in modules:
        if decoder.covers(module, projection_args):
            module.forward = types.MethodType(decoder.decoder_layer_forward, module)
            counts["decoder_layer"] += 1
    return counts


class FastPathError(ValueError):
    """On CUDA the fast path was asked for but does not run (a swap found no module, or Triton is
    missing); the message says how to fall back."""


def fast_path_report(model, cfg, device) -> dict:
    """What runs, read off the model after patching: the attention, the int8 matmul, how many
    modules of each kind run the fused functions, and whether their small kernels are Triton or
    the eager reference. The first line of metrics.jsonl holds it."""
    from peft.tuners.lora import LoraLayer

    def routed(kind) -> int:
        return sum(1 for m in model.modules() if getattr(m.forward, "__func__", None) is kind)

    cuda = torch.device(device).type == "cuda"
    attention_kind = cfg.model.attn_implementation
    if attention_kind == attention.NAME:
        half = cfg.model.dtype in ("bfloat16", "float16")
        attention_kind += " (FlashAttention-2 per pair)" if cuda and half else " (one SDPA per pair)"
    if not cfg.model.load_in_8bit:
        int8 = "none (16/32-bit base)"
    elif cfg.model.int8_matmul == "dequant":
        int8 = "dequant (int8 weights dequantized per matmul)"
    else:
        int8 = "bnb (bitsandbytes LLM.int8)"
    return {
        "attention": attention_kind,
        "int8_matmul": int8,
        "fused_ops": cfg.model.fused_ops,
        "fused_lora_linears": routed(_lora_forward),
        "fused_rmsnorms": routed(_rmsnorm_forward),
        "fused_mlps": routed(_mlp_forward),
        "fused_rotary": sum(1 for m in model.modules() if getattr(getattr(m.forward, "__func__", None), "_medqa_fused_rotary", False)),
        "fused_loss_head": routed(_target_loss_forward),
        "fused_decoder_layers": routed(decoder.decoder_layer_forward),
        "dequantized_linears": routed(_dequant_forward),
        "lora_linears": sum(1 for m in model.modules() if isinstance(m, LoraLayer)),
        "kernels": "triton" if cuda and ops.triton_available() else "eager reference",
    }


def describe(report: dict) -> str:
    """The start-up line."""
    fused = (
        f"fused: {report['fused_lora_linears']} of {report['lora_linears']} LoRA linears, {report['fused_rmsnorms']} "
        f"RMSNorms, {report['fused_mlps']} MLPs, {report['fused_rotary']} rotary embeddings, with {report['kernels']} kernels; "
        f"{report['fused_decoder_layers']} decoder layers as fused nodes; "
        f"loss head over target positions: {report['fused_loss_head']}"
        if report["fused_ops"] else "fused ops off (transformers' and PEFT's modules)"
    )
    return (
        f"fast path: attention {report['attention']}; int8 matmul {report['int8_matmul']} "
        f"({report['dequantized_linears']} linears dequantized); {fused}"
    )


def check_fast_path(report: dict, cfg, on_cuda: bool) -> None:
    """On CUDA, where speed is the point, a fast path that was asked for and does not run is an
    error, never a silent slow run: a swap that found no module (a transformers or PEFT release
    renamed a class) or Triton missing."""
    if not on_cuda:
        return
    missing = []
    if cfg.model.fused_ops:
        if report["kernels"] != "triton":
            missing.append("Triton does not import, so the fused ops would run their eager reference")
        for key, what in (("fused_lora_linears", "LoRA linears"), ("fused_rmsnorms", "RMSNorms"),
                          ("fused_mlps", "MLPs"), ("fused_rotary", "attention rotary embeddings")):
            if report[key] == 0:
                missing.append(f"no {what} were swapped for the fused functions (a renamed class?)")
    if missing:
        raise FastPathError(
            "model.fused_ops=true, but " + "; ".join(missing) + ". Set model.fused_ops=false to run transformers' "
            "and PEFT's own modules (slower, more memory), or install a Triton that matches torch"
        )
    if cfg.model.load_in_8bit and cfg.model.int8_matmul == "dequant" and report["dequantized_linears"] == 0:
        raise FastPathError(
            "model.int8_matmul=dequant, but no bitsandbytes linear was found to dequantize; set model.int8_matmul=bnb"
        )

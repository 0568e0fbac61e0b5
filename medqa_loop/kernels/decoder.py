"""A Mistral (or Llama) decoder layer's forward as four fused nodes, for a training step
(``medqa_loop.kernels.patch.use_fused_ops`` puts it on each layer it covers):

    q, k, v  = NormedProjections(x)                 input_layernorm, then q_proj, k_proj, v_proj
    rotary, attention (transformers' attention function, as the stock attention calls it)
    x        = x + LoraLinear(attention output)     o_proj
    h, lora  = NormedSwiGLU(x)                      post_attention_layernorm, gate_proj, up_proj,
                                                    SiLU(gate) * up, down_proj's LoRA
    x        = x + BaseAfterLora(h, lora)           down_proj's frozen matmul

The maths is the stock layer's (the same as the per-module fast path: the same kernels, and the
same LoRA dropout seeds, so the masks are the same).
Two things change. Activations: an uncheckpointed layer keeps neither normed input nor the
SwiGLU product h, which backward recomputes in elementwise passes: 22,528 of a Mistral-7B layer's
69,632 values a token, a third less memory a token (BENCHMARKS.md). And CPU time: one Python
function instead of ~20 module calls, PEFT's and transformers' wrappers among them. A forward
with no backward to come (evaluation) runs down_proj whole in NormedSwiGLU, and folds each LoRA
into its frozen weight (``autograd._project``).

The layer runs its stock forward (whose modules the per-module swaps route through the fused
functions) whenever this one might not be the same: a KV cache (generation), a projection that
is not one plain LoRA adapter (merged, disabled, several, DoRA) or a frozen linear, a hook on any
of its modules (the gradient debugger watches the LoRA layers' outputs), or no rotary embedding
passed in.
"""

from __future__ import annotations

import sys
from functools import partial

import torch
from torch.nn.modules import module as nn_module

from medqa_loop.kernels import ops
from medqa_loop.kernels.autograd import BaseAfterLora, NormedProjections, NormedSwiGLU, RotaryFn

# The layers whose forward is exactly "pre-norm attention, residual, pre-norm SiLU MLP, residual"
# with these children; other architectures (extra norms, q/k norms, fused or sparse projections)
# keep their stock forward.
COVERED = ("MistralDecoderLayer", "LlamaDecoderLayer")
_CHILDREN = {
    "layer": {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"},
    "self_attn": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "mlp": {"gate_proj", "up_proj", "down_proj", "act_fn"},
}
_ATTENTION = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def covers(layer, projection_args) -> bool:
    """Whether ``layer`` has the structure this forward computes (checked once, when patching);
    ``projection_args(module, seeded=False)`` tells whether a projection is one it can run."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    modeling = sys.modules.get(type(attn).__module__)
    return (
        type(layer).__name__ in COVERED
        and set(layer._modules) == _CHILDREN["layer"]
        and set(attn._modules) == _CHILDREN["self_attn"]
        and set(mlp._modules) == _CHILDREN["mlp"]
        and type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
        and all(hasattr(n, "variance_epsilon") for n in (layer.input_layernorm, layer.post_attention_layernorm))
        and hasattr(modeling, "apply_rotary_pos_emb") and hasattr(modeling, "ALL_ATTENTION_FUNCTIONS")
        and all(projection_args(m, seeded=False) is not None for m in _projection_modules(layer))
    )


def _projection_modules(layer) -> list:
    attn, mlp = layer.self_attn, layer.mlp
    return [getattr(attn, n) for n in _ATTENTION] + [attn.o_proj] + [getattr(mlp, n) for n in _MLP]


def _hooked(modules) -> bool:
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks or nn_module._global_backward_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules)


def _checkpoints_in_call() -> bool:
    """Whether transformers checkpoints a layer in ``GradientCheckpointingLayer.__call__``, around
    whatever forward the instance has (5.17); later releases wrap the class's ``forward``
    instead, which an instance's own forward bypasses, so this forward checkpoints itself there."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return "__call__" in GradientCheckpointingLayer.__dict__


def decoder_layer_forward(self, hidden_states, *args, **kwargs):
    """The layer's forward through the fused nodes (module docstring), or its stock forward."""
    stock = (
        args or kwargs.get("position_embeddings") is None
        or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
    )
    if not stock:
        modules = _projection_modules(self)
        stock = _hooked([self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm, *modules])
    if not stock:
        from medqa_loop.kernels.patch import projection_args

        # Checked on every call (generation disables adapters at run time), and kept: the
        # fused forward takes these, with this forward's dropout seeds.
        projections = [projection_args(m) for m in modules]
        stock = any(p is None for p in projections)
    if stock:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    checkpointed = getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled()
    if checkpointed and not _checkpoints_in_call():
        return self._gradient_checkpointing_func(partial(_fused_forward, self, projections, **kwargs), hidden_states)
    return _fused_forward(self, projections, hidden_states, **kwargs)


def _fused_forward(self, projections: list[tuple], hidden_states, **kwargs):
    """The fused nodes, given the layer's q, k, v, o, gate, up, down projection_args."""
    attn, ln1, ln2 = self.self_attn, self.input_layernorm, self.post_attention_layernorm
    modeling = sys.modules[type(attn).__module__]
    q, k, v = projections[:3]
    attention_mask = kwargs.pop("attention_mask", None)
    cos, sin = kwargs.pop("position_embeddings")
    kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    # What is left (position_ids, use_cache, a packed row's cu_seq_lens, ...) goes to the attention
    # function, as the stock attention passes it.

    # Without a backward to come (evaluation, sampling) each LoRA folds into its frozen weight
    # (autograd._project), and down's frozen matmul need not come after its LoRA node
    # (BaseAfterLora, there for a recompute), so it runs in NormedSwiGLU.
    inference = not torch.is_grad_enabled()
    shape = hidden_states.shape[:-1]
    heads = (*shape, -1, attn.head_dim)
    q, k, v = (t.view(heads).transpose(1, 2) for t in NormedProjections.apply(
        hidden_states, ln1.weight, ln1.variance_epsilon, inference, *q, *k, *v))
    if ops.rotary_covers(q, k, cos, sin):
        q, k = RotaryFn.apply(q, k, cos, sin)
    else:
        q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
    attention = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, modeling.eager_attention_forward)
    out, _ = attention(
        attn, q, k, v, attention_mask,
        dropout=attn.attention_dropout if attn.training else 0.0, scaling=attn.scaling,
        sliding_window=getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None)), **kwargs,
    )
    # o_proj's own forward: patch's routing (LoraLinear, DequantLinear or a plain Linear), which
    # the checks above found plain and unhooked
    hidden_states = hidden_states + attn.o_proj(out.reshape(*shape, -1).contiguous())

    gate, up, down = projections[4:]
    h, down_out = NormedSwiGLU.apply(hidden_states, ln2.weight, ln2.variance_epsilon, inference, *gate, *up, *down)
    return hidden_states + (down_out if inference else BaseAfterLora.apply(h, down[0], down[1], down_out))

"""The fused decoder layer (medqa_loop.kernels.decoder): the per-module fast path's numbers, less
memory kept for backward, and the per-module path wherever a hook watches a module."""

import pytest
import torch

from conftest import OpLog, loss_and_grads, rel, set_lora
from medqa_loop.batching import collate, to_device
from medqa_loop.kernels import decoder
from medqa_loop.model import decoder_layers, model_logits, model_loss_sum
from medqa_loop.train import prepare_run


def build(tiny_cfg, tmp_path, name, *overrides):
    parts = prepare_run(tiny_cfg(f"output_dir={tmp_path / name}", "model.attn_implementation=sdpa", *overrides))
    parts.model.train()
    set_lora(parts.model)
    return parts


def packed(parts):
    batch = collate(parts.train_examples[:3], pad_id=parts.tokenizer.pad_token_id, packed=True)
    return to_device(batch, parts.accelerator.device)


def per_module(model):
    """Force every decoder layer onto the per-module path: a do-nothing hook on each q_proj."""
    return [layer.self_attn.q_proj.register_forward_hook(lambda *a: None) for layer in decoder_layers(model)]




@pytest.mark.parametrize(("gc", "targets"), [
    (False, "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"),
    (True, "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"),
    (False, "[q_proj,v_proj]"),  # the other five: frozen linears inside the fused nodes
], ids=["no-checkpointing", "checkpointed", "lora-on-q-and-v"])
def test_fused_layers_equal_the_per_module_path_with_dropout(tiny_cfg, tmp_path, gc, targets):
    """The same kernels and the same dropout seeds, drawn in the same order: the same loss and
    LoRA gradients, in fp32 to rounding, with and without activation checkpointing, with LoRA
    on every projection or on a few."""
    parts = build(tiny_cfg, tmp_path, "m", "lora.dropout=0.2", f"model.gradient_checkpointing={gc}",
                  f"lora.target_modules={targets}")
    model, batch = parts.model, packed(parts)
    calls = []
    layer0 = decoder_layers(model)[0]
    original = decoder._fused_forward
    try:  # count the fused bodies that run, so the comparison below is fused against per-module
        decoder._fused_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
        got_loss, got = loss_and_grads(model, batch)
        assert len(calls) >= len(decoder_layers(model))  # every layer (again in a recompute)
        handles = per_module(model)
        calls.clear()
        want_loss, want = loss_and_grads(model, batch)
        assert calls == [], "a hooked layer ran the fused forward"
    finally:
        decoder._fused_forward = original
    for h in handles:
        h.remove()
    assert layer0.forward.__func__ is decoder.decoder_layer_forward
    assert rel(got_loss, want_loss) < 1e-6
    assert len(want) == 4 * targets.count("_proj")  # A and B, 2 layers
    for name in want:
        assert want[name].norm() > 0 and rel(got[name], want[name]) < 1e-5, name
    # and the seed matters: another draw of the dropout masks, another loss
    other, _ = loss_and_grads(model, batch, seed=6)
    assert abs(other - got_loss) / got_loss > 1e-4


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward, parameters and
    buffers (and views of them) not counted."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model_loss_sum(model, batch)
    return sum(storages.values())


def test_a_fused_layer_keeps_neither_normed_input_nor_the_swiglu_product(tiny_cfg, tmp_path):
    """Without checkpointing, the fused layer keeps exactly two normed inputs [T, hidden] and the
    product silu(gate) * up [T, intermediate] less per layer than the per-module path, which
    keeps each next to its own input; everything else is the same. (The first layer's input,
    the frozen embeddings, needs no gradient: both paths keep its first normed input.)"""
    parts = build(tiny_cfg, tmp_path, "m", "model.gradient_checkpointing=false")
    model, batch = parts.model, packed(parts)
    fused = saved_activation_bytes(model, batch)
    handles = per_module(model)
    modules = saved_activation_bytes(model, batch)
    for h in handles:
        h.remove()
    cfg, tokens = model.config, batch["input_ids"].numel()
    per_layer = 2 * cfg.hidden_size + cfg.intermediate_size
    assert modules - fused == (cfg.num_hidden_layers * per_layer - cfg.hidden_size) * tokens * 4  # fp32 on the CPU


def test_a_forward_without_backward_folds_lora_into_the_weights(tiny_cfg, tmp_path):
    """Evaluation's forward (eval mode, no_grad) gives the logits the same forward with autograd
    recording gives, fused or per module, with no LoRA matmul of its own: each adapter is folded
    into its frozen int8 weight as that is dequantized (autograd._project)."""
    parts = build(tiny_cfg, tmp_path, "m", "model.gradient_checkpointing=false")
    model, batch = parts.model, packed(parts)
    model.eval()
    tokens, rank = batch["input_ids"].numel(), parts.cfg.lora.r

    def logits_and_r_wide_matmuls():
        with OpLog() as log:
            logits = model_logits(model, batch)
        r_wide = [s for s in log.matmul_shapes() if s[0][0] == tokens and s[-1][-1] == rank]
        return logits.detach(), len(r_wide)

    want, recorded = logits_and_r_wide_matmuls()
    with torch.no_grad():
        got, folded = logits_and_r_wide_matmuls()
        handles = per_module(model)
        got_modules, folded_modules = logits_and_r_wide_matmuls()
    for h in handles:
        h.remove()
    assert recorded == 7 * model.config.num_hidden_layers  # x A^T per projection: the count sees LoRA
    assert folded == folded_modules == 0
    assert rel(got, want) < 1e-5 and rel(got_modules, want) < 1e-5  # fp32, summed in another order


def test_generation_and_hooks_run_the_stock_forward(tiny_cfg, tmp_path):
    """With a KV cache the layer runs its stock forward (the fused nodes never see a cache); a
    forward hook on a LoRA layer (the gradient debugger's) sees that layer's output."""
    parts = build(tiny_cfg, tmp_path, "m")
    model, batch = parts.model, packed(parts)
    seen = []
    handle = decoder_layers(model)[1].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    model_loss_sum(model, batch)
    handle.remove()
    assert seen == [(1, batch["input_ids"].numel(), model.config.hidden_size)]

    calls = []
    original = decoder._fused_forward
    decoder._fused_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=batch["input_ids"][:, :8], max_new_tokens=3, do_sample=False)
    finally:
        decoder._fused_forward = original
    assert out.shape == (1, 11) and calls == []


@pytest.mark.cuda
def test_fused_layers_on_cuda_equal_the_per_module_path_in_bf16(tiny_cfg, tmp_path):
    """As the GPU runs them: bf16, Triton kernels, FlashAttention over packed pairs, dropout.
    The fused nodes and the per-module path run the same kernels on the same masks; only sums
    meet in another order (q, k and v's input gradients), so they agree to bf16 rounding."""
    parts = build(tiny_cfg, tmp_path, "m", "model.dtype=bfloat16", "model.attn_implementation=varlen",
                  "lora.dropout=0.1", "model.gradient_checkpointing=false")
    model, batch = parts.model, packed(parts)
    assert batch["input_ids"].is_cuda
    got_loss, got = loss_and_grads(model, batch)
    handles = per_module(model)
    want_loss, want = loss_and_grads(model, batch)
    for h in handles:
        h.remove()
    assert rel(got_loss, want_loss) < 1e-3
    for name in want:
        assert want[name].norm() > 0 and rel(got[name], want[name]) < 3e-2, name

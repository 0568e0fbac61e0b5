"""The fast path's autograd functions (medqa_loop.kernels.autograd) and the swaps that route the
model through them (medqa_loop.kernels.patch): exact gradients, a replayable dropout mask, and a
fused tiny model equal to the stock one, with and without 8-bit weights and checkpointing."""

import inspect

import pytest
import torch
from torch.autograd import gradcheck

from conftest import OpLog, loss_and_grads, rel, set_lora
from medqa_loop.batching import collate, to_device
from medqa_loop.kernels import ops, patch, reference
from medqa_loop.kernels.autograd import BaseAfterLora, LoraLinear, RMSNormFn, RotaryFn, SiluMul
from medqa_loop.kernels.patch import use_fused_ops
from medqa_loop.kernels.reference import keep_mask
from medqa_loop.model import model_loss_sum
from medqa_loop.train import prepare_run

F64 = torch.float64


# -- the autograd functions alone ------------------------------------------------------------


def lora_inputs(gen):
    x = torch.randn(2, 3, 5, dtype=F64, generator=gen, requires_grad=True)  # 3-D: reshaped inside
    a = torch.randn(2, 5, dtype=F64, generator=gen, requires_grad=True)  # r = 2
    b = torch.randn(4, 2, dtype=F64, generator=gen, requires_grad=True)
    return x, a, b


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("int8", [False, True], ids=["float-weight", "int8-weight"])
def test_lora_linear_gradcheck_and_forward(p, int8):
    gen = torch.Generator().manual_seed(0)
    x, a, b = lora_inputs(gen)
    if int8:  # bitsandbytes' layout: CB int8 [out, in], SCB fp32 [out]
        w = torch.randint(-127, 128, (4, 5), generator=gen, dtype=torch.int8)
        scb = torch.rand(4, generator=gen) + 0.5
        bias = None
        w_dense = w.double() * (scb / 127).double()[:, None]  # SCB/127 rounds in fp32
    else:
        w = torch.randn(4, 5, dtype=F64, generator=gen)
        scb = None
        bias = torch.randn(4, dtype=F64, generator=gen)
        w_dense = w
    scale, seed = 0.5, 1234

    def f(x, a, b):
        return LoraLinear.apply(x, w, scb, bias, a, b, scale, p, seed)

    # The forward is the formula (the mask drawn from the seed), and the backward, which draws
    # the mask again from the seed, is its exact derivative.
    dropped = x.detach() * keep_mask(x.detach().reshape(-1, 5), p, seed).view_as(x) / (1 - p)
    want = x.detach() @ w_dense.T + scale * (dropped @ a.detach().T) @ b.detach().T
    if bias is not None:
        want = want + bias
    got = f(x, a, b)
    assert got.shape == (2, 3, 4) and torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # Split as the down projection runs it: the LoRA node (bias included), then the frozen matmul.
    split = BaseAfterLora.apply(x, w, scb, LoraLinear.apply(x, w, scb, bias, a, b, scale, p, seed, False))
    assert torch.allclose(split, want, rtol=1e-12, atol=1e-12)
    if p > 0:  # dropout really acted
        assert not torch.allclose(got, LoraLinear.apply(x, w, scb, bias, a, b, scale, 0.0, seed))
    # With no backward to come, the same output; without dropout LoRA is folded into the weight,
    # so no matmul makes the r-wide x A^T (with dropout it must: the mask applies to x alone).
    with torch.no_grad(), OpLog() as log:
        inferred = LoraLinear.apply(x, w, scb, bias, a, b, scale, p, seed, True, True)
    assert torch.allclose(inferred, want, rtol=1e-12, atol=1e-12)
    r_wide = [s for s in log.matmul_shapes() if s[-1][-1] == a.size(0) and s[0][0] == 6]
    assert (r_wide == []) == (p == 0), log.matmul_shapes()
    assert gradcheck(f, (x, a, b))


def test_rmsnorm_fn_gradcheck_and_equals_transformers_rmsnorm():
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, dtype=F64, generator=gen, requires_grad=True)
    w = torch.randn(6, dtype=F64, generator=gen)
    # Like transformers' RMSNorm, the normalisation runs in fp32 even for a float64 input, so the
    # finite differences need a step far above fp32 rounding (1e-3, not gradcheck's 1e-6).
    assert gradcheck(lambda x: RMSNormFn.apply(x, w, 1e-6), (x,), eps=1e-3, atol=1e-4, rtol=1e-3)
    # Against the module it replaces, forward and backward, in fp32 and bf16.
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        norm = MistralRMSNorm(6, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(w)
        norm.weight.requires_grad_(False)
        xs = x.detach().to(dtype).requires_grad_()
        g = torch.randn(3, 6, generator=gen).to(dtype)
        want = norm(xs)
        (want_grad,) = torch.autograd.grad(want, xs, g)
        got = RMSNormFn.apply(xs, norm.weight, 1e-6)
        (got_grad,) = torch.autograd.grad(got, xs, g)
        assert got.dtype == dtype and got_grad.dtype == dtype
        assert torch.equal(got, want)  # the forward is the same computation
        assert rel(got_grad, want_grad) < tol


def test_silu_mul_gradcheck():
    gen = torch.Generator().manual_seed(2)
    gate = (torch.randn(3, 6, dtype=F64, generator=gen) * 3).requires_grad_()  # both tails of silu
    up = torch.randn(3, 6, dtype=F64, generator=gen, requires_grad=True)
    assert torch.allclose(SiluMul.apply(gate, up), torch.nn.functional.silu(gate) * up)
    assert gradcheck(SiluMul.apply, (gate, up))


# -- the tiny model, fused against stock -------------------------------------------------------


def build(tiny_cfg, tmp_path, name, *overrides):
    parts = prepare_run(tiny_cfg(f"output_dir={tmp_path / name}", *overrides))
    parts.model.train()
    return parts






def swapped(model, fn):
    return sum(getattr(m.forward, "__func__", None) is fn for m in model.modules())


def batches(parts):
    exs = parts.train_examples[:3]
    pad = parts.tokenizer.pad_token_id
    device = parts.accelerator.device  # the GPU on a GPU machine
    return {"packed": to_device(collate(exs, pad_id=pad, packed=True), device), "padded": to_device(collate(exs, pad_id=pad), device)}


@pytest.mark.slow
@pytest.mark.parametrize("base", [[], ["model.load_in_8bit=false"]], ids=["int8-dequant", "float"])
def test_fused_model_equals_stock_model(tiny_cfg, tmp_path, base):
    common = ["lora.dropout=0.0", "model.attn_implementation=sdpa", *base]
    stock = build(tiny_cfg, tmp_path, "stock", *common, "model.fused_ops=false")
    fast = build(tiny_cfg, tmp_path, "fused", *common, "model.fused_ops=true")
    assert swapped(stock.model, patch._lora_forward) == 0
    assert swapped(fast.model, patch._lora_forward) == 14  # 2 layers x 7 projections
    assert swapped(fast.model, patch._rmsnorm_forward) == 5 and swapped(fast.model, patch._mlp_forward) == 2
    assert swapped(fast.model, patch._target_loss_forward) == 1  # so the fused loss below is the head's
    for parts in (stock, fast):
        set_lora(parts.model)
    for kind, batch in batches(stock).items():
        want_loss, want = loss_and_grads(stock.model, batch)
        got_loss, got = loss_and_grads(fast.model, batch)
        assert rel(got_loss, want_loss) < 1e-5, kind
        assert got.keys() == want.keys() and len(want) == 28  # A and B of 14 layers
        for name in want:
            assert want[name].norm() > 0, (kind, name)
            assert rel(got[name], want[name]) < 1e-5, (kind, name)


def test_use_fused_ops_counts_and_leaves_llm_int8_lora_alone(tiny_cfg, tmp_path):
    from peft.tuners.lora import LoraLayer

    from medqa_loop.model import is_int8_linear

    # 2 layers x 7; 2 per layer + final; 1 per layer; 1 per layer; the causal LM; 1 per layer
    expected = {"lora": 14, "rmsnorm": 5, "mlp": 2, "rotary": 2, "loss_head": 1, "decoder_layer": 2}
    stock = build(tiny_cfg, tmp_path, "stock", "model.fused_ops=false")
    model = stock.model
    # The counts are the model's modules, counted here without use_fused_ops' own tests.
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == expected["lora"]
    assert sum(type(m).__name__ == "MistralRMSNorm" for m in model.modules()) == expected["rmsnorm"]
    assert sum(type(m).__name__ == "MistralMLP" for m in model.modules()) == expected["mlp"]
    assert sum(type(m).__name__ == "MistralAttention" for m in model.modules()) == expected["rotary"]
    assert use_fused_ops(model) == expected
    assert swapped(model, patch._lora_forward) == 14

    bnb = build(tiny_cfg, tmp_path, "bnb", "model.int8_matmul=bnb", "model.fused_ops=false")
    loras = [m for m in bnb.model.modules() if isinstance(m, LoraLayer)]
    assert len(loras) == 14 and all(is_int8_linear(m.get_base_layer()) for m in loras)
    # LLM.int8 LoRA layers are none of the projections the fused decoder layer computes
    assert use_fused_ops(bnb.model) == {"lora": 0, "rmsnorm": 5, "mlp": 2, "rotary": 2, "loss_head": 1, "decoder_layer": 0}
    assert swapped(bnb.model, patch._lora_forward) == 0 and swapped(bnb.model, patch._rmsnorm_forward) == 5


@pytest.mark.slow
def test_dropout_survives_checkpointing_and_is_off_in_eval(tiny_cfg, tmp_path):
    common = ["lora.dropout=0.3", "model.fused_ops=true", "model.attn_implementation=sdpa"]
    ckpt = build(tiny_cfg, tmp_path, "ckpt", *common, "model.gradient_checkpointing=true")
    plain = build(tiny_cfg, tmp_path, "plain", *common, "model.gradient_checkpointing=false")
    assert ckpt.model.get_base_model().is_gradient_checkpointing
    assert not plain.model.get_base_model().is_gradient_checkpointing
    assert swapped(ckpt.model, patch._lora_forward) == 14
    for parts in (ckpt, plain):
        set_lora(parts.model)
    batch = batches(ckpt)["packed"]

    # A checkpointed layer's recompute reads the seeds of the forward it recomputes (kernels.seeds):
    # the gradient is the one without checkpointing.
    want_loss, want = loss_and_grads(plain.model, batch)  # the same seed: the same masks
    got_loss, got = loss_and_grads(ckpt.model, batch)
    assert rel(got_loss, want_loss) < 1e-6
    for name in want:
        assert want[name].norm() > 0 and rel(got[name], want[name]) < 1e-5, name

    # Train mode: dropout is on, another seed gives another loss.
    with torch.no_grad():
        torch.manual_seed(6)
        other = model_loss_sum(ckpt.model, batch)
    assert abs(other - want_loss) / want_loss > 1e-4

    # Eval mode: dropout is off; the loss is the dropout-free model's with the same weights.
    no_dropout = build(tiny_cfg, tmp_path, "p0", "lora.dropout=0.0", "model.fused_ops=true",
                       "model.attn_implementation=sdpa")
    set_lora(no_dropout.model)
    evals = []
    for seed, parts in ((1, ckpt), (2, ckpt), (3, no_dropout)):
        parts.model.eval()
        torch.manual_seed(seed)
        with torch.no_grad():
            evals.append(model_loss_sum(parts.model, batch))
    assert torch.equal(evals[0], evals[1])
    assert torch.allclose(evals[0], evals[2], rtol=1e-6, atol=0)
    assert abs(evals[0] - want_loss) / want_loss > 1e-4  # and differs from the train-mode loss


def test_checkpoint_recompute_skips_the_down_projections_frozen_matmul(tiny_cfg, tmp_path):
    """The recompute of a checkpointed layer stops once backward's saved tensors are back; the
    down projection's frozen matmul comes after them (BaseAfterLora), so it runs once per layer
    per step, while the gate and up projections run again."""
    common = ["lora.dropout=0.1", "model.fused_ops=true", "model.attn_implementation=sdpa"]
    counts = {}
    for gc in (True, False):
        parts = build(tiny_cfg, tmp_path, f"gc-{gc}", *common, f"model.gradient_checkpointing={gc}")
        set_lora(parts.model)
        batch = batches(parts)["packed"]
        tokens = batch["input_ids"].numel()
        hidden, inner = (parts.model.config.hidden_size, parts.model.config.intermediate_size)
        with OpLog() as log:
            torch.manual_seed(0)
            model_loss_sum(parts.model, batch).backward()
        shapes = log.matmul_shapes()
        counts[gc] = {
            # [T, I] x [I, H]: down's forward, gate's and up's input gradients
            "down": shapes.count(((tokens, inner), (inner, hidden))),
            # [T, H] x [H, I]: gate's and up's forwards, down's input gradient
            "gate_up": shapes.count(((tokens, hidden), (hidden, inner))),
        }
    layers = parts.model.config.num_hidden_layers
    assert counts[False] == {"down": 3 * layers, "gate_up": 3 * layers}
    assert counts[True] == {"down": 3 * layers, "gate_up": 5 * layers}  # recomputed: gate, up; not down


def eager_reference(name, *args):
    """The eager maths of ``ops.<name>`` (medqa_loop.kernels.reference: what the CPU runs) on CPU
    copies of args, returned on args' device."""
    out = getattr(reference, name)(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    return tuple(o.to(args[0].device) for o in (out if isinstance(out, tuple) else (out,)))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_and_swiglu_triton_kernels_equal_eager_on_cuda(dtype):
    """What runs on the GPU (Triton kernels for the norm and SwiGLU maths) is what the CPU tests
    check, within a rounding of the dtype (the norm's row sums add in another order)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(1000, 4096, device="cuda", generator=gen) * 3).to(dtype)  # a 14336-wide
    w = torch.randn(4096, device="cuda", generator=gen).to(dtype)  # row would do for SwiGLU too
    up, grad = torch.randn_like(x), torch.randn_like(x)
    assert ops.backend(x) is not reference  # the Triton kernels are what runs here
    rstd = ops.rmsnorm(x, w, 1e-5)[1]
    cases = [
        ("rmsnorm", (x, w, 1e-5)), ("rmsnorm_backward", (x, w, rstd, grad)),
        ("silu_mul", (x, up)), ("silu_mul_backward", (x, up, grad)),
    ]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, args in cases:
        got = getattr(ops, name)(*args)
        got = got if isinstance(got, tuple) else (got,)
        for g, e in zip(got, eager_reference(name, *args), strict=True):
            assert g.dtype == e.dtype and g.shape == e.shape, name
            assert rel(g, e) < tol, name


@pytest.mark.cuda
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_on_cuda_equals_its_float64_maths(p):
    """LoraLinear as the GPU runs it (bf16, int8 weight, the dropout kernels, the frozen matmul
    added in the LoRA output's epilogue) against the same function in float64 on the CPU (the
    eager path, the same mask from the same seed): output and all three gradients."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens, d_in, d_out, rank = 3000, 4096, 1024, 16
    x = torch.randn(1, tokens, d_in, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = torch.randint(-127, 128, (d_out, d_in), device="cuda", generator=gen, dtype=torch.int8)
    scb = torch.rand(d_out, device="cuda", generator=gen) * 0.1 + 0.05
    a = (torch.randn(rank, d_in, device="cuda", generator=gen) * 0.02).requires_grad_()
    b = (torch.randn(d_out, rank, device="cuda", generator=gen) * 0.02).requires_grad_()
    g = torch.randn(1, tokens, d_out, device="cuda", generator=gen).bfloat16()
    got = LoraLinear.apply(x, w, scb, None, a, b, 2.0, p, 2**40 + 5)
    got_grads = torch.autograd.grad(got, (x, a, b), g)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, a, b)]
    want = LoraLinear.apply(leaves[0], w.cpu(), scb.cpu().double(), None, *leaves[1:], 2.0, p, 2**40 + 5)
    want_grads = torch.autograd.grad(want, leaves, g.cpu().double())
    assert got.dtype == torch.bfloat16 and [t.dtype for t in got_grads] == [torch.bfloat16, torch.float32, torch.float32]
    for name, c, e in zip(["y", "dx", "da", "db"], (got, *got_grads), (want, *want_grads)):
        assert rel(c.cpu(), e) < 1e-2, name  # bf16 inputs to each matmul, fp32 accumulation


def rope(batch, tokens, dim, device, dtype):
    """cos, sin as transformers' rotary embedding makes them, with sin's halves made unequal
    (Mistral's are equal; the kernel must not rely on it)."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    freqs = torch.arange(tokens, device=device).float()[None, :, None].expand(batch, -1, -1) * inv
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), (emb.sin() * torch.linspace(0.5, 1.5, dim, device=device)).to(dtype)


def test_attention_runs_transformers_forward_with_its_rotary_as_fallback(tiny_cfg, tmp_path, monkeypatch):
    """The attention forward is transformers' own code with apply_rotary_pos_emb swapped for
    one that hands what the kernel does not cover (here: the CPU) to transformers' function."""
    from transformers.models.mistral import modeling_mistral

    parts = build(tiny_cfg, tmp_path, "fused", "model.fused_ops=true")
    attn = parts.model.get_base_model().model.layers[0].self_attn
    fn = attn.forward.__func__
    assert fn.__code__ is inspect.unwrap(modeling_mistral.MistralAttention.forward).__code__
    ours = fn.__globals__["apply_rotary_pos_emb"]
    assert ours is not modeling_mistral.apply_rotary_pos_emb  # transformers' module is untouched
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 5, 4, 8, generator=gen).transpose(1, 2), torch.randn(1, 5, 2, 8, generator=gen).transpose(1, 2)
    cos, sin = rope(1, 5, 8, "cpu", torch.float32)
    for got, want in zip(ours(q, k, cos, sin), modeling_mistral.apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(got, want)

    # and the model's forward goes through it, once per layer
    asked = []
    monkeypatch.setattr(ops, "rotary_covers", lambda *args: asked.append(args) or False)
    with torch.no_grad():
        model_loss_sum(parts.model, batches(parts)["packed"])
    assert len(asked) == parts.model.config.num_hidden_layers


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_kernel_equals_transformers_on_cuda(dtype):
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = 3000
    # the projections' layout: [batch, tokens, heads, dim] memory seen as [batch, heads, tokens, dim]
    q = torch.randn(1, tokens, 32, 128, device="cuda", generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(1, tokens, 8, 128, device="cuda", generator=gen).to(dtype).transpose(1, 2)
    cos, sin = rope(1, tokens, 128, "cuda", dtype)
    assert ops.rotary_covers(q, k, cos, sin)
    q, k = q.requires_grad_(), k.requires_grad_()
    got = RotaryFn.apply(q, k, cos, sin)
    grads = [torch.randn(t.shape, device="cuda", generator=gen).to(dtype) for t in got]
    got_grads = torch.autograd.grad(got, (q, k), grads)
    # The reference in fp64: transformers' formula and its autograd.
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    want = apply_rotary_pos_emb(q64, k64, cos.double(), sin.double())
    want_grads = torch.autograd.grad(want, (q64, k64), [g.double() for g in grads])
    tol = 1e-6 if dtype == torch.float32 else 4e-3
    for g, w in zip((*got, *got_grads), (*want, *want_grads)):
        assert g.dtype == dtype and ops._bthd(g)  # results keep the projections' layout
        assert rel(g, w) < tol

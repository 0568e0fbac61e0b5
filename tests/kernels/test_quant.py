"""The dequantize-per-matmul int8 path (medqa_loop.kernels: autograd.DequantLinear, routed in by
patch.use_dequant_matmul) against bitsandbytes' own output and a float64 reference."""

from pathlib import Path

import pytest
import torch

from conftest import rel
from medqa_loop.kernels import ops, reference
from medqa_loop.kernels.autograd import DequantLinear
from medqa_loop.kernels.patch import int8_state, use_dequant_matmul, uses_dequant_matmul


def int8_linear(w: torch.Tensor):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu").eval()  # quantizes on placement, like from_pretrained


def test_dequant_matches_bitsandbytes_and_is_closer_to_the_weights():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.05
    x = torch.randn(3, 7, 64)
    layer = int8_linear(w)
    with torch.no_grad():
        bnb_out = layer(x)  # LLM.int8: int8 activations and weights
        cb, scb = int8_state(layer)
        assert cb.dtype == torch.int8 and scb.shape == (96,)
        assert not uses_dequant_matmul(layer)
        assert use_dequant_matmul(torch.nn.Sequential(layer)) == 1
        assert uses_dequant_matmul(layer)
        ours = layer(x)
    exact = x.double() @ w.double().T
    assert rel(ours, bnb_out) < 2e-2  # bitsandbytes' activation rounding is the difference
    assert rel(ours, exact) < 1e-2 and rel(ours, exact) < rel(bnb_out, exact)
    # Weight-only int8: exactly x @ (CB * SCB/127)^T.
    w_int8 = cb.double() * scb.double()[:, None] / 127
    assert rel(ours, x.double() @ w_int8.T) < 1e-6


def test_backward_gives_the_input_gradient_and_keeps_no_activation():
    torch.manual_seed(1)
    w = torch.randn(32, 16) * 0.1
    layer = int8_linear(w)
    use_dequant_matmul(torch.nn.Sequential(layer))
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    cb, scb = int8_state(layer)
    assert torch.autograd.gradcheck(lambda x: DequantLinear.apply(x, cb, scb, None), (x,))
    x32 = x.detach().float().requires_grad_()
    y = layer(x32)
    saved = {t.data_ptr() for t in y.grad_fn.saved_tensors}
    assert x32.data_ptr() not in saved  # only the int8 weight and its scales are kept
    y.sum().backward()
    w_int8 = cb.float() * scb[:, None] / 127
    assert torch.allclose(x32.grad, w_int8.sum(0).expand(5, 16), atol=1e-6)


def test_tiny_model_int8_paths(tiny_cfg):
    """Through the real loader: both paths quantize; dequant's logits sit near the float model's."""
    from medqa_loop.model import build_random_base, is_int8_linear, load_base, load_tokenizer

    cfg = tiny_cfg()
    tok = load_tokenizer(cfg.model)
    src = build_random_base(cfg.model, tok, Path(cfg.output_dir) / "base", 0)
    ids = torch.tensor([tok("### Question:\nWhat is sepsis?\n\n### Answer:\nInfection").input_ids])
    logits = {}
    for path, over in {"float": {"load_in_8bit": False}, "dequant": {}, "bnb": {"int8_matmul": "bnb"}}.items():
        m = load_base(type(cfg.model)(**{**cfg.model.__dict__, **over}), str(src), torch.device("cpu"))
        if path != "float":
            assert is_int8_linear(m.model.layers[0].mlp.down_proj)
        with torch.no_grad():
            logits[path] = m(input_ids=ids).logits
    # Measured: dequant 2.8%, bnb 4.4% off the float model (a 2-layer random model, wide init).
    assert rel(logits["dequant"], logits["float"]) < min(0.04, rel(logits["bnb"], logits["float"]))


@pytest.mark.cuda
def test_cuda_dequantize_gives_the_reference_bits():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, cols in ((4096, 1024), (33, 4099)):  # one size off the kernel's tiles
        cb = torch.randint(-127, 128, (rows, cols), device="cuda", generator=gen, dtype=torch.int8)
        scb = torch.rand(rows, device="cuda", generator=gen) * 3
        assert ops.backend(cb, (torch.int8,)) is not reference  # the Triton kernel runs
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            got, want = ops.dequantize(cb, scb, dtype), reference.dequantize(cb.cpu(), scb.cpu(), dtype)
            assert got.dtype == dtype and torch.equal(got.cpu(), want), (rows, cols, dtype)


def lora_pair(rows: int, cols: int, rank: int, gen, device: str = "cpu"):
    """A (rank x cols) and B (rows x rank) in fp32, as PEFT keeps them, B non-zero as after training."""
    return (torch.randn(rank, cols, device=device, generator=gen) * 0.02,
            torch.randn(rows, rank, device=device, generator=gen) * 0.01)


def test_merged_weight_is_the_dequantized_weight_plus_the_scaled_lora_product():
    """What a forward without backward multiplies by (autograd._project): W + scale * B A, summed
    in fp32 and rounded once to the activation dtype, for an int8 and for a 16-bit W."""
    gen = torch.Generator().manual_seed(0)
    cb = torch.randint(-127, 128, (12, 20), generator=gen, dtype=torch.int8)
    scb = torch.rand(12, generator=gen) * 3
    a, b = lora_pair(12, 20, 4, gen)
    exact = cb.double() * (scb * (1 / 127.0)).double()[:, None] + 2.0 * b.double() @ a.double()
    for dtype in (torch.float32, torch.bfloat16):
        got = ops.merged_weight(cb, scb, a, b, 2.0, dtype)
        assert got.dtype == dtype and torch.allclose(got.double(), exact.to(dtype).double(), rtol=2e-7, atol=1e-9)
    w16 = torch.randn(12, 20, generator=gen).bfloat16()
    got = ops.merged_weight(w16, None, a, b, 2.0, torch.bfloat16)
    assert torch.equal(got, (w16.double() + 2.0 * b.double() @ a.double()).to(torch.bfloat16))


@pytest.mark.cuda
def test_cuda_merged_weight_is_the_reference_within_a_rounding():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, cols, rank in ((4096, 1024, 16), (33, 4099, 8)):  # a size off the tiles, a rank under 16
        cb = torch.randint(-127, 128, (rows, cols), device="cuda", generator=gen, dtype=torch.int8)
        scb = torch.rand(rows, device="cuda", generator=gen) * 3
        a, b = lora_pair(rows, cols, rank, gen, "cuda")
        for dtype in (torch.bfloat16, torch.float32):
            got = ops.merged_weight(cb, scb, a, b, 2.0, dtype).cpu()
            want = reference.merged_weight(cb.cpu(), scb.cpu(), a.cpu(), b.cpu(), 2.0, dtype)
            # Within a rounding in dtype, plus, for a 16-bit output, A and B rounded to tf32 (10
            # mantissa bits) in the dot: relative 2^-10 of each product, at most.
            ulp = torch.finfo(dtype).eps * want.abs().float()
            tf32 = 0.0 if dtype == torch.float32 else 2.0**-10 * 2.0 * (b.abs() @ a.abs()).cpu()
            assert got.dtype == dtype and ((got.float() - want.float()).abs() <= ulp + tf32).all(), (rows, cols, dtype)
            assert (got.float() != reference.dequantize(cb.cpu(), scb.cpu(), dtype).float()).any()  # LoRA is in it

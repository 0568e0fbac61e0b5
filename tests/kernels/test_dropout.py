"""LoRA dropout's hashed keep mask (medqa_loop.kernels.reference): a function of the seed that
behaves like independent Bernoulli draws, and the same bits from the CUDA kernels
(medqa_loop.kernels.triton_ops, reached through medqa_loop.kernels.ops) as from the reference."""

import pytest
import torch

from conftest import rel
from medqa_loop.kernels import ops, reference
from medqa_loop.kernels.reference import (
    dropout_args, dropped, dropped_grad, dropped_linear, dropped_product, keep_mask,
)


def test_keep_mask_is_a_function_of_the_seed_and_looks_random():
    p, shape = 0.3, (1000, 1000)
    x = torch.empty(shape)
    a, b, c = keep_mask(x, p, 7), keep_mask(x, p, 7), keep_mask(x, p, 8)
    assert a.dtype == torch.bool and a.shape == shape
    assert torch.equal(a, b) and not torch.equal(a, c)  # same seed: the same mask; another: not
    assert abs(a.float().mean().item() - (1 - p)) < 3e-3  # 1e6 draws: std ~5e-4
    # Other seeds, including ones differing in one bit of either 31-bit key, give independent
    # masks: they disagree where two independent draws would, on 2p(1-p) of the elements.
    for other in (8, 7 ^ 1, 7 + 2**32, 7 ^ 2**61, 2**62 - 1):
        differ = (a != keep_mask(x, p, other)).float().mean().item()
        assert abs(differ - 2 * p * (1 - p)) < 3e-3, other
    # No structure along rows or columns: neighbours are uncorrelated, every row and column
    # keeps ~(1 - p) of its 1000 elements (std 0.0145; 6 std allows no systematic bias).
    f = a.float() - a.float().mean()
    for neighbours in ((f[:, 1:], f[:, :-1]), (f[1:], f[:-1])):
        corr = (neighbours[0] * neighbours[1]).mean() / f.var()
        assert abs(corr) < 5e-3
    for dim in (0, 1):
        assert (a.float().mean(dim) - (1 - p)).abs().max() < 0.09
    assert keep_mask(x, 0.0, 7).all() and not keep_mask(x, 1.0, 7).any()


def test_dropped_applies_the_mask():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    drop = dropout_args(0.25, 99, x.numel())
    keep = keep_mask(x, 0.25, 99)
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(dropped(x, *drop), torch.where(keep, x, 0.0))
    with pytest.raises(ValueError, match="would repeat"):
        dropout_args(0.1, 1, 2**32 + 1)


@pytest.mark.cuda
def test_cuda_kernels_give_the_reference_bits():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, cols in ((1000, 256), (7, 4099), (3000, 14336)):  # sizes off the kernel's block too
        x = torch.randn(rows, cols, device="cuda", generator=gen).bfloat16()
        assert ops.backend(x) is not reference  # the Triton kernel runs
        for p, seed in ((0.1, 12345), (0.5, 2**61 + 2**40 + 7), (0.05, 2**62 - 1)):
            drop = dropout_args(p, seed, x.numel())
            assert torch.equal(ops.dropped(x, drop).cpu(), dropped(x.cpu(), *drop)), (rows, cols, p, seed)


def test_dropped_linear_and_grads_are_the_masked_matmuls():
    """The eager path (CPU) of lora_A's matmul with dropout inside, of A's gradient, and of the
    LoRA part of x's gradient (zero where x was dropped)."""
    gen = torch.Generator().manual_seed(0)
    x, a, g = torch.randn(30, 40, generator=gen), torch.randn(6, 40, generator=gen), torch.randn(30, 6, generator=gen)
    drop = dropout_args(0.3, 5, x.numel())
    masked = torch.where(keep_mask(x, 0.3, 5), x, 0.0)
    assert torch.allclose(dropped_linear(x, a, *drop, 2.0), 2.0 * masked @ a.T, rtol=1e-6, atol=1e-6)
    assert torch.allclose(dropped_grad(g, x, *drop), g.T @ masked, rtol=1e-6, atol=1e-6)
    keep = keep_mask(x, 0.3, 5)
    assert torch.allclose(dropped_product(g, a, *drop), torch.where(keep, g @ a, 0.0), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("rank", [16, 8, 24])  # tl.dot's 16-wide tiles: smaller and odd ranks are padded
def test_cuda_masked_matmuls_equal_the_reference(rank):
    """The Triton matmuls that mask x as they load it equal dropping x first, then multiplying
    (fp32 accumulation in another order: within bf16's rounding of the output)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, cols in ((1000, 4096), (37, 14336), (7000, 4096)):
        x = torch.randn(rows, cols, device="cuda", generator=gen).bfloat16()
        a = torch.randn(rank, cols, device="cuda", generator=gen) * 0.02  # fp32, as LoRA's A
        g = torch.randn(rows, rank, device="cuda", generator=gen).bfloat16()
        drop = dropout_args(0.1, 2**50 + 3, x.numel())
        assert ops.backend(x, ops.HALF) is not reference  # the Triton matmuls run
        masked = ops.dropped(x, drop).double()
        got = ops.dropped_linear(x, a, drop, 1 / 0.9)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, rank)
        assert rel(got, masked @ a.bfloat16().double().T / 0.9) < 4e-3, (rows, cols, rank)
        grad = ops.dropped_grad(g, x, drop)
        assert grad.dtype == torch.float32 and grad.shape == (rank, cols)
        assert rel(grad, g.double().T @ masked) < 1e-5, (rows, cols, rank)
        part = ops.dropped_product(g, a, drop)
        keep = keep_mask(x, 0.1, 2**50 + 3)
        assert part.dtype == torch.bfloat16 and part.shape == (rows, cols)
        assert torch.equal(part != 0, keep & (part != 0)), "nonzero where x was dropped"
        assert rel(part, torch.where(keep, g.double() @ a.bfloat16().double(), 0.0)) < 4e-3, (rows, cols, rank)

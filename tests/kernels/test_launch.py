"""The fast launch of compiled Triton kernels (medqa_loop.kernels.launch): a launch of a kind
seen before skips Triton's Python and computes exactly what Triton's own launch computed."""

import pytest
import torch

from medqa_loop.kernels.reference import dropout_args

pytestmark = pytest.mark.cuda


class CountingLaunches:
    """Stands in for a FastLaunch's Triton kernel, counting the launches Triton runs itself."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0
        self.best_config = getattr(fn, "best_config", None)

    def __getitem__(self, grid):
        self.calls += 1
        launch = self.fn[grid]

        def run(*args, **kwargs):
            out = launch(*args, **kwargs)
            self.best_config = getattr(self.fn, "best_config", None)
            return out

        return run


def cases():
    from medqa_loop.kernels import triton_ops as T

    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    x, w = randn(300, 512), randn(512)
    gate, up = randn(300, 1024), randn(300, 1024)
    a, g = randn(16, 512), randn(300, 16)
    cb = torch.randint(-127, 128, (256, 512), device="cuda", generator=gen, dtype=torch.int8)
    scb = torch.rand(256, device="cuda", generator=gen) + 0.5
    q = randn(1, 300, 8, 64).transpose(1, 2)  # [batch, heads, tokens, dim] over the projections' layout
    cos, sin = randn(1, 300, 64), randn(1, 300, 64)
    drop = dropout_args(0.1, 2**40 + 3, x.numel())
    rstd = T.rmsnorm(x, w, 1e-6)[1]
    logits, targets, weights = randn(64, 1000), torch.randint(0, 1000, (64,), device="cuda", generator=gen), torch.rand(64, device="cuda")
    return {
        "_rmsnorm_kernel": lambda: T.rmsnorm(x, w, 1e-6),
        "_rmsnorm_backward_kernel": lambda: T.rmsnorm_backward(x, w, rstd, gate[:, :512].contiguous()),
        "_silu_mul_kernel": lambda: T.silu_mul(gate, up),
        "_silu_mul_backward_kernel": lambda: T.silu_mul_backward(gate, up, gate),
        "_dequantize_kernel": lambda: T.dequantize(cb, scb, torch.bfloat16),
        "_dropped_kernel": lambda: T.dropped(x, *drop),
        "_dropped_linear_kernel": lambda: T.dropped_linear(x, a, *drop, 0.5),  # autotuned
        "_dropped_grad_kernel": lambda: T.dropped_grad(g, x, *drop),
        "_dropped_product_kernel": lambda: T.dropped_product(g, a, *drop),
        "_rotary_kernel": lambda: T.rotary(q, cos, sin),
        "_cross_entropy_kernel": lambda: (lambda z: (T.cross_entropy_rows(z, targets, weights, True), z))(logits.clone()),
    }


KERNELS = [
    "_rmsnorm_kernel", "_rmsnorm_backward_kernel", "_silu_mul_kernel", "_silu_mul_backward_kernel",
    "_dequantize_kernel", "_dropped_kernel", "_dropped_linear_kernel", "_dropped_grad_kernel",
    "_dropped_product_kernel", "_rotary_kernel", "_cross_entropy_kernel",
]


@pytest.mark.parametrize("name", KERNELS)
def test_a_second_launch_of_a_kind_skips_triton_and_computes_the_same(name):
    from medqa_loop.kernels import triton_ops

    kernel = getattr(triton_ops, name)
    counting = CountingLaunches(kernel.fn)
    kernel.fn, kernel.kernels = counting, {}
    try:
        all_cases = cases()
        assert set(all_cases) == set(KERNELS)
        run = all_cases[name]
        first = run()
        assert counting.calls >= 1 and len(kernel.kernels) >= 1
        calls = counting.calls
        second = run()
        assert counting.calls == calls, "the second launch went through Triton again"
    finally:
        kernel.fn = counting.fn
    first, second = (t if isinstance(t, tuple) else (t,) for t in (first, second))
    for f, s in zip(first, second, strict=True):
        assert torch.equal(f, s), name


def test_a_misaligned_tensor_is_another_kind():
    """Triton compiles for 16-byte-aligned pointers where it can: a tensor 2 bytes off is
    another kind of call, launched (and compiled) by Triton, and computed right."""
    from medqa_loop.kernels import reference, triton_ops

    gen = torch.Generator(device="cuda").manual_seed(1)
    buf = torch.randn(300 * 512 + 1, device="cuda", generator=gen).bfloat16()
    w = torch.randn(512, device="cuda", generator=gen).bfloat16()
    aligned, shifted = buf[:-1].view(300, 512), buf[1:].view(300, 512)
    assert shifted.data_ptr() % 16 != 0
    kernel = triton_ops._rmsnorm_kernel
    kernel.kernels = {}
    for x in (aligned, shifted, aligned, shifted):
        got, _ = triton_ops.rmsnorm(x, w, 1e-6)
        want, _ = reference.rmsnorm(x, w, 1e-6)
        assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()
    assert len(kernel.kernels) == 2

"""The fast path's one switch (medqa_loop.kernels.ops): on the CPU every small kernel is the eager
reference (medqa_loop.kernels.reference), and the dropout kernels take the packed (seed,
threshold) pair that the reference and Triton functions take unpacked."""

import pytest
import torch

from medqa_loop.kernels import ops, reference
from medqa_loop.kernels.reference import dropout_args, keep_mask

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_tensor_gets_the_reference(dtype):
    t = torch.zeros(4, 8, dtype=dtype)
    for dtypes in (ops.FLOAT, ops.HALF, (torch.int8,), (*ops.FLOAT, torch.float64)):
        assert ops.backend(t, dtypes) is reference
    assert ops.backend(t) is reference


def cpu_args():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=gen)
    return {
        "x": x,
        "w": torch.randn(16, generator=gen),
        "up": torch.randn(6, 16, generator=gen),
        "grad": torch.randn(6, 16, generator=gen),
        "rstd": torch.rand(6, 1, generator=gen) + 0.5,
        "cb": torch.randint(-127, 128, (5, 16), generator=gen, dtype=torch.int8),
        "scb": torch.rand(5, generator=gen) + 0.5,
    }


# ops.<name>(...) -> reference.<name>(...): the arguments of each, from cpu_args().
CALLS = {
    "rmsnorm": (lambda a: (a["x"], a["w"], 1e-6), lambda a: (a["x"], a["w"], 1e-6)),
    "rmsnorm_backward": (lambda a: (a["x"], a["w"], a["rstd"], a["grad"]),) * 2,
    "silu_mul": (lambda a: (a["x"], a["up"]),) * 2,
    "silu_mul_backward": (lambda a: (a["x"], a["up"], a["grad"]),) * 2,
    "dequantize": (lambda a: (a["cb"], a["scb"], torch.float32),) * 2,
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_each_op_dispatches_to_the_reference_on_the_cpu(name, monkeypatch):
    """The reference function is what ops calls (a spy in its place sees the call), and the result
    is the reference's, bit for bit."""
    args = cpu_args()
    ops_args, ref_args = (make(args) for make in CALLS[name])
    want = getattr(reference, name)(*ref_args)
    calls = []
    real = getattr(reference, name)
    monkeypatch.setattr(reference, name, lambda *a: calls.append(a) or real(*a))
    got = getattr(ops, name)(*ops_args)
    assert len(calls) == 1
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,), strict=True):
        assert torch.equal(g, w)


def test_dequantize_to_a_dtype_no_kernel_takes_is_the_reference():
    args = cpu_args()
    got = ops.dequantize(args["cb"], args["scb"], torch.float64)
    assert got.dtype == torch.float64
    assert torch.equal(got, reference.dequantize(args["cb"], args["scb"], torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_packed_dropout_ops_equal_the_reference_with_the_args_unpacked(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 40, generator=gen).to(dtype)
    a = torch.randn(6, 40, generator=gen)  # fp32, as LoRA's A
    g = torch.randn(30, 6, generator=gen).to(dtype)
    drop = dropout_args(0.3, 2**40 + 11, x.numel())
    seed, threshold = drop
    keep = keep_mask(x, 0.3, 2**40 + 11)
    assert 0 < keep.sum() < keep.numel()  # the mask drops some and keeps some
    cases = {
        "dropped": ((x, drop), (x, seed, threshold)),
        "dropped_linear": ((x, a, drop, 1.5), (x, a, seed, threshold, 1.5)),
        "dropped_grad": ((g, x, drop), (g, x, seed, threshold)),
        "dropped_product": ((g, a, drop), (g, a, seed, threshold)),
    }
    for name, (packed, unpacked) in cases.items():
        want = getattr(reference, name)(*unpacked)
        seen = []
        real = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *args, real=real, seen=seen: seen.append(args) or real(*args))
        got = getattr(ops, name)(*packed)
        # called once, with the very tensors, the seed tensor and threshold of ``drop`` and the scale, in order
        assert len(seen) == 1 and all(s is u for s, u in zip(seen[0], unpacked, strict=True)), name
        assert torch.equal(got, want), name
    # The mask is the one the seed gives: dropped elements are zero, kept ones untouched.
    assert torch.equal(ops.dropped(x, drop), torch.where(keep, x, torch.zeros((), dtype=dtype)))


def test_rotary_is_never_covered_on_the_cpu():
    """Off CUDA the rotary embedding stays transformers' own (patch._rotary_with_fallback)."""
    q = torch.randn(1, 5, 4, 8).transpose(1, 2)  # the projections' layout
    k = torch.randn(1, 5, 2, 8).transpose(1, 2)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    assert ops._bthd(q) and ops._bthd(k)
    assert not ops.rotary_covers(q, k, cos, sin)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_tensors_of_the_kernels_dtypes_get_triton(dtype):
    from medqa_loop.kernels import triton_ops

    t = torch.zeros(4, 8, dtype=dtype, device="cuda")
    assert ops.backend(t) is triton_ops
    assert ops.backend(t, ops.HALF) is (triton_ops if dtype in ops.HALF else reference)
    assert ops.backend(t.double()) is reference  # fp64: no kernel written for it
    assert ops.backend(torch.zeros(4, 8, dtype=torch.int8, device="cuda"), (torch.int8,)) is triton_ops

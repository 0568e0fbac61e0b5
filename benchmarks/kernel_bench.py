"""GPU time of the elementwise kernels (Triton) at the shapes of a 16-pair window of Mistral-7B
(~7.5k tokens), against the eager ops they replace and against the memory-bandwidth bound.

  python benchmarks/kernel_bench.py [--tokens 7500] [--out benchmarks/kernel_results.jsonl] [--int8-only]
  python benchmarks/kernel_bench.py --launch

``--launch`` measures the other side: CPU microseconds per call of small ops (a few elements, so
the GPU keeps up and the CPU's launch path is all that is timed): an eager op, a matmul, the
Triton kernels, an autograd Function, for comparing what a step spends per op.

For each kernel: milliseconds per call (median of 20 after warm-up, CUDA events around one
call, so a call whose CPU side outlasts its kernel is timed by its CPU side), the bytes it must
read and write, and the effective GB/s. A kernel near the GPU's bandwidth (~3 TB/s on an H100
SXM) is as fast as a separate elementwise pass can be.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys

import torch

from bench import code_digest  # benchmarks/ is on sys.path when this file runs as a script
from medqa_loop.kernels import ops
from medqa_loop.kernels.reference import dropout_args


def gpu_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def cpu_us(fn, reps: int = 2000) -> float:
    """CPU microseconds per call of ``fn`` (queued, not waited for), best of 5 rounds."""
    import time

    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps * 1e6)
    torch.cuda.synchronize()
    return best


class Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def launch_overheads() -> list[dict]:
    x = torch.randn(16, 256, device="cuda").bfloat16()
    w = torch.randn(256, 256, device="cuda").bfloat16()
    leaf = torch.randn(16, 256, device="cuda", requires_grad=True)
    cb = torch.randint(-127, 128, (256, 256), device="cuda", dtype=torch.int8)
    scb = torch.rand(256, device="cuda") + 0.5
    drop = dropout_args(0.1, torch.tensor(12345, device=x.device), x.numel())  # a device seed, as in training
    cases = {
        "torch.empty_like": lambda: torch.empty_like(x),
        "x + x": lambda: x + x,
        "x.to(float32)": lambda: x.float(),
        "x @ w": lambda: x @ w,
        "F.linear(x, w)": lambda: torch.nn.functional.linear(x, w),
        "Triton dropped": lambda: ops.dropped(x, drop),
        "Triton dequantize": lambda: ops.dequantize(cb, scb, torch.bfloat16),
        "autograd.Function apply (no grad needed)": lambda: Identity.apply(x),
        "autograd.Function apply (recording)": lambda: Identity.apply(leaf),
    }
    rows = []
    for name, fn in cases.items():
        row = {"launch": name, "cpu_us": round(cpu_us(fn), 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=7500)
    p.add_argument("--out")
    p.add_argument("--launch", action="store_true", help="CPU time per call of small ops instead")
    p.add_argument("--int8-only", action="store_true", help="only the int8 weights' kernels and projections")
    a = p.parse_args()
    if a.launch:
        rows = launch_overheads()
        if a.out:
            write_rows(a.out, rows)
        return
    t, bf16 = a.tokens, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []

    def report(name, fn, nbytes):
        ms = gpu_ms(fn)
        row = {"kernel": name, "tokens": t, "ms": round(ms, 4), "gb_per_s": round(nbytes / ms / 1e6, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for width in () if a.int8_only else (4096, 14336):
        x = torch.randn(t, width, device="cuda", generator=gen).to(bf16)
        y = torch.randn_like(x)
        drop = dropout_args(0.1, torch.tensor(2**40 + 7, device=x.device), x.numel())
        n = x.numel()
        report(f"dropped [{t},{width}] (hash mask, Triton)", lambda: ops.dropped(x, drop), 4 * n)
        report(f"eager bernoulli mask * x [{t},{width}] (before)",
               lambda: x * torch.empty_like(x).bernoulli_(0.9), 4 * n)
        report(f"copy [{t},{width}] (bandwidth reference)", lambda: x.clone(), 4 * n)
        lora_a = torch.randn(16, width, device="cuda", generator=gen) * 0.02  # fp32, r = 16
        g = torch.randn(t, 16, device="cuda", generator=gen).to(bf16)
        report(f"dropped_linear [{t},{width}] x A^T r16 (Triton, mask in the matmul)",
               lambda: ops.dropped_linear(x, lora_a, drop, 1 / 0.9), 2 * n)
        report(f"dropped + linear + scale [{t},{width}] r16 (before)",
               lambda: torch.nn.functional.linear(ops.dropped(x, drop), lora_a.to(bf16)).mul_(1 / 0.9), 6 * n)
        report(f"dropped_grad g^T dropped(x) [{t},{width}] r16 (Triton)", lambda: ops.dropped_grad(g, x, drop), 2 * n)
        report(f"g^T dropped(x) [{t},{width}] r16 (before)", lambda: g.t() @ ops.dropped(x, drop), 6 * n)
        a16 = lora_a.to(bf16)
        report(f"dropped_product dropped(g A) [{t},{width}] r16 (Triton, mask as it writes)",
               lambda: ops.dropped_product(g, lora_a, drop), 2 * n)
        report(f"g A, then dropped [{t},{width}] r16 (before)", lambda: ops.dropped(g @ a16, drop), 6 * n)
        # x's gradient through a frozen [width, width] weight: its LoRA part first, the frozen
        # matmul added in the GEMM's epilogue (now), against a separate masked add (before).
        w16, gy = torch.randn(width, width, device="cuda", generator=gen).to(bf16), y
        report(f"x grad: dropped_product, then addmm_(g_y, W) [{t}x{width}x{width}] (now)",
               lambda: ops.dropped_product(g, lora_a, drop).addmm_(gy, w16), 4 * n + 2 * w16.numel())
        report(f"x grad: g_y W + dropped(g A) [{t}x{width}x{width}] (before)",
               lambda: gy @ w16 + ops.dropped(g @ a16, drop), 4 * n + 2 * w16.numel())
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    from medqa_loop.kernels.autograd import RotaryFn

    q = torch.randn(1, t, 32, 128, device="cuda", generator=gen).to(bf16).transpose(1, 2)
    k = torch.randn(1, t, 8, 128, device="cuda", generator=gen).to(bf16).transpose(1, 2)
    cos, sin = torch.randn(2, 1, t, 128, device="cuda", generator=gen).to(bf16)
    qk_bytes = 4 * (q.numel() + k.numel())
    if not a.int8_only:
        report(f"rotary q and k [{t} tokens, 32+8 heads] (Triton)", lambda: RotaryFn.apply(q, k, cos, sin), qk_bytes)
        report(f"rotary q and k [{t} tokens, 32+8 heads] (transformers)", lambda: apply_rotary_pos_emb(q, k, cos, sin), qk_bytes)
    for out_f, in_f in ((4096, 4096), (14336, 4096), (4096, 14336)):
        cb = torch.randint(-127, 128, (out_f, in_f), device="cuda", generator=gen, dtype=torch.int8)
        scb = torch.rand(out_f, device="cuda", generator=gen) + 0.5
        x = torch.randn(t, in_f, device="cuda", generator=gen).to(bf16)
        report(f"dequantize [{out_f},{in_f}] (Triton)", lambda: ops.dequantize(cb, scb, bf16), 3 * cb.numel())
        report(f"int8_linear [{t}x{in_f}x{out_f}] (dequantize + matmul)",
               lambda: torch.nn.functional.linear(x, ops.dequantize(cb, scb, bf16)), 3 * cb.numel() + 2 * x.numel() + 2 * t * out_f)
        report(f"cast + matmul + output scale [{t}x{in_f}x{out_f}] (before)",
               lambda: torch.nn.functional.linear(x, cb.to(bf16)).mul_(scb / 127),
               3 * cb.numel() + 2 * x.numel() + 6 * t * out_f)
        # A LoRA projection's forward without backward (evaluation): LoRA folded into the weight
        # as it is dequantized (now), against x A^T, its product with B and the frozen matmul
        # added onto that (the training forward, which evaluation ran before).
        lora_a = torch.randn(16, in_f, device="cuda", generator=gen) * 0.02
        lora_b = torch.randn(out_f, 16, device="cuda", generator=gen) * 0.01
        report(f"merged_weight [{out_f},{in_f}] r16 (Triton: dequantize + scale B A)",
               lambda: ops.merged_weight(cb, scb, lora_a, lora_b, 2.0, bf16), 3 * cb.numel())
        io = 2 * x.numel() + 2 * t * out_f
        report(f"inference LoRA projection [{t}x{in_f}x{out_f}]: merged_weight + matmul (now)",
               lambda: torch.nn.functional.linear(x, ops.merged_weight(cb, scb, lora_a, lora_b, 2.0, bf16)),
               3 * cb.numel() + io)
        a16, b16 = lora_a.to(bf16), lora_b.to(bf16)
        report(f"inference LoRA projection [{t}x{in_f}x{out_f}]: x A^T, then B, addmm_ dequantized W (before)",
               lambda: torch.mm(torch.nn.functional.linear(x, a16).mul_(2.0), b16.t()).addmm_(x, ops.dequantize(cb, scb, bf16).t()),
               3 * cb.numel() + io + 4 * t * out_f + 2 * x.numel())
    if a.out:
        write_rows(a.out, rows)


def write_rows(path: str, rows: list[dict]) -> None:
    run = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0),
           "code": code_digest(), "command": shlex.join(["python", *sys.argv])}
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({**run, **row}) + "\n")


if __name__ == "__main__":
    main()

"""GPU time of the elementwise kernels (Triton) at the shapes of a 16-pair window of Mistral-7B
(~7.5k tokens), against the eager ops they replace and against the memory-bandwidth bound.

  python benchmarks/kernel_bench.py [--tokens 7500] [--out benchmarks/kernel_results.jsonl]

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
from medqa_loop import dropout, quant


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=7500)
    p.add_argument("--out")
    a = p.parse_args()
    t, bf16 = a.tokens, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []

    def report(name, fn, nbytes):
        ms = gpu_ms(fn)
        row = {"kernel": name, "tokens": t, "ms": round(ms, 4), "gb_per_s": round(nbytes / ms / 1e6, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for width in (4096, 14336):
        x = torch.randn(t, width, device="cuda", generator=gen).to(bf16)
        y = torch.randn_like(x)
        drop = dropout.dropout_args(0.1, 2**40 + 7, x.numel())
        n = x.numel()
        report(f"dropped [{t},{width}] (hash mask, Triton)", lambda: dropout.dropped(x, drop), 4 * n)
        report(f"plus_dropped [{t},{width}] (Triton)", lambda: dropout.plus_dropped(y, x, drop), 6 * n)
        report(f"eager bernoulli mask * x [{t},{width}] (before)",
               lambda: x * torch.empty_like(x).bernoulli_(0.9), 4 * n)
        report(f"copy [{t},{width}] (bandwidth reference)", lambda: x.clone(), 4 * n)
    for out_f, in_f in ((4096, 4096), (14336, 4096), (4096, 14336)):
        cb = torch.randint(-127, 128, (out_f, in_f), device="cuda", generator=gen, dtype=torch.int8)
        scb = torch.rand(out_f, device="cuda", generator=gen) + 0.5
        x = torch.randn(t, in_f, device="cuda", generator=gen).to(bf16)
        report(f"dequantize [{out_f},{in_f}] (Triton)", lambda: quant.dequantize(cb, scb, bf16), 3 * cb.numel())
        report(f"int8_linear [{t}x{in_f}x{out_f}] (dequantize + matmul)",
               lambda: quant.int8_linear(x, cb, scb), 3 * cb.numel() + 2 * x.numel() + 2 * t * out_f)
        report(f"cast + matmul + output scale [{t}x{in_f}x{out_f}] (before)",
               lambda: torch.nn.functional.linear(x, cb.to(bf16)).mul_(scb / 127),
               3 * cb.numel() + 2 * x.numel() + 6 * t * out_f)
    if a.out:
        run = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0),
               "code": code_digest(), "command": shlex.join(["python", *sys.argv])}
        with open(a.out, "a") as f:
            for row in rows:
                f.write(json.dumps({**run, **row}) + "\n")


if __name__ == "__main__":
    main()

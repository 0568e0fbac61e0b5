"""Peak memory and samples/s against tokens per micro-batch, with and without activation
checkpointing, for picking settings on a smaller GPU. One process loads the 7B base once (the
same prepare_run as the entry point) and runs real optimizer windows at each setting.

  python benchmarks/sweep.py --out DIR [--workdir /tmp/bench | --base DIR --tokenizer DIR --data FILE]
      [--tokens 4096,8192,16384] [--tokens-nogc 1024,2048,3072,4096] [--set key=value ...]
      [--profile TOKENS [--profile-gc] [--trace FILE.json.gz] [--cprofile]]

Writes sweep.jsonl and sweep.png (two panels: peak GB, samples/s) to --out. ``--profile`` runs
one more window at that row size (checkpointing with --profile-gc) under torch.profiler and prints where
the GPU time goes (kernel table) and GPU kernel time against wall time; ``--cprofile`` also runs
one under cProfile and prints where the CPU time goes (Python functions and the torch calls they
make, by own time; cProfile slows Python, so read it as shares).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from bench import code_digest, prepare  # benchmarks/ is on sys.path when this file runs as a script
from medqa_loop.batching import accumulation_windows, epoch_order, window_batches
from medqa_loop.config import load_config
from medqa_loop.debug.profiling import report
from medqa_loop.kernels.graphs import MicroBatchGraphs
from medqa_loop.loop import backward_window, window_counts
from medqa_loop.model import set_checkpointing
from medqa_loop.optim import optimizer_step
from medqa_loop.train import prepare_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/bench", help="where bench.py builds base and data")
    p.add_argument("--base", help="model dir (default: bench.py's random-init 7B in --workdir)")
    p.add_argument("--tokenizer")
    p.add_argument("--data")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", default="4096,8192,16384", help="row sizes with checkpointing")
    p.add_argument("--tokens-nogc", default="1024,2048,3072,4096", help="row sizes without")
    p.add_argument("--checkpoint-layers", default="",
                   help="checkpoint only this many decoder layers, each at the --tokens sizes (e.g. 24,16,8)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, as for medqa train")
    p.add_argument("--profile", type=int, default=0, help="profile one window at this row size")
    p.add_argument("--profile-gc", action="store_true", help="... with activation checkpointing")
    p.add_argument("--trace", help="write the profiled window's Chrome trace here (.json.gz)")
    p.add_argument("--cprofile", action="store_true", help="... and one more under cProfile")
    p.add_argument("--windows", type=int, default=3, help="timed windows per setting (+1 warm-up)")
    p.add_argument("--eager-too", action="store_true", help="time each setting with CUDA graphs and again without")
    p.add_argument("--repeat", action="store_true", help="run each timed window twice: the second time "
                   "every matmul shape has been seen (repeat_s), the first time most have not (window_s)")
    a = p.parse_args()
    out = Path(a.out)
    if not (a.base and a.tokenizer and a.data):
        a.base, a.tokenizer, a.data = prepare(Path(a.workdir), 470, 0.45)
    cfg = load_config("recipe", [
        f"output_dir={out / 'sweep-run'}", f"model.name_or_path={a.base}", f"model.tokenizer={a.tokenizer}",
        f"data.dataset={a.data}", "data.pack_tokens=16384", *a.set,
    ])
    parts = prepare_run(cfg, overwrite=True)
    model = parts.model
    model.train()  # from_pretrained returns eval mode, where HF skips activation checkpointing
    lengths = [len(e["input_ids"]) for e in parts.train_examples]
    windows = accumulation_windows(epoch_order(len(lengths), cfg.seed, 0), 1, 16)
    n_layers = parts.model.get_base_model().config.num_hidden_layers
    plans = [(n_layers, a.tokens)] + [(int(k), a.tokens) for k in a.checkpoint_layers.split(",") if k] + [(0, a.tokens_nogc)]
    rows = []
    stamp = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0), "code": code_digest(),
             "command": shlex.join(["python", *sys.argv])}
    ways = [True, False] if a.eager_too else [parts.graphs is not None]
    for layers, budgets in plans:
        set_checkpointing(model.get_base_model(), layers)
        gc = layers > 0
        for budget in [int(t) for t in budgets.split(",") if t]:
            for graphed in ways:
                # A fresh set of graphs a setting: the last setting's pool is freed, and the peaks are this one's.
                graphs = MicroBatchGraphs(model, parts.train_examples, parts.tokenizer.pad_token_id, lambda *_: None) if graphed else None
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                walls, launches, repeats, pairs, tokens, longest = [], [], [], 0, 0, 0
                setting = {"tokens_per_micro_batch": budget, "checkpointing": gc, "checkpoint_layers": layers,
                           "cuda_graphs": graphed}
                try:
                    cfg.data.pack_tokens = budget
                    for w, window in enumerate(windows[: a.windows + 1]):
                        wall, launched, counts, _, row_tokens = optimizer_window(parts, cfg, window, graphs)
                        longest = max(longest, row_tokens)
                        if w:  # the first window warms up kernels and the allocator (and captures graphs)
                            walls.append(round(wall, 4))
                            launches.append(round(launched, 4))
                            pairs += int(counts[3])
                            tokens += int(counts[2])
                            if a.repeat:
                                repeats.append(round(optimizer_window(parts, cfg, window, graphs)[0], 4))
                    row = {**stamp, **setting, "samples_per_s": pairs / sum(walls), "tokens_per_s": tokens / sum(walls),
                           # with --repeat: the same windows again, every graph and matmul shape seen
                           **({"repeat_samples_per_s": pairs / sum(repeats)} if repeats else {}),
                           "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                           "reserved_gb": torch.cuda.max_memory_reserved() / 1e9, "max_row_tokens": longest,
                           "graphs_captured": sorted(graphs.graphs) if graphs else None,
                           "window_s": walls, "launch_s": launches, **({"repeat_s": repeats} if repeats else {})}
                except torch.OutOfMemoryError:
                    parts.optimizer.zero_grad(set_to_none=True)
                    row = {**stamp, **setting, "oom": True}
                del graphs
                print(json.dumps(row), flush=True)
                rows.append(row)
    (out / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot(rows, out / "sweep.png", torch.cuda.get_device_name(0))
    if a.profile:
        cfg.data.pack_tokens = a.profile
        set_checkpointing(model.get_base_model(), n_layers if a.profile_gc else 0)
        profile_window(parts, cfg, windows[1], a.trace)
        if a.cprofile:
            cprofile_window(parts, cfg, windows[1])


def optimizer_window(parts, cfg, window, graphs=None) -> tuple[float, float, torch.Tensor, int, int]:
    """One optimizer step over ``window`` as the loop makes it (micro-batches, backward, clip,
    step): (wall seconds, seconds until the CPU had queued all its GPU work, loop.window_counts,
    micro-batches, tokens of the largest micro-batch). Where the first two are close, the CPU,
    not the GPU, sets the pace."""
    acc, model = parts.accelerator, parts.model
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    batches = window_batches(window, parts.train_examples, cfg, parts.collate_fn, acc.device)
    counts = window_counts(acc, batches)
    loss = backward_window(acc, model, batches, counts[0], graphs=graphs) / counts[0]
    optimizer_step(acc, parts.optimizer, [q for q in model.parameters() if q.requires_grad], cfg.train.max_grad_norm, loss)
    launched = time.perf_counter() - t0
    torch.cuda.synchronize()
    return time.perf_counter() - t0, launched, counts, len(batches), max(b["input_ids"].numel() for b in batches)


def profile_window(parts, cfg, window, trace: str | None = None) -> None:
    """One optimizer window under torch.profiler: the top kernels by GPU time, and GPU kernel
    time against wall time (a gap means the CPU cannot feed the GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _, _, micro_batches, _ = optimizer_window(parts, cfg, window, parts.graphs)
    if trace:
        prof.export_chrome_trace(trace)
    print(report(prof, wall), flush=True)
    print(json.dumps({"profile_tokens": cfg.data.pack_tokens, "micro_batches": micro_batches}), flush=True)


def cprofile_window(parts, cfg, window) -> None:
    """One optimizer window under cProfile: the 45 functions with the most own CPU time, then the
    30 with the most time spent in them and their callees (which layer of the stack the time is in)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    wall, launched, _, _, _ = optimizer_window(parts, cfg, window)
    prof.disable()
    print(json.dumps({"cprofile_wall_s": wall, "cprofile_launch_s": launched}), flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(45)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


def plot(rows: list[dict], path: Path, gpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4))
    def layers_of(r):
        return r.get("checkpoint_layers", 32 if r["checkpointing"] else 0)

    for graphed in sorted({bool(r.get("cuda_graphs")) for r in rows}, reverse=True):
        for layers in sorted({layers_of(r) for r in rows}, reverse=True):
            ok = [r for r in rows if layers_of(r) == layers and bool(r.get("cuda_graphs")) == graphed and not r.get("oom")]
            if not ok:
                continue
            label = f"{layers} layers checkpointed" if layers else "no checkpointing"
            style = ("o" if layers else "s") + ("-" if graphed else ":")
            label += ", CUDA graphs" if graphed else ", eager"
            # what the GPU holds for the process (the graphs' pool included)
            mem.plot([r["tokens_per_micro_batch"] for r in ok], [r.get("reserved_gb", r["peak_gb"]) for r in ok], style, label=label)
            speed.plot([r["tokens_per_micro_batch"] for r in ok],
                       [r.get("repeat_samples_per_s", r["samples_per_s"]) for r in ok], style, label=label)
    for gb in (16, 24):
        mem.axhline(gb, color="grey", lw=0.8, ls=":")
    for ax, title in ((mem, "peak GPU memory reserved (GB)"), (speed, "samples/s (16 pairs a step)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per micro-batch (packed row)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Mistral-7B, int8 base (dequant path), bf16, LoRA r16 x7, fused ops, varlen attention — {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

"""Time one full evaluation of the validation split on the GPU, the way the loop ran it before
(padded batches of ``train.eval_batch_size`` pairs in split order) against packed rows (the
loop's way now: ``batching.eval_micro_batches``), and check both give the same loss and token
accuracy.

  python benchmarks/eval_bench.py --out DIR [--workdir /tmp/bench] [--rows 16384,32768] [--graph-rows 2048,4096]
      [--no-padded] [--lora-b-std 0.01] [--set key=value ...]

``--graph-rows``: packed rows of these sizes replayed as CUDA graphs (kernels.graphs, as the loop
runs evaluation where training uses graphs), each size in a fresh memory pool. ``--lora-b-std``:
LoRA's B matrices drawn from N(0, std^2) (seeded) instead of PEFT's zeros, so the adapters change
the loss, as after training; the loss then compares code versions on the same adapters.

One process loads the random-init 7B base (bench.py builds it) through the entry point's
prepare_run; each way runs twice and the second is timed (the first meets new shapes).
Appends a row per way to <out>/eval_results.jsonl with the command, machine, date and code digest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import torch

from bench import code_digest, prepare  # benchmarks/ is on sys.path when this file runs as a script
from medqa_loop.batching import collate, eval_micro_batches
from medqa_loop.config import load_config
from medqa_loop.evaluation import evaluate
from medqa_loop.kernels.graphs import MicroBatchGraphs
from medqa_loop.train import prepare_run


def timed(fn) -> tuple[object, float, float]:
    """(result, seconds, peak GB) of the second of two calls."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/bench")
    p.add_argument("--out", required=True)
    p.add_argument("--rows", default="16384,32768", help="packed row sizes (tokens) to time")
    p.add_argument("--graph-rows", default="", help="packed row sizes (tokens) to time as CUDA graphs")
    p.add_argument("--no-padded", action="store_true", help="leave out the padded batches (the old way)")
    p.add_argument("--lora-b-std", type=float, help="draw LoRA's B from N(0, std^2), seed 0, instead of zeros")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, as for medqa train")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base, tokenizer, data = prepare(Path(a.workdir), 470, 0.45)
    cfg = load_config("recipe", [
        f"output_dir={out / 'eval-run'}", f"model.name_or_path={base}", f"model.tokenizer={tokenizer}",
        f"data.dataset={data}", *a.set,
    ])
    run = prepare_run(cfg, overwrite=True)
    if a.lora_b_std:
        gen = torch.Generator(device=run.accelerator.device).manual_seed(0)
        with torch.no_grad():
            for name, param in run.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, a.lora_b_std, generator=gen)
    val = run.val_examples
    lengths = [len(e["input_ids"]) for e in val]
    pad_id = run.tokenizer.pad_token_id
    size = cfg.train.eval_batch_size
    ways = {} if a.no_padded else {f"padded, batches of {size} in split order (before)": (
        partial(collate, pad_id=pad_id), [list(range(i, min(i + size, len(val)))) for i in range(0, len(val), size)], False
    )}
    for tokens in [int(t) for t in a.rows.split(",") if t]:
        ways[f"packed rows of {tokens} tokens"] = (
            partial(collate, pad_id=pad_id, packed=True), eval_micro_batches(lengths, "pack", size, tokens), False
        )
    for tokens in [int(t) for t in a.graph_rows.split(",") if t]:
        ways[f"packed rows of {tokens} tokens, CUDA graphs"] = (
            partial(collate, pad_id=pad_id, packed=True), eval_micro_batches(lengths, "pack", size, tokens), True
        )
    common = {
        "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0), "code": code_digest(),
        "command": shlex.join(["python", *sys.argv]), "pairs": len(val), "tokens": sum(lengths),
        "lora_b_std": a.lora_b_std,
    }
    with (out / "eval_results.jsonl").open("a") as f:
        for name, (collate_fn, micro_batches, graphed) in ways.items():
            graphs = MicroBatchGraphs(run.model, run.train_examples + val, pad_id, lambda *_: None) if graphed else None
            torch.cuda.empty_cache()
            r, seconds, peak = timed(partial(evaluate, run.accelerator, run.model, val, collate_fn, micro_batches, graphs))
            row = {**common, "way": name, "forwards": len(micro_batches), "seconds": round(seconds, 3),
                   "peak_gb": round(peak, 2), "reserved_gb": round(torch.cuda.memory_reserved() / 1e9, 2),
                   "eval_loss": r.loss, "eval_token_acc": r.token_acc}
            del graphs
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

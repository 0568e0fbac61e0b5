"""Where a training run's start-up goes on the GPU: imports, tokenizing, the 7B load in 8-bit, the
first step (Triton compiling on a cold cache), each run under cProfile and ``-X importtime``.

  python benchmarks/startup_profile.py --out DIR [--workdir /tmp/bench]

Builds the random-init 7B base and the synthetic data (bench.py), then runs a 2-step training
twice through ``python -m medqa_loop.train`` (what ``accelerate launch`` runs in one process):
first with Triton's cache emptied (a fresh machine), then again (every later run). Each run
leaves <out>/<run>.prof and <run>.importtime, and a row in <out>/startup_results.jsonl: the
wall time, the seconds in top-level imports, cProfile's cumulative seconds of the phases below
(they overlap: the bytecode compile is part of the imports, the quantization of the base load;
profiling slows Python-heavy parts, not the copies and kernels) and the first step's seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pstats
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import ROOT, code_digest, prepare  # benchmarks/ is on sys.path when this file runs as a script

# phase -> (file suffix, function name) of the function whose cumulative time it is
PHASES = {
    "base_load_s": ("modeling_utils.py", "_load_pretrained_model"),  # read, copy to the GPU, quantize
    "int8_quantize_s": ("bitsandbytes/nn/modules.py", "_quantize"),
    "tokenize_s": ("medqa_loop/data.py", "encode_pairs"),
    "add_lora_s": ("medqa_loop/model.py", "add_lora"),
    "python_bytecode_compile_s": ("~", "<built-in method builtins.compile>"),  # no .pyc written yet
    "triton_launcher_build_s": ("triton/runtime/build.py", "compile_module_from_src"),
}


def import_seconds(importtime: Path) -> float:
    """Seconds in top-level imports, from ``-X importtime``'s cumulative microseconds."""
    total = 0
    for line in importtime.read_text().splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            _, cumulative, name = line.split("|")
            if not name.startswith("  "):  # depth 0: " name"; each level nests two more spaces
                total += int(cumulative)
    return total / 1e6


def summarize(prof: Path, importtime: Path, wall_s: float, metrics: Path) -> dict:
    stats = pstats.Stats(str(prof)).stats
    row = {"wall_s": round(wall_s, 1), "imports_s": round(import_seconds(importtime), 1)}
    for phase, (suffix, func) in PHASES.items():
        row[phase] = round(sum(v[3] for (file, _, name), v in stats.items() if name == func and file.endswith(suffix)), 2)
    # Tensor.to's own time: the loader's copies of each weight from the (mmap'd) file to the GPU
    row["tensor_to_s"] = round(sum(v[2] for (_, _, name), v in stats.items() if name == "<method 'to' of 'torch._C.TensorBase' objects>"), 2)
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    row["first_step_s"] = round(steps[0]["step_time_s"], 2) if steps else None
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/bench")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import torch

    work, out = Path(a.workdir), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base, tok, data = prepare(work, 470, 0.45)
    run_dir = work / "runs" / "startup"
    sets = [f"output_dir={run_dir}", f"model.name_or_path={base}", f"model.tokenizer={tok}", f"data.dataset={data}",
            "train.max_steps=2", "train.eval_every=100000", "train.sanity_eval_batches=0"]
    common = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0), "code": code_digest()}
    for name in ("cold", "warm"):
        if name == "cold":
            shutil.rmtree(Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache")), ignore_errors=True)
        cmd = [sys.executable, "-X", "importtime", "-m", "cProfile", "-o", str(out / f"{name}.prof"),
               "-m", "medqa_loop.train", "--config", "configs/recipe.yaml", "--overwrite",
               *[arg for s in sets for arg in ("--set", s)]]
        started = time.perf_counter()
        with (out / f"{name}.importtime").open("w") as err, (out / f"{name}.log").open("w") as log:
            subprocess.run(cmd, stdout=log, stderr=err, cwd=ROOT, check=True)
        row = {**common, "run": name, "command": shlex.join(cmd),
               **summarize(out / f"{name}.prof", out / f"{name}.importtime", time.perf_counter() - started,
                           run_dir / "metrics.jsonl")}
        print(json.dumps(row), flush=True)
        with (out / "startup_results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

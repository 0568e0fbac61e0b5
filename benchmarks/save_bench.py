"""How long a training state and a best-adapter save hold up training, written in the caller (as
before checkpoint.writer) and in the background (the loop now), at Mistral-7B's LoRA sizes.

  python benchmarks/save_bench.py --out DIR [--device cuda|cpu] [--repeat 3]

The state is the real one (StateSaver.save: the r16 LoRA on all seven projections of 32 layers,
41.9M parameters, and AdamW's moments, ~480 MB on disk); the frozen base is built on the meta
device, since a save never reads it, so the machine needs no 7B. "held" is how long the save call
keeps the loop (in the background: the host copy of weights and moments), "written" until the
files are on disk and renamed into place. The writer's thread shares the GIL with the loop:
"written beside a loop" is the background state's write while this thread runs pure Python
until it is done (a CPU-bound loop). Appends a row per way and repeat to
<out>/save_results.jsonl with the command, machine, date and code digest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from bench import code_digest  # benchmarks/ is on sys.path when this file runs as a script
from medqa_loop.checkpoint.adapter import save_best_adapter
from medqa_loop.checkpoint.state import Position, StateSaver
from medqa_loop.checkpoint.writer import CheckpointWriter
from medqa_loop.config import load_config
from medqa_loop.optim import build_optimizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_7b(device: torch.device):
    """Mistral-7B's shapes with r16 LoRA: the base on the meta device, the LoRA matrices real."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    with torch.device("meta"):
        base = MistralForCausalLM(MistralConfig())
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=TARGETS))
    for name, p in list(model.named_parameters()):
        if p.requires_grad:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, torch.nn.Parameter(torch.randn(p.shape, device=device) * 0.01))
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    from accelerate import Accelerator

    out, device = Path(a.out), torch.device(a.device)
    run_dir = out / "save-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    model = lora_7b(device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    optimizer = accelerator.prepare(build_optimizer(model, 1e-4, 0.01))
    params = [q for q in model.parameters() if q.requires_grad]
    for q in params:
        q.grad = torch.randn_like(q)
    optimizer.step()  # the moments exist, as after any step
    cfg = load_config("recipe", [f"output_dir={run_dir}"])
    saver = StateSaver(cfg, accelerator, model, optimizer, "benchmark")
    info = {
        "date": datetime.date.today().isoformat(), "code": code_digest(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": device.type, "lora_params": sum(q.numel() for q in params),
    }
    rows = []
    for repeat in range(a.repeat):
        for background in (False, True):
            writer = CheckpointWriter(background)
            step = 2 * repeat + background + 1
            for what in ("state", "best_adapter"):
                sync(device)
                started = time.perf_counter()
                if what == "state":
                    saver.save(Position(step, 0, 1), writer)
                else:
                    save_best_adapter(accelerator, model, run_dir, None, step, 1.0, writer)
                held = time.perf_counter() - started
                writer.wait()
                written = time.perf_counter() - started
                size = sum(f.stat().st_size for f in (run_dir / "state" / f"step-{step}").iterdir()) if what == "state" else None
                rows.append({**info, "what": what, "way": "background" if background else "in the caller",
                             "repeat": repeat, "held_s": round(held, 4), "written_s": round(written, 4), "bytes": size})
                print(json.dumps(rows[-1]), flush=True)
        done, n = threading.Event(), 0
        started = time.perf_counter()
        saver.save(Position(100 + step, 0, 1), writer)
        writer.submit("nothing", run_dir, done.set)  # runs once the state is written
        while not done.is_set():
            n += 1
        rows[-2]["written_beside_loop_s"] = round(time.perf_counter() - started, 4)
        print(json.dumps({"written_beside_loop_s": rows[-2]["written_beside_loop_s"]}), flush=True)
    with (out / "save_results.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

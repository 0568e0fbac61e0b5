"""End-to-end training throughput on the GPU: the original recipe (HF Trainer, reference only)
and medqa_loop through its real entry point, side by side, on one machine in one run.

  python benchmarks/bench.py --workdir /tmp/bench --steps 4 [--variants a,b,...] [--out DIR] [--profile-step N]

Builds a random-init Mistral-7B (MistralConfig() defaults are the exact 7B shapes; no weights
can be downloaded) on the GPU and saves it as safetensors, makes the synthetic SyntheticMedicalQA
stand-in (benchmarks/synthetic.py), then runs each variant as its own process:
`accelerate launch -m medqa_loop.train --config configs/recipe.yaml --set ...`. samples/s and
real tokens/s are taken from metrics.jsonl over the steps after the first (start-up excluded);
peak GB is torch.cuda.max_memory_allocated of the training process; each row names the code
it measured (code_digest). MFU counts 4N FLOP per token (forward 2N + input-gradient 2N; the
frozen base computes no weight gradient) against the H100 SXM's 989 TFLOP/s dense bf16.
Appends to <out>/results.jsonl and <out>/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_PARAMS = 7.24e9
PEAK_FLOPS = 989e12

# name -> (quant, overrides on top of configs/recipe.yaml)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    # The recipe's settings through our loop: fp32, bitsandbytes LLM.int8, batch 1 x GA 16.
    "medqa_loop_recipe_settings": ("int8", ["model.dtype=float32", "model.int8_matmul=bnb", "data.batching=pad"]),
    # Same LLM.int8 base, bf16 for everything not int8 and 4 pairs a micro-batch (GA 4).
    "medqa_loop_bf16_mb4": ("int8", ["model.dtype=bfloat16", "model.int8_matmul=bnb", "data.batching=pad",
                                     "train.micro_batch_size=4", "train.grad_accum_steps=4"]),
    # bitsandbytes LLM.int8 matmul with packing: what the fast int8 path replaces.
    "medqa_loop_bnb_pack8k": ("int8", ["model.int8_matmul=bnb"]),
    # The defaults (configs/recipe.yaml as shipped): int8 weights cast per matmul, bf16, fused
    # LoRA/norm/SwiGLU ops, pairs packed with varlen FlashAttention into rows of the size, and
    # activation checkpointing and CUDA graphs as, the memory plan chooses (on an H200: a window a
    # row, nothing checkpointed).
    "medqa_loop": ("int8", []),
    # The defaults planned for a 16 GB GPU (model.memory_limit_gb): the memory plan chooses the
    # rows and the layers to checkpoint for the data's largest micro-batch to fit 16 GB less its
    # 10% margin (2k-token rows as CUDA graphs, 2 layers checkpointed).
    "medqa_loop_16gb": ("int8", ["model.memory_limit_gb=16"]),
    # The same with 2k-token rows set by hand: four or five micro-batches a window, few or no layers
    # checkpointed; CPU-bound eagerly, at the GPU's pace as CUDA graphs.
    "medqa_loop_16gb_2k": ("int8", ["model.memory_limit_gb=16", "data.pack_tokens=2048"]),
    "medqa_loop_16gb_2k_eager": ("int8", ["model.memory_limit_gb=16", "data.pack_tokens=2048", "model.cuda_graphs=false"]),
    # The defaults without CUDA graphs (model.cuda_graphs=false): each micro-batch launched eagerly.
    "medqa_loop_eager": ("int8", ["model.cuda_graphs=false"]),
    # Speed with memory to spare: 8k-token rows, no layer checkpointed.
    "medqa_loop_pack8k_nogc": ("int8", ["data.pack_tokens=8192", "model.gradient_checkpointing=false"]),
    # Every layer checkpointed, a window a row (the defaults before the memory plan; ~12 GB).
    "medqa_loop_checkpoint_all": ("int8", ["model.gradient_checkpointing=true"]),
    # Length-grouped dynamic padding instead of packing (4 pairs a micro-batch x GA 4).
    "medqa_loop_group4": ("int8", ["data.batching=group_by_length", "train.micro_batch_size=4",
                                   "train.grad_accum_steps=4"]),
    # Speed over memory (a GPU with 32 GB or more): 4k-token rows without activation checkpointing.
    "medqa_loop_pack4k_nogc": ("int8", ["data.pack_tokens=4096", "model.gradient_checkpointing=false"]),
    # The defaults before the fused ops and varlen attention: stock PEFT/transformers modules, SDPA
    # with a block-diagonal mask over 8k-token rows.
    "medqa_loop_stock_ops_sdpa_8k": ("int8", ["model.fused_ops=false", "model.attn_implementation=sdpa",
                                              "data.pack_tokens=8192"]),
    # FlexAttention: packed rows' block-diagonal mask skips the blocks between pairs.
    "medqa_loop_flex": ("int8", ["model.attn_implementation=flex_attention"]),
}


def sh(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    print("$", shlex.join(cmd), flush=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        print(log.read_text()[-4000:], flush=True)
    return proc


def build_base(work: Path) -> tuple[Path, Path]:
    """Random-init Mistral-7B saved like a downloaded model, plus the real tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    base, tok_dir = work / "mistral-7b-random", ROOT / ".carry" / "tokenizer"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = MistralForCausalLM(MistralConfig()).to(torch.bfloat16)
        model.save_pretrained(base)
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(base)
        del model
        torch.cuda.empty_cache()
    return base, tok_dir


def code_digest() -> str:
    """sha256 (12 hex digits) of medqa_loop's source: identifies the code measured where the
    copy's git metadata cannot (the lent GPU machine's copy reported a stale HEAD). The same
    function over a checkout says which commit a row belongs to."""
    h = hashlib.sha256()
    for path in sorted((ROOT / "medqa_loop").rglob("*.py")):
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def prepare(work: Path, mean_tokens: float, sigma: float) -> tuple[Path, Path, Path]:
    """(base model dir, tokenizer dir, synthetic data file) under ``work``, built if missing."""
    base, tok = build_base(work)
    data = work / f"synthetic-{mean_tokens:g}-{sigma:g}.jsonl"
    if not data.is_file():
        sh([sys.executable, "benchmarks/synthetic.py", "--tokenizer", str(tok), "--out", str(data),
            "--mean-tokens", str(mean_tokens), "--sigma", str(sigma)], work / "synthetic.log")
    return base, tok, data


def summarize(metrics: Path, profiled: set[int] = frozenset()) -> dict:
    """Throughput over the logged optimizer steps after the first (which carries start-up),
    leaving out the ``profiled`` ones (the profiler slows them)."""
    records = list(map(json.loads, metrics.read_text().splitlines()))
    logged = [r for r in records if "loss" in r]
    steps = [r for r in logged[1:] if r["step"] not in profiled]
    plan = next((r for r in records if "checkpoint_layers" in r), {})  # the run's first line
    if not steps:
        raise ValueError(f"{metrics}: no timed steps (the first is start-up; profiled ones are left out)")
    secs = sum(r["step_time_s"] for r in steps)
    samples = sum(r["samples_per_s"] * r["step_time_s"] for r in steps)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steps)
    return {
        "samples_per_s": samples / secs,
        "tokens_per_s": tokens / secs,
        "peak_gb": max(r.get("peak_gb", 0.0) for r in steps),
        "peak_reserved_gb": max(r.get("peak_reserved_gb", 0.0) for r in steps),
        "steps_timed": len(steps),
        "plan": {k: plan.get(k) for k in ("rows", "checkpoint_layers", "cuda_graphs", "memory_estimate_gb")},
        "step_s": [round(r["step_time_s"], 4) for r in steps],  # the spread, not only the mean
        "loss": [round(r["loss"], 6) for r in logged],  # every step's: numerics compared across code
    }


def job_parts(metrics: Path, wall_s: float) -> dict:
    """Where a whole run's wall time went: its optimizer steps, its evaluations, and the rest
    (start-up: imports, base load, tokenization; adapter and state saves; the summary)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps_s = sum(r["step_time_s"] for r in records if "loss" in r)
    evals = [r["eval_time_s"] for r in records if "eval_time_s" in r]
    return {"wall_s": round(wall_s, 1), "steps_s": round(steps_s, 1), "evals": len(evals),
            "eval_s": [round(e, 2) for e in evals], "rest_s": round(wall_s - steps_s - sum(evals), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/bench")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (first untimed)")
    p.add_argument("--recipe-steps", type=int, help="steps of the (slow) HF Trainer reference; default --steps")
    p.add_argument("--variants", default="recipe_hf_trainer," + ",".join(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "benchmarks"), help="where results.jsonl and BENCHMARKS.md go")
    p.add_argument("--mean-tokens", type=float, default=470)
    p.add_argument("--sigma", type=float, default=0.45)
    p.add_argument("--with-evals", action="store_true", help="keep the recipe's evaluations (sanity, every "
                   "train.eval_every steps, epoch ends) and saves, and report the process's wall time and "
                   "the seconds in steps and in evaluations: the whole job's parts")
    p.add_argument("--profile-step", type=int, help="record this step of the medqa_loop variants with "
                   "torch.profiler (<workdir>/runs/<variant>/profile/, medqa_loop.profiling); it is not timed")
    a = p.parse_args()

    import torch

    work, out = Path(a.workdir), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0)
    base, tok, data = prepare(work, a.mean_tokens, a.sigma)
    date = datetime.date.today().isoformat()
    rows = []
    for name in a.variants.split(","):
        log = work / f"{name}.log"
        if name == "recipe_hf_trainer":
            cmd = [sys.executable, "benchmarks/recipe_reference.py", "--model", str(base),
                   "--tokenizer", str(tok), "--data", str(data), "--steps", str(a.recipe_steps or a.steps)]
            proc = sh(cmd, log)
            if proc.returncode:
                continue
            result, quant = json.loads(log.read_text().strip().splitlines()[-1]), "int8"
        else:
            quant, overrides = VARIANTS[name]
            run_dir = work / "runs" / name
            sets = [f"output_dir={run_dir}", f"model.name_or_path={base}", f"model.tokenizer={tok}",
                    f"data.dataset={data}", f"train.max_steps={a.steps}", *overrides]
            if not a.with_evals:
                sets += ["train.eval_every=100000", "train.sanity_eval_batches=0"]
            profiled = {a.profile_step} if a.profile_step else set()
            if profiled:
                sets.append(f"train.profile_steps=[{a.profile_step}]")
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   "accelerate_config.yaml", "-m", "medqa_loop.train", "--config", "configs/recipe.yaml",
                   "--overwrite", *[x for s in sets for x in ("--set", s)]]
            started = time.perf_counter()
            if sh(cmd, log).returncode:
                continue
            result = summarize(run_dir / "metrics.jsonl", profiled)
            if a.with_evals:
                result["job"] = job_parts(run_dir / "metrics.jsonl", time.perf_counter() - started)
        tokens = result["tokens_per_s"]
        row = {
            "date": date, "gpu": gpu, "variant": name, "quant": quant,
            "samples_per_s": round(result["samples_per_s"], 3),
            "tokens_per_s": round(tokens, 1),
            "peak_gb": round(result["peak_gb"], 2),
            "peak_reserved_gb": round(result.get("peak_reserved_gb", 0.0), 2),
            "mfu": round(tokens * 4 * N_PARAMS / PEAK_FLOPS, 4),
            "mean_tokens": a.mean_tokens, "sigma": a.sigma, "steps_timed": result["steps_timed"],
            "step_s": result.get("step_s"),  # None for the HF Trainer reference
            "loss": result.get("loss"),
            **({"job": result["job"]} if "job" in result else {}),
            **({"plan": result["plan"]} if "plan" in result else {}),
            "code": code_digest(),
            "command": shlex.join(cmd).replace(str(ROOT) + "/", ""),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    with (out / "BENCHMARKS.md").open("a") as f:
        recipe = f" --recipe-steps {a.recipe_steps}" if a.recipe_steps else ""
        f.write(f"\n### {date}, {gpu}: `python benchmarks/bench.py --steps {a.steps}{recipe} --variants {a.variants}`\n\n")
        f.write("| variant | quant | samples/s | real tokens/s | peak GB | MFU |\n|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['variant']} | {r['quant']} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} "
                    f"| {r['peak_gb']:.1f} | {r['mfu']:.1%} |\n")
    print("\n".join(f"{r['variant']:28s} {r['samples_per_s']:7.2f} samples/s {r['tokens_per_s']:8.0f} tok/s "
                    f"{r['peak_gb']:6.1f} GB" for r in rows))


if __name__ == "__main__":
    main()

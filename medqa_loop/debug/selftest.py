"""Gradient-accumulation self-test: one window of k micro-batches vs one batch of the same pairs.

    medqa selftest [--config NAME|FILE] [--set key=value ...] [--eval-mode]

On the configured model and data, the first window of the run (``train.grad_accum_steps``
micro-batches of ``train.micro_batch_size`` pairs, at least 2) goes through the loop's own
backward_window twice: as the run would accumulate it, and as one batch of all its pairs. The
two gradients must agree to a tolerance set by the numerics of the config (printed with the
reason). LoRA dropout is switched off (otherwise the two passes draw different masks) and, since
LoRA B starts at 0 (so A's gradient would be 0), B is filled with seeded N(0, 0.02) values.
Exit status 0 = pass, 1 = fail, 2 = bad config or data.

bitsandbytes and the tolerance: on CUDA (and on the CPU in eval mode) LLM.int8 quantizes
activations per token and, at ``llm_int8_threshold`` > 0, moves every column holding an outlier
anywhere in the *batch* to an fp16 matmul for all pairs of that batch, so the columns a pair gets
depend on its batch mates: one batch and k micro-batches differ by ~1.3% on the tiny model at
threshold 6, by ~1e-4 at threshold 0. On the CPU in
training, bitsandbytes 0.50 dequantizes the weights and multiplies in fp32 instead: no activation
quantization, agreement to fp32 rounding (~6e-7) at any threshold. The report says which path
ran, with the outlier columns per layer; ``--eval-mode`` runs both passes in eval mode, which on
the CPU is the LLM.int8 path CUDA training takes.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

import torch

from medqa_loop.batching import accumulation_windows, epoch_order, to_device
from medqa_loop.config import Config, ConfigError, load_config
from medqa_loop.debug.int8 import Int8Outliers
from medqa_loop.loop import backward_window, window_counts
from medqa_loop.model import trainable

# Relative-difference tolerances and why (see the module docstring for the measurements).
FP32 = (1e-5, "fp32 compute: only summation order differs")
HALF = (1e-2, "bf16/fp16 compute: 8-bit mantissas, summation order differs")
INT8_NO_SPLIT = (5e-3, "int8 activations may be quantized per token (threshold 0: no outlier split)")
INT8_SPLIT = (5e-2, "LLM.int8 moves outlier columns to fp16 per batch, so a pair's columns depend on its batch mates")


@dataclass
class SelftestResult:
    rel_diff: float  # |g_window - g_batch| / |g_batch| over all LoRA gradients
    tolerance: float
    reason: str  # why that tolerance
    worst_module: tuple[str, float]  # the LoRA matrix with the largest relative difference
    rows: list[list[int]]  # the window's micro-batches (dataset rows)
    outliers: dict[str, dict[str, int]]  # "window" / "batch" -> 8-bit layer -> outlier columns

    @property
    def passed(self) -> bool:
        return self.rel_diff <= self.tolerance


def tolerance(cfg: Config, outliers_split: bool) -> tuple[float, str]:
    if cfg.model.load_in_8bit and outliers_split:
        return INT8_SPLIT
    if cfg.model.load_in_8bit and cfg.model.llm_int8_threshold == 0:
        return INT8_NO_SPLIT  # that path records nothing to tell whether it ran
    return FP32 if cfg.model.dtype == "float32" else HALF


def check(parts, cfg: Config, eval_mode: bool = False) -> SelftestResult:
    """Run the comparison on built parts (LoRA dropout must be 0)."""
    if cfg.lora.dropout != 0:
        raise ConfigError("the self-test needs lora.dropout=0 (two passes would draw different masks)")
    t, accelerator, model = cfg.train, parts.accelerator, parts.model
    order = epoch_order(len(parts.train_examples), cfg.seed, 0)
    window = accumulation_windows(order, t.micro_batch_size, max(t.grad_accum_steps, 2))[0]
    params = trainable(accelerator.unwrap_model(model))
    with torch.no_grad():
        if all(not p.any() for n, p in params.items() if "lora_B" in n):
            gen = torch.Generator().manual_seed(cfg.seed)
            for n, p in params.items():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    outliers = Int8Outliers(accelerator.unwrap_model(model))
    model.train(not eval_mode)

    def gradient(groups: list[list[int]]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        outliers.reset()
        batches = [to_device(parts.collate_fn([parts.train_examples[i] for i in g]), accelerator.device) for g in groups]
        backward_window(accelerator, model, batches, window_counts(accelerator, batches)[0])
        return {n: p.grad.detach().double().clone() for n, p in params.items()}

    g_window = gradient(window)
    cols_window = outliers.counts()
    g_batch = gradient([[i for mb in window for i in mb]])
    cols_batch = outliers.counts()
    outliers.remove()
    model.zero_grad(set_to_none=True)
    model.train()

    diff = math.sqrt(sum(float((g_window[n] - g_batch[n]).pow(2).sum()) for n in params))
    rel = diff / math.sqrt(sum(float(g.pow(2).sum()) for g in g_batch.values()))
    per_module = {n: float((g_window[n] - g_batch[n]).norm() / g_batch[n].norm().clamp(min=1e-30)) for n in params}
    worst = max(per_module.items(), key=lambda kv: kv[1])
    tol, reason = tolerance(cfg, bool(cols_window or cols_batch))
    rows = [[parts.train_examples[i]["row"] for i in mb] for mb in window]
    return SelftestResult(rel, tol, reason, worst, rows, {"window": cols_window, "batch": cols_batch})


def report(r: SelftestResult, cfg: Config) -> str:
    pairs = sum(len(mb) for mb in r.rows)
    lines = [
        f"gradient-accumulation self-test: {len(r.rows)} micro-batches vs 1 batch of the same {pairs} pairs (rows {r.rows})",
        f"  relative difference |g_window - g_batch| / |g_batch| = {r.rel_diff:.3e}  (tolerance {r.tolerance:g}: {r.reason})",
        f"  largest per-module difference: {r.worst_module[0]} {r.worst_module[1]:.3e}",
    ]
    if cfg.model.load_in_8bit and r.outliers["window"]:
        lines.append(
            f"  8-bit: LLM.int8 outlier columns per layer at threshold {cfg.model.llm_int8_threshold:g} "
            "(union over the micro-batches / the one batch):"
        )
        for name in r.outliers["batch"]:
            lines.append(f"    {name:<32} {r.outliers['window'].get(name, 0):>5} / {r.outliers['batch'][name]:>5}")
    elif cfg.model.load_in_8bit and cfg.model.llm_int8_threshold > 0:
        lines.append(
            "  8-bit: bitsandbytes did not take its LLM.int8 outlier path in these training passes "
            "(on the CPU it multiplies dequantized weights in fp32): no outlier columns"
        )
    lines.append("PASS" if r.passed else "FAIL: the accumulated gradient is not that of one batch")
    return "\n".join(lines)


def run_selftest(config: str | None, overrides: list[str], eval_mode: bool = False) -> tuple[bool, str]:
    """``medqa selftest``: build the run's parts in a scratch output_dir (a run directory is never
    touched), with dropout off; return (passed, the report)."""
    from medqa_loop.train import prepare_run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [*overrides, f"output_dir={tmp}", "lora.dropout=0.0"])
        parts = prepare_run(cfg)
        result = check(parts, parts.cfg, eval_mode)
    return result.passed, report(result, cfg)

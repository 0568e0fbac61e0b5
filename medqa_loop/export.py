"""Merge an adapter into a 16-bit copy of its base and save a standard transformers model.

    medqa export --adapter runs/tiny/final --out exported/ [--dtype float16]

The result (config.json, model.safetensors, tokenizer) loads with plain
``AutoModelForCausalLM.from_pretrained(out)``: no PEFT, no bitsandbytes. The base is loaded
*unquantized* in the export dtype for the merge: adding B·A into int8 weights would round the
sum back to int8 and lose most of the update. Logits then match base + adapter in the same dtype
up to that dtype's rounding of W + B·A (tests/cli/test_export.py states the tolerances).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from medqa_loop.checkpoint.adapter import adapter_tokenizer, check_adapter_fits, load_adapted_model, resolve_adapter
from medqa_loop.config import DTYPE_NAMES



def export_merged(
    adapter: str | Path, out: str | Path, base: str | None = None, dtype: str = "bfloat16",
    overwrite: bool = False, trust_remote_code: bool = False,
) -> Path:
    # bfloat16 keeps fp32's range (the usual choice for Mistral); float16 has 3 more mantissa
    # bits; float32 gives a merge exact to fp32 rounding, at twice the size.
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {dtype!r}")
    src = resolve_adapter(adapter, base, trust_remote_code)  # the base's own code: only if asked
    out = Path(out).expanduser()
    if out.resolve() == src.path.resolve() or out.resolve() in src.path.resolve().parents:
        raise ValueError(f"--out {out} would overwrite the adapter {src.path}; pick another directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty; pass --overwrite or pick another")
    check_adapter_fits(src)
    tokenizer = adapter_tokenizer(src)

    model_cfg = dataclasses.replace(src.run.model, load_in_8bit=False, dtype=dtype)
    merged = load_adapted_model(src, model_cfg, torch.device("cpu")).merge_and_unload()
    merged.config.use_cache = True  # load_base switched it off for training; inference wants it
    if out.exists():
        shutil.rmtree(out)
    merged.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    return out

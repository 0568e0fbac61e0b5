"""Adapter checkpoints in PEFT's own layout (adapter_model.safetensors + adapter_config.json),
so plain ``peft.PeftModel.from_pretrained(base, dir)`` loads them. Main process writes only.
"""

from __future__ import annotations

from pathlib import Path


def save_adapter(accelerator, model, out_dir: Path, tokenizer=None) -> Path:
    """Save the LoRA weights (and the tokenizer, so the directory is usable on its own)."""
    out_dir = Path(out_dir)
    accelerator.wait_for_everyone()  # every rank finished the step whose weights we save
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out_dir, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    accelerator.wait_for_everyone()
    return out_dir

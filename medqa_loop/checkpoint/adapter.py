"""Adapters in PEFT's own layout (adapter_model.safetensors + adapter_config.json), so plain
``peft.PeftModel.from_pretrained(base, dir)`` loads them: saving one from the loop, and using one
with what it needs: the base it belongs to, its run's settings, its tokenizer.

Read by medqa_loop.generate and medqa_loop.export. An adapter directory written by the loop
(``<output_dir>/epoch-<n>`` or ``final``) sits next to the run's ``config.yaml``; from there we
take the prompt template and the base's loading settings (8-bit, dtype, outlier threshold), so the
adapter is used exactly as it was trained; never code (the mask and hooks it names are not imported,
and its model.trust_remote_code is replaced by the caller's). Any PEFT LoRA directory works too,
with the defaults.

Everything that can be wrong (missing directory, no weights, an adapter made for another base)
is checked from configs and tensor *shapes* only, before a single base weight is read.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from medqa_loop import hub
from medqa_loop.checkpoint.writer import IN_CALLER, CheckpointWriter, host_copy
from medqa_loop.config import Config, ModelConfig, load_config
from medqa_loop.model import check_model_source, load_base, load_tokenizer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix of every saved adapter tensor name


class AdapterError(ValueError):
    """The adapter directory is missing, incomplete, or does not fit the base. Names the paths."""


def adapter_weights(accelerator, model) -> dict[str, torch.Tensor]:
    """A host copy of the LoRA weights as they are now (the trainable parameters, under the model's
    state-dict names): what a write that happens later writes."""
    return {name: host_copy(p) for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}


def write_adapter(accelerator, model, weights: dict[str, torch.Tensor], out_dir: Path, tokenizer=None) -> None:
    """Write ``weights`` (adapter_weights) as an adapter directory, through PEFT's own save."""
    # The LoRA matrices only. PEFT's default ("auto") asks the hub for the base's config, to see
    # whether the vocabulary was resized, and adds the frozen embedding or lm_head weights when
    # one is a LoRA target; the project never resizes or trains them (no new tokens, no
    # modules_to_save), so they are the base's own.
    accelerator.unwrap_model(model).save_pretrained(
        out_dir, state_dict=weights, safe_serialization=True, save_embedding_layers=False
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def save_adapter(accelerator, model, out_dir: Path, tokenizer=None, writer: CheckpointWriter = IN_CALLER) -> Path:
    """Save the LoRA weights as they are now (and the tokenizer, so the directory is usable on its
    own): the main process writes, through ``writer`` (the loop's: in the background; by default
    at once)."""
    out_dir = Path(out_dir)
    if accelerator.is_main_process:
        weights = adapter_weights(accelerator, model)
        writer.submit("the adapter", out_dir, lambda: write_adapter(accelerator, model, weights, out_dir, tokenizer))
    return out_dir


@dataclass
class AdapterSource:
    path: Path
    base: str  # where the base is loaded from
    recorded_base: str | None  # adapter_config.json's base_model_name_or_path
    run: Config  # the run's config.yaml (but model.trust_remote_code), or the defaults when it has none


BEST = "best"


def save_best_adapter(
    accelerator, model, out: Path, tokenizer, step: int, eval_loss: float, writer: CheckpointWriter = IN_CALLER
) -> Path:
    """``<out>/best/``: the adapter with the lowest eval loss so far, with ``best.json`` ({step,
    eval_loss}) inside. Written beside it and swapped in by renames, so best/ is always a whole
    adapter: a crash between the two renames leaves it as ``.old-best``, put back by the next call.
    Through ``writer`` like save_adapter."""
    best, tmp, old = out / BEST, out / f".tmp-{BEST}", out / f".old-{BEST}"

    def write(weights: dict[str, torch.Tensor]) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not best.exists():
            old.rename(best)
        shutil.rmtree(old, ignore_errors=True)
        write_adapter(accelerator, model, weights, tmp, tokenizer)
        (tmp / "best.json").write_text(json.dumps({"step": step, "eval_loss": eval_loss}))
        if best.exists():
            best.rename(old)
        tmp.rename(best)
        shutil.rmtree(old, ignore_errors=True)

    if accelerator.is_main_process:
        weights = adapter_weights(accelerator, model)
        writer.submit("the best adapter", best, lambda: write(weights))
    return best


def resolve_adapter(path: str | Path, base: str | None = None, trust_remote_code: bool = False) -> AdapterSource:
    """Check the directory and work out its base: ``base`` if given; else the random-init base
    the run built (``<run>/base``); else the base named in ``adapter_config.json``. The base's
    repository code runs only with ``trust_remote_code`` (--trust-remote-code), whatever the
    run's config.yaml says. A base or tokenizer named on a hub that does not answer will load from
    local files (hub.use_local_files_if_unreachable)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise AdapterError(f"adapter directory not found: {path}")
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{path} has no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    recorded = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    run_file = path.parent / "config.yaml"
    # Read, never run: the directory may come from anyone, and the code its config.yaml names
    # (data.mask, debug.hooks) is imported only by training and debugging (medqa_loop.user_code).
    run = load_config(run_file) if run_file.is_file() else Config()
    # Nor may it turn on the base's own code (its base/ may come with it): only this command's user.
    run.model.trust_remote_code = trust_remote_code
    if base is None:
        if run_file.is_file() and run.model.random_init is not None:
            # train.py built this base under the run directory; the recorded path is relative
            # to wherever training was launched from, this one is not.
            base = str(path.parent / "base")
        elif recorded:
            base = recorded
        else:
            raise AdapterError(f"{path}/adapter_config.json names no base model; pass --base")
    hub.use_local_files_if_unreachable([base, run.model.tokenizer])
    return AdapterSource(path, base, recorded, run)


def check_adapter_fits(src: AdapterSource) -> None:
    """Raise AdapterError, naming both, when the adapter's LoRA shapes don't fit the base.

    The base is built on the meta device from its config alone (no weights, no memory), and each
    LoRA pair's shapes are read from the safetensors header: A is (r, in), B is (out, r). Without
    this, a mismatch surfaces as a torch size-mismatch traceback deep inside PEFT.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = src.run.model.trust_remote_code
    check_model_source(src.base, trust)
    config = AutoConfig.from_pretrained(src.base, trust_remote_code=trust)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    made_for = f" (its adapter_config.json names {src.recorded_base!r})" if src.recorded_base else ""
    adapted_layers = set()
    with safe_open(src.path / ADAPTER_WEIGHTS, framework="pt") as f:
        for key in f.keys():
            if (layer := re.search(r"\.layers\.(\d+)\.", key)) is not None:
                adapted_layers.add(int(layer.group(1)))
            module_name, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                continue
            try:
                module = skeleton.get_submodule(module_name)
            except AttributeError:
                raise AdapterError(
                    f"adapter {src.path} does not fit base {src.base!r}{made_for}: it adapts "
                    f"{module_name}, which that base (num_hidden_layers={config.num_hidden_layers}) "
                    "does not have. Pass the base it was trained on with --base."
                ) from None
            if not isinstance(module, torch.nn.Linear):
                continue
            shape = f.get_slice(key).get_shape()
            side, got, want = (
                ("inputs", shape[1], module.in_features) if kind == "A.weight"
                else ("outputs", shape[0], module.out_features)
            )
            if got != want:
                raise AdapterError(
                    f"adapter {src.path} does not fit base {src.base!r}{made_for}: {module_name} "
                    f"has {got} {side} in the adapter but {want} in the base (hidden size "
                    f"{config.hidden_size}). Pass the base it was trained on with --base."
                )
    # An adapter trained on a shallower base loads on a deeper one without a complaint from PEFT,
    # leaving its last layers unadapted. One meant for some layers only says so in its config.
    chosen = json.loads((src.path / "adapter_config.json").read_text()).get("layers_to_transform")
    if adapted_layers and chosen is None and len(adapted_layers) < config.num_hidden_layers:
        raise AdapterError(
            f"adapter {src.path} does not fit base {src.base!r}{made_for}: it adapts {len(adapted_layers)} "
            f"decoder layers, that base has num_hidden_layers={config.num_hidden_layers}. Pass the base it "
            "was trained on with --base."
        )


def adapter_tokenizer(src: AdapterSource):
    """The tokenizer saved with the adapter (the loop saves the one it trained with), else the
    run's tokenizer setting, else the base's."""
    saved = (src.path / "tokenizer_config.json").is_file()
    cfg = dataclasses.replace(
        src.run.model, name_or_path=src.base, tokenizer=str(src.path) if saved else src.run.model.tokenizer
    )
    return load_tokenizer(cfg)


def load_adapted_model(src: AdapterSource, model_cfg: ModelConfig, device: torch.device):
    """Base (via model.load_base, as in training) + the adapter, in eval mode."""
    from peft import PeftModel

    base = load_base(model_cfg, src.base, device)
    return PeftModel.from_pretrained(base, src.path).eval()

"""Model: tokenizer, the 8-bit base, LoRA adapters, gradient checkpointing, LoRA names.

Deliberately *not* ``peft.prepare_model_for_kbit_training``: it up-casts every non-int8 weight
(embeddings, norms, lm_head) to fp32 and so costs GBs on a 7B base (peft#1149). The frozen base
keeps ``model.dtype``; only the LoRA matrices train.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from medqa_loop.kernels import attention
from medqa_loop.kernels.patch import uses_target_loss
from medqa_loop.losses import weighted_loss_sum
from medqa_loop.batching import Batch
from medqa_loop.config import EMBEDDED_TOKENIZER, LoraSettings, ModelConfig
from medqa_loop.hub import looks_local

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """Model or tokenizer cannot be found or loaded; raised before any weights are read."""


def embedded_tokenizer_file() -> Path:
    """The real Mistral-7B v0.1 sentencepiece model (32,000 tokens) shipped by mistral-common."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def _hub_error(what: str, name: str, e: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load {what} {name!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
        "Not a local directory and the hub is unreachable? Pass a local path."
    )


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer with EOS as pad (the recipe's choice). Errors name the source."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    if source == EMBEDDED_TOKENIZER:
        # transformers reads a bare sentencepiece model only from a directory named for it.
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(embedded_tokenizer_file(), Path(tmp) / "tokenizer.model")
            tok = AutoTokenizer.from_pretrained(tmp)
    else:
        if looks_local(source) and not Path(source).expanduser().is_dir():
            raise ModelLoadError(f"tokenizer path not found: {source}")
        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        except OSError as e:
            raise _hub_error("tokenizer", source, e) from e
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer {source!r} has no EOS token; answers could never end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_random_base(cfg: ModelConfig, tokenizer, out_dir: Path, seed: int) -> Path:
    """Save a random-init Mistral (``model.random_init`` fields) so it loads like a real base.

    Going through save + from_pretrained means the 8-bit quantization and every other step of
    the user's path runs for the tiny test model and the 7B benchmark model alike.
    """
    from transformers import MistralConfig, MistralForCausalLM

    fields = {"vocab_size": len(tokenizer), **cfg.random_init}
    fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**fields)).to(DTYPES[cfg.dtype])
    model.save_pretrained(out_dir)  # safetensors
    return out_dir


def check_model_source(name: str, trust_remote_code: bool = False):
    """The model's config, read alone: a wrong path or unreachable hub fails before weights load."""
    from transformers import AutoConfig

    if looks_local(name) and not (Path(name).expanduser() / "config.json").is_file():
        raise ModelLoadError(f"model path {name} is not a model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _hub_error("model", name, e) from e


def check_lora_targets(model_config, targets: list[str], trust_remote_code: bool = False) -> None:
    """Every name in ``lora.target_modules`` must match a linear module of the architecture (as
    PEFT matches a list: the whole name or its last dotted parts), read from the model's config on
    the meta device: a typo fails in seconds, not after the base is loaded."""
    from transformers import AutoModelForCausalLM

    from medqa_loop.config import ConfigError

    if targets == ["all-linear"]:
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    linear = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in targets:
        if not any(n == target or n.endswith(f".{target}") for n in linear):
            known = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise ConfigError(
                f"config key 'lora.target_modules': {target!r} names no linear module of "
                f"{model_config.model_type} (its linear modules: {', '.join(known)})"
            )


def load_base(cfg: ModelConfig, source: str, device: torch.device):
    """The frozen base, int8 through bitsandbytes when ``load_in_8bit`` (lm_head kept as is)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if cfg.load_in_8bit:
        quant = BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=cfg.llm_int8_threshold,
            # The output projection stays in model.dtype: int8 logits hurt, and it is frozen.
            llm_int8_skip_modules=["lm_head"],
        )
    if cfg.attn_implementation == attention.NAME:
        from medqa_loop.kernels.patch import register_varlen_attention

        register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(
        source,
        quantization_config=quant,
        dtype=DTYPES[cfg.dtype],
        attn_implementation=cfg.attn_implementation,
        # 8-bit weights are quantized as they are placed, so the placement must be given here.
        device_map={"": device},
        trust_remote_code=cfg.trust_remote_code,
    )
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if cfg.load_in_8bit and cfg.int8_matmul == "dequant":
        from medqa_loop.kernels.patch import use_dequant_matmul

        use_dequant_matmul(model)
    return model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers' GradientCheckpointingLayer instances), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointing(model, layers: int) -> None:
    """Non-reentrant activation checkpointing on the first ``layers`` decoder layers (0: none; all
    of them: the usual full checkpointing). Non-reentrant works with frozen inputs (no
    enable_input_require_grads hack) and with no_sync/DDP. Checkpointing fewer layers keeps
    more activations and recomputes less: the memory plan (medqa_loop.memory) picks the number.
    Newer transformers renamed the method (5.17 has only the old name, later 5.x warn on it)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers switches every layer on; each layer reads its own flag.
    for i, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = i < layers


def add_lora(model, lora: LoraSettings, checkpoint_layers: int, fused_ops: bool = False):
    """Freeze the base and wrap it with trainable LoRA adapters (PEFT), activation checkpointing
    on its first ``checkpoint_layers`` decoder layers; with ``fused_ops`` run LoRA linears, norms,
    MLPs and the rotary embedding through medqa_loop.kernels."""
    from peft import LoraConfig, get_peft_model

    if checkpoint_layers > 0:
        set_checkpointing(model, checkpoint_layers)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )
    model = get_peft_model(model, config)
    if fused_ops:
        from medqa_loop.kernels.patch import use_fused_ops

        use_fused_ops(model)
    return model


def is_int8_linear(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear8bitLt) and module.weight.dtype == torch.int8


def _model_inputs(batch: Batch) -> dict:
    if "position_ids" in batch:  # packed: pairs are separated by position restarts (sdpa, eager,
        # flex build a block-diagonal mask from them) and by cu_seq_lens (varlen reads these)
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], **attention.varlen_kwargs(batch)}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def model_logits(model, batch: Batch) -> torch.Tensor:
    """Logits of a padded or packed batch (batching.collate makes both)."""
    return model(**_model_inputs(batch)).logits


def model_loss_sum(model, batch: Batch) -> torch.Tensor:
    """Sum of the weighted token losses of a batch (no normalisation: the loop divides once).

    With the fused loss head (``model.fused_ops``; medqa_loop.kernels.patch) the model computes
    it from its final hidden states at the target positions alone; otherwise it comes from every
    position's logits (losses.weighted_loss_sum). The same sum: tests/kernels/test_loss_head.py.
    """
    if not uses_target_loss(model):
        return weighted_loss_sum(model_logits(model, batch), batch["labels"], batch["loss_weights"])
    targets = {k: batch[k] for k in ("target_positions", "targets", "target_weights")}
    return model(**_model_inputs(batch), **targets).loss


def module_name(name: str) -> str:
    """'base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight' -> 'layers.0.mlp.up_proj.lora_A':
    a LoRA matrix, or an 8-bit layer, named without PEFT's wrapper and adapter name."""
    parts = name.split(".")
    while parts and parts[0] in ("module", "base_model", "model"):  # DDP, PEFT and HF wrappers
        parts = parts[1:]
    if parts and parts[-1] == "weight":
        parts.pop()
    if len(parts) >= 2 and parts[-2].startswith("lora_"):
        parts.pop()  # PEFT's adapter name ("default")
    if parts and parts[-1] == "base_layer":
        parts.pop()
    return ".".join(parts)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters (the LoRA matrices) by module name, in model order."""
    return {module_name(n): p for n, p in model.named_parameters() if p.requires_grad}

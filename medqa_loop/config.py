"""Typed run configuration: YAML file + ``--set key.sub=value`` overrides, validated on load.

Everything here runs before any model or dataset is touched, so a typo in a key, a wrong type
or an impossible value costs seconds, not a 7B model load. Errors always name the dotted key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key, type or value is wrong. The message names the dotted key."""


# The bundled Mistral-7B sentencepiece tokenizer (shipped inside the `mistral-common` package).
EMBEDDED_TOKENIZER = "mistral-common"
# The small medical QA sample shipped inside this package (medqa_loop/assets/).
EMBEDDED_DATASET = "embedded:sample_medqa"
# The shipped configs, by name (``--config tiny``): the repository's top-level configs/, which
# the package holds as configs/ (a link in the source tree, the files themselves in a wheel).
PRESETS = Path(__file__).parent / "configs"

# The dtypes a model can be loaded, trained or exported in, by name.
DTYPE_NAMES = ("bfloat16", "float16", "float32")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    # Hub name or local directory of a transformers causal LM.
    name_or_path: str = "alecocc/mistral-7B-SFT-medqa-graph-cot"
    # Hub name / directory of the tokenizer; None = same as the model; "mistral-common" = the
    # real Mistral-7B tokenizer bundled in the mistral-common package (works offline).
    tokenizer: str | None = None
    # MistralConfig fields for a random-init base (tests, offline demo, GPU benchmarks). When set,
    # the model is built, saved under <output_dir>/base and then loaded like any user model.
    random_init: dict | None = None
    load_in_8bit: bool = True
    # LLM.int8 outlier threshold (bitsandbytes' default 6.0; 0 disables the fp16 outlier path).
    llm_int8_threshold: float = 6.0
    # How the int8 base multiplies: "dequant" keeps bitsandbytes' int8 weights and dequantizes
    # them per matmul (medqa_loop.kernels: DequantLinear; fast, weight-only rounding); "bnb" is bitsandbytes'
    # LLM.int8 matmul (int8 activations too, outlier split at llm_int8_threshold).
    int8_matmul: str = "dequant"
    # dtype of the frozen non-int8 parts (norms, embeddings, lm_head) and of the activations.
    # The recipe ran fp32; bf16 halves activation memory and matmul time (LoRA weights stay fp32).
    dtype: str = "bfloat16"
    # Activation checkpointing: "auto" = the memory plan (medqa_loop.memory) checkpoints the
    # fewest decoder layers with which the run fits the GPU's free memory (on the CPU: all of
    # them); true = every layer, false = none, N = the first N layers.
    gradient_checkpointing: bool | int | str = "auto"
    # The most GPU memory (GB) the memory plan may plan for, when less than the GPU has free: to
    # leave room for other work, or to plan as for a smaller GPU. null: the free memory.
    memory_limit_gb: float | None = None
    # transformers attention kernel: "varlen" (FlashAttention over each packed pair alone,
    # medqa_loop.kernels.attention; padded batches use SDPA), "sdpa" (PyTorch's fused attention; packed
    # rows get a block-diagonal mask, computed in full), "eager", or "flex_attention" (compiled).
    attn_implementation: str = "varlen"
    # Each decoder layer as fused autograd nodes (LoRA linears, RMSNorm, SwiGLU, rotary) that keep
    # less for backward, and the loss head over the target positions (medqa_loop.kernels): the
    # same maths, ~3x less activation memory than PEFT's and transformers' modules uncheckpointed.
    fused_ops: bool = True
    # Each packed training micro-batch's forward and backward (and each evaluation micro-batch's
    # forward) replayed as one CUDA graph (medqa_loop.kernels.graphs): the CPU's ~0.3 s a
    # micro-batch becomes one launch, so small rows run at the GPU's pace. Rows are padded to a
    # multiple of 512 tokens (no loss there).
    # "auto" = on CUDA with fused_ops, varlen attention in bf16/fp16, packing into rows of up to
    # 4096 tokens, one process, debug mode off; true = at any row size, an error where it cannot run.
    cuda_graphs: bool | str = "auto"
    # Mistral is native to transformers: running code from the hub is opt-in only.
    trust_remote_code: bool = False


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class DataConfig:
    # Hub dataset name, a local file (.parquet/.jsonl/.json/.csv), a `datasets.save_to_disk`
    # directory, or "embedded:sample_medqa" (the sample bundled with this package).
    dataset: str = "thesven/SyntheticMedicalQA-4336"
    split: str = "train"
    question_column: str = "question"
    answer_column: str = "response"
    # Fraction held out for validation (the recipe's train_test_split(test_size=0.2)).
    val_fraction: float = 0.2
    max_length: int = 1024
    prompt_template: str = "### Question:\n{input_text}\n\n### Answer:\n"
    # Name of a registered loss mask (medqa_loop.masking): "completion_only" trains on the answer
    # and EOS; "full_sequence" is the original recipe's loss on every token (padding excluded);
    # "prompt_weighted" adds the prompt at weight 0.1. Or a mask by import path, package.module:fn.
    mask: str = "completion_only"
    # Use only the first N rows (after loading, before the split); None = all.
    max_rows: int | None = None
    # How a window's pairs become micro-batches (medqa_loop.batching.arrange_window): "pack" packs
    # them into rows of up to pack_tokens tokens with no attention across pairs (no padding);
    # "group_by_length" pads batches of similar-length pairs; "pad" pads batches as drawn.
    # The pairs of each optimizer step, and so the update, are the same in all three.
    batching: str = "pack"
    # The longest packed row, in tokens, for training and evaluation. "auto" = the memory plan's
    # choice (medqa_loop.memory.plan): the row size whose plan (checkpointed layers, CUDA graphs)
    # it expects to run fastest on this GPU; 16384 (a whole window of the recipe a row) on the CPU.
    pack_tokens: int | str = "auto"
    # A row with a missing, null, empty or non-string text, or a prompt that alone fills
    # max_length: "error" stops with the row and column named; "skip" leaves it out, counted and
    # listed at the end of data loading and in metrics.jsonl.
    bad_rows: str = "error"
    # Drop the repeats of a pair (the same question and answer, outer whitespace aside) before
    # the split, keeping the first. Off: they stay, and the validation pairs that repeat a
    # training pair are counted (data_val_duplicates in metrics.jsonl) and reported at load.
    dedupe: bool = False


@dataclass
class TrainConfig:
    epochs: int = 3
    # Optional cap on optimizer steps; the run stops (and saves final/) when reached.
    max_steps: int | None = None
    micro_batch_size: int = 1
    grad_accum_steps: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_grad_norm: float = 0.3
    eval_every: int = 50
    # Cap on validation micro-batches per evaluation; None = the whole validation split.
    eval_max_batches: int | None = None
    eval_batch_size: int = 4
    # Batches of the 2-batch sanity eval run before the first step (0 disables it).
    sanity_eval_batches: int = 2
    # After each evaluation, answer the first N validation questions greedily and append
    # (step, question, reference, generated) to <output_dir>/samples.jsonl; 0 = off.
    sample_questions: int = 0
    # Length cap of those answers, in tokens.
    sample_max_new_tokens: int = 128
    # Optimizer steps between full training states (medqa_loop.checkpoint.state: adapter, optimizer, RNGs,
    # position) under <output_dir>/state/, for --resume. One is also saved at each epoch end and
    # at the last step; None = only then.
    save_every: int | None = 50
    # Training states kept on disk (the newest ones); each holds the adapter and 2x its size of
    # AdamW moments.
    keep_states: int = 2
    # Optimizer steps to record with torch.profiler (CPU and GPU activity): a Chrome trace and an
    # op table per step under <output_dir>/profile/ (medqa_loop.debug.profiling). Recorded steps run
    # slower; the others are untouched.
    profile_steps: list[int] = field(default_factory=list)
    # A step whose loss or gradient norm is not finite: "stop" (no update; save the state of the
    # last good step; exit non-zero) or "skip" (drop that step's update, count it in metrics.jsonl).
    nan_policy: str = "stop"
    # Stop after this many evaluations in a row without a new lowest eval loss (best/ holds the
    # adapter with the lowest); None = never.
    early_stopping_patience: int | None = None
    # Experiment trackers, through Accelerate (medqa_loop.trackers): any of tensorboard, wandb,
    # mlflow, trackio, ... ; [] = none (metrics.jsonl is always written).
    report_to: list[str] = field(default_factory=list)


@dataclass
class DebugConfig:
    # Gradient debugging (medqa_loop.debug.trace): trace, NaN/inf guard, pause hooks, snapshots.
    # Off by default: its hooks cost a little on every step.
    enabled: bool = False
    # Write a <output_dir>/grad_trace.jsonl line on steps 1, 1+every, 1+2*every, ... (1 = all).
    every: int = 1
    # Per traced step, each micro-batch's rows, loss and gradient contribution (costs a copy of
    # the LoRA gradients per micro-batch on traced steps only).
    attribution: bool = True
    # Optimizer steps after whose backward (before clipping) every hook in `hooks` is called.
    pause_at: list[int] = field(default_factory=list)
    # Hooks by import path, called as fn(step, model, batches); the default opens pdb.
    hooks: list[str] = field(default_factory=lambda: ["medqa_loop.debug.trace:pdb_hook"])
    # Steps whose starting state (adapter, optimizer, RNG, window, gradients) is saved under
    # <output_dir>/debug/step-<N>/ so that `medqa replay` can recompute them.
    snapshot_steps: list[int] = field(default_factory=list)


@dataclass
class Config:
    output_dir: str = "runs/recipe"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building a Config from nested dicts, strictly.


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` coerced to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner:  # in the order the annotation lists them
            try:
                return _check_type(value, candidate, key)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
        raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # YAML reads "1" as int; a float key accepts it
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    plain = origin or tp
    # bool is an int in Python; never let `true` pass as an int or `1` as a bool.
    if isinstance(value, plain) and not (plain is int and isinstance(value, bool)):
        return value
    if plain is float and isinstance(value, str):
        try:  # PyYAML reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    raise ConfigError(
        f"config key '{key}' must be {getattr(plain, '__name__', plain)}, got {value!r}"
    )


def _build(cls: type, raw: dict, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            hint = _typo_hint(key, names)
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name in names & raw.keys():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(raw[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def _typo_hint(key: str, names: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(names))})"


def _validate(cfg: Config) -> None:
    from medqa_loop.masking import check_mask

    t, d, m, lo = cfg.train, cfg.data, cfg.model, cfg.lora
    # (rule as the error states it, its test, the keys it applies to)
    bounds = (
        ("> 0", lambda v: v > 0, {
            "train.epochs": t.epochs,
            "train.micro_batch_size": t.micro_batch_size,
            "train.grad_accum_steps": t.grad_accum_steps,
            "train.eval_every": t.eval_every,
            "train.eval_batch_size": t.eval_batch_size,
            "train.keep_states": t.keep_states,
            "data.max_length": d.max_length,
            "lora.r": lo.r,
            "lora.alpha": lo.alpha,
            "train.lr": t.lr,
            "train.sample_max_new_tokens": t.sample_max_new_tokens,
        }),
        ("> 0 or null", lambda v: v is None or v > 0, {
            "train.max_steps": t.max_steps,
            "train.eval_max_batches": t.eval_max_batches,
            "train.early_stopping_patience": t.early_stopping_patience,
            "train.save_every": t.save_every,
            "data.max_rows": d.max_rows,
        }),
        (">= 0", lambda v: v >= 0, {
            "train.weight_decay": t.weight_decay,
            "train.warmup_steps": t.warmup_steps,
            "train.max_grad_norm": t.max_grad_norm,
            "train.sanity_eval_batches": t.sanity_eval_batches,
            "train.sample_questions": t.sample_questions,
            "model.llm_int8_threshold": m.llm_int8_threshold,
        }),
    )
    for rule, holds, values in bounds:
        for key, value in values.items():
            if not holds(value):
                raise ConfigError(f"config key '{key}' must be {rule}, got {value!r}")
    if any(s <= 0 for s in t.profile_steps):
        raise ConfigError(f"config key 'train.profile_steps' holds optimizer steps, counted from 1: {t.profile_steps!r}")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction' must be in (0, 1), got {d.val_fraction!r}")
    if not 0.0 <= lo.dropout < 1.0:
        raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {lo.dropout!r}")
    if not lo.target_modules:
        raise ConfigError("config key 'lora.target_modules' must name at least one module")
    for key, value, allowed in (
        ("data.bad_rows", d.bad_rows, ("error", "skip")),
        ("data.batching", d.batching, ("pack", "group_by_length", "pad")),
        ("model.int8_matmul", m.int8_matmul, ("dequant", "bnb")),
        ("model.attn_implementation", m.attn_implementation, ("varlen", "sdpa", "eager", "flex_attention")),
        ("model.dtype", m.dtype, DTYPE_NAMES),
        ("train.nan_policy", t.nan_policy, ("stop", "skip")),
    ):
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {value!r}")
    from medqa_loop.trackers import check_trackers

    check_trackers(t.report_to)  # known names (whether installed: when training starts)
    gc = m.gradient_checkpointing
    if isinstance(gc, str) and gc != "auto" or isinstance(gc, int) and not isinstance(gc, bool) and gc < 0:
        raise ConfigError(
            f"config key 'model.gradient_checkpointing' must be auto, true, false or a number of layers >= 0; got {gc!r}"
        )
    if m.cuda_graphs not in ("auto", True, False):
        raise ConfigError(f"config key 'model.cuda_graphs' must be auto, true or false; got {m.cuda_graphs!r}")
    if m.cuda_graphs is True:
        from medqa_loop.kernels.graphs import use_graphs

        use_graphs(cfg)  # what the config alone rules out; the device and processes when the run starts
    if m.memory_limit_gb is not None and (
        isinstance(m.memory_limit_gb, bool) or not isinstance(m.memory_limit_gb, (int, float)) or m.memory_limit_gb <= 0
    ):
        raise ConfigError(f"config key 'model.memory_limit_gb' must be a number of GB > 0 or null; got {m.memory_limit_gb!r}")
    if d.pack_tokens != "auto" and (isinstance(d.pack_tokens, bool) or not isinstance(d.pack_tokens, int) or d.pack_tokens <= 0):
        raise ConfigError(f"config key 'data.pack_tokens' must be auto or a number of tokens > 0; got {d.pack_tokens!r}")
    if d.batching == "pack" and d.pack_tokens != "auto" and d.pack_tokens < d.max_length:
        raise ConfigError(
            f"config key 'data.pack_tokens' ({d.pack_tokens}) must be >= data.max_length "
            f"({d.max_length}) so that every pair fits a row"
        )
    check_mask(d.mask)  # its form: a mask by import path is imported when training tokenizes
    _validate_debug(cfg.debug)
    _validate_template(d.prompt_template)
    if m.random_init is not None:
        from transformers import MistralConfig

        known = set(MistralConfig().to_dict())
        for key in m.random_init:
            if key not in known:
                raise ConfigError(
                    f"unknown config key 'model.random_init.{key}' (not a MistralConfig field)"
                )


def _validate_template(template: str) -> None:
    """data.prompt_template is filled by str.format with the question as its only field."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # a lone "{" or "}"
        raise ConfigError(
            f"config key 'data.prompt_template': {e}; write a literal brace doubled, {{{{ or }}}}"
        ) from None
    fields = [(name, conversion, spec) for _, name, spec, conversion in parsed if name is not None]
    others = [
        "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        for name, conversion, spec in fields
        if (name, conversion, spec) != ("input_text", None, "")
    ]
    if others:
        raise ConfigError(
            f"config key 'data.prompt_template' may hold no field but {{input_text}}, got "
            f"{', '.join(others)}; write a literal brace doubled, {{{{ or }}}}"
        )
    if not fields:
        raise ConfigError("config key 'data.prompt_template' must contain '{input_text}'")


def _validate_debug(g: DebugConfig) -> None:
    from medqa_loop.user_code import check_import_path

    if g.every <= 0:
        raise ConfigError(f"config key 'debug.every' must be > 0, got {g.every!r}")
    for key in ("pause_at", "snapshot_steps"):
        steps = getattr(g, key)
        if any(s <= 0 for s in steps):
            raise ConfigError(f"config key 'debug.{key}' holds optimizer steps, counted from 1: {steps!r}")
        if steps and not g.enabled:
            raise ConfigError(f"config key 'debug.{key}' is set but debug.enabled is false")
    for i, spec in enumerate(g.hooks):  # their form: imported when a debugger pauses (debug.trace)
        check_import_path(spec, f"debug.hooks[{i}]")


# ---------------------------------------------------------------------------------------------
# Public entry points.


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys: {"train": {"lr": 1}} -> {"train.lr": 1}; an empty section
    stays a value. What a resume compares and what the trackers record."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4). The value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key.sub=value, got {item!r}")
    key, _, text = item.partition("=")
    if not key.strip():
        raise ConfigError(f"--set expects key.sub=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"--set {item}: the value is not valid YAML ({problem}); to pass it as text, quote it: "
            f"--set '{key.strip()}=\"...\"'"
        ) from None
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each dotted key in the nested dict; structure errors name the key."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{'.'.join(path[: i + 1])}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


# Keys that moved: a config (or an older run's config.yaml) that sets the old one gets it moved.
MOVED = {("debug", "nan_policy"): ("train", "nan_policy")}


def _move_renamed(raw: dict) -> dict:
    for (old_section, old), (new_section, new) in MOVED.items():
        section = raw.get(old_section)
        if isinstance(section, dict) and old in section:
            value = section.pop(old)
            target = raw.setdefault(new_section, {})
            if isinstance(target, dict):
                target.setdefault(new, value)
    return raw


def config_from_dict(raw: dict) -> Config:
    cfg = _build(Config, _move_renamed(raw or {}), "")
    _validate(cfg)
    return cfg


def presets() -> dict[str, Path]:
    """The shipped configs by name: {"recipe": .../recipe.yaml, "tiny": .../tiny.yaml}."""
    return {p.stem: p for p in sorted(PRESETS.glob("*.yaml"))}


def config_path(name_or_path: str | Path) -> Path:
    """A config file: the path if it is one, else the shipped preset of that name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = presets()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise ConfigError(
        f"config file not found: {name_or_path} (and no shipped preset of that name: {', '.join(shipped)})"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, by path or by preset name (None = the original recipe's defaults),
    apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = config_path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    try:
        return config_from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{e}{_where(str(e), path, overrides or [])}") from None


def _where(message: str, path: Path | None, overrides: list[str]) -> str:
    """Where the key a ConfigError names was set: the --set that set it, else the file."""
    if message.startswith("--set "):  # a --set that cannot be parsed names itself
        return ""
    named = re.search(r"config key '([^'\[]+)", message)
    if named is not None:
        key = named.group(1)
        for item in reversed(overrides):  # the last --set of a key wins
            set_key = item.partition("=")[0].strip()
            if key == set_key or key.startswith(f"{set_key}.") or set_key.startswith(f"{key}."):
                return f" (from --set {item})"
    return f" (in {path})" if path is not None else ""

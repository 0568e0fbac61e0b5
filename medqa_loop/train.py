"""Entry point: ``accelerate launch -m medqa_loop.train [--config FILE] [--set key.sub=value ...]``.

Order matters: everything that can be wrong in the config, the data or the paths is checked
before the base model's weights are read, so a typo costs seconds, not a 7B load.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml

from medqa_loop.config import Config, ConfigError, load_config
from medqa_loop.data import DataError, collate, encode_pairs, load_pairs, split_pairs
from medqa_loop.masking import resolve_mask
from medqa_loop.model import ModelLoadError

RUN_MARKERS = ("metrics.jsonl", "config.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medqa_loop.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config (default: the original recipe)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=2e-4 (repeatable; value parsed as YAML)",
    )
    p.add_argument(
        "--overwrite", action="store_true",
        help="reuse an output_dir that holds an earlier run (its metrics and checkpoints go)",
    )
    return p.parse_args(argv)


def prepare_output_dir(cfg: Config, overwrite: bool) -> Path:
    out = Path(cfg.output_dir)
    if any((out / m).exists() for m in RUN_MARKERS):
        if not overwrite:
            raise ConfigError(
                f"output_dir {out} holds another run; pass --overwrite or set output_dir"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Parts:
    """Everything the loop is handed, built in the order that fails fastest."""

    accelerator: object
    tokenizer: object
    model: object
    optimizer: object
    train_examples: list[dict]
    val_examples: list[dict]
    collate_fn: object
    out: Path


def build_parts(cfg: Config, overwrite: bool = False) -> Parts:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from medqa_loop import model as M
    from medqa_loop.optim import build_optimizer

    accelerator = Accelerator()
    mask_fn = resolve_mask(cfg.data.mask)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        prepare_output_dir(cfg, overwrite)
    accelerator.wait_for_everyone()

    # Tokenizer and data first: cheap, and where most mistakes show.
    tokenizer = M.load_tokenizer(cfg.model)
    train_pairs, val_pairs = split_pairs(load_pairs(cfg.data), cfg.data.val_fraction, cfg.seed)
    train_set = encode_pairs(train_pairs, tokenizer, cfg.data, mask_fn)
    val_set = encode_pairs(val_pairs, tokenizer, cfg.data, mask_fn)
    accelerator.print(
        f"data: {len(train_pairs)} train / {len(val_pairs)} validation pairs from "
        f"{cfg.data.dataset}; {train_set.truncated + val_set.truncated} answers truncated "
        f"at {cfg.data.max_length} tokens"
    )

    source = cfg.model.name_or_path
    if cfg.model.random_init is not None:
        source = str(out / "base")
        if accelerator.is_main_process:
            M.build_random_base(cfg.model, tokenizer, Path(source), cfg.seed)
        accelerator.wait_for_everyone()
    M.check_model_source(source, cfg.model.trust_remote_code)

    set_seed(cfg.seed)  # LoRA init and dropout draw from here on
    base = M.load_base(cfg.model, source, accelerator.device)
    model = M.add_lora(base, cfg.lora, cfg.model.gradient_checkpointing)
    if accelerator.is_main_process:
        model.print_trainable_parameters()
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Parts(
        accelerator, tokenizer, model, optimizer, train_set.examples, val_set.examples,
        partial(collate, pad_id=tokenizer.pad_token_id), out,
    )


def run(cfg: Config, overwrite: bool = False) -> dict:
    from medqa_loop.checkpoint import save_adapter
    from medqa_loop.debug import build_debugger
    from medqa_loop.loop import train
    from medqa_loop.metrics import MetricsLog

    p = build_parts(cfg, overwrite)
    last = train(
        cfg,
        p.accelerator,
        p.model,
        p.optimizer,
        p.train_examples,
        p.val_examples,
        p.collate_fn,
        lambda name: save_adapter(p.accelerator, p.model, p.out / name, p.tokenizer),
        MetricsLog(p.out / "metrics.jsonl", enabled=p.accelerator.is_main_process),
        build_debugger(cfg, p.accelerator, p.model, p.optimizer, p.out),
    )
    p.accelerator.print(f"done: {last}; adapter in {p.out / 'final'}")
    return last


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        run(cfg, overwrite=args.overwrite)
    except (ConfigError, DataError, ModelLoadError, ValueError) as e:
        print(f"medqa_loop: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

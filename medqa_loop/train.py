"""Entry point: ``accelerate launch -m medqa_loop.train [--config FILE] [--set key.sub=value ...]``.

Order matters: everything that can be wrong in the config, the data or the paths is checked
before the base model's weights are read, so a typo costs seconds, not a 7B load.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import yaml

from medqa_loop.config import Config, ConfigError, load_config
from medqa_loop.data import (
    DataError, Pairs, collate, encode_pairs, load_pairs, split_pairs, summarize_data,
)
from medqa_loop.masking import resolve_mask
from medqa_loop.model import ModelLoadError
from medqa_loop.state import Interrupted, Position

RUN_MARKERS = ("metrics.jsonl", "config.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medqa_loop.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config (default: the original recipe)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=2e-4 (repeatable; value parsed as YAML)",
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--overwrite", action="store_true",
        help="reuse an output_dir that holds an earlier run (its metrics and checkpoints go)",
    )
    start.add_argument(
        "--resume", metavar="auto|PATH",
        help="continue from a training state: 'auto' = the newest good one in output_dir/state "
        "(a new run if there is none), or a state directory such as runs/x/state/step-200",
    )
    p.add_argument(
        "--force-resume", action="store_true",
        help="resume even though the config or data differ in what changes the result",
    )
    args = p.parse_args(argv)
    if args.force_resume and not args.resume:
        p.error("--force-resume needs --resume")
    return args


def prepare_output_dir(cfg: Config, overwrite: bool, resume_from: Path | None = None) -> Path:
    out = Path(cfg.output_dir)
    # Resuming from one of its own states is how a run directory is continued.
    continuing = resume_from is not None and out.resolve() in Path(resume_from).resolve().parents
    if not continuing and any((out / m).exists() for m in RUN_MARKERS):
        if not overwrite:
            raise ConfigError(
                f"output_dir {out} holds another run; pass --overwrite, set output_dir, or "
                "continue it with --resume auto"
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
    val_pairs: Pairs  # the texts behind val_examples (questions and references to sample)
    start: Position = Position()  # where a resumed run stands
    data_stats: dict = field(default_factory=dict)  # pairs, skipped and truncated rows


def build_parts(
    cfg: Config, overwrite: bool = False, resume: str | None = None, force_resume: bool = False
) -> Parts:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from medqa_loop import model as M
    from medqa_loop.distributed import check_processes
    from medqa_loop import state as S
    from medqa_loop.optim import build_optimizer

    accelerator = Accelerator()
    accelerator.print(check_processes(accelerator))
    mask_fn = resolve_mask(cfg.data.mask)
    out = Path(cfg.output_dir)
    say, world, resume_from = accelerator.print, accelerator.num_processes, None
    if resume:  # the state's files and config are checked before anything is loaded
        resume_from = S.find_state(out, resume, say)
        if resume_from is not None:
            S.check_config(resume_from, cfg, world, force_resume, say)
    if accelerator.is_main_process:
        prepare_output_dir(cfg, overwrite, resume_from)
    accelerator.wait_for_everyone()

    # Tokenizer and data first: cheap, and where most mistakes show.
    tokenizer = M.load_tokenizer(cfg.model)
    pairs = load_pairs(cfg.data)
    train_pairs, val_pairs = split_pairs(pairs, cfg.data.val_fraction, cfg.seed)
    train_set = encode_pairs(train_pairs, tokenizer, cfg.data, mask_fn)
    val_set = encode_pairs(val_pairs, tokenizer, cfg.data, mask_fn)
    data_stats = summarize_data(cfg.data, pairs, train_set, val_set, say)
    if resume_from is not None:
        S.check_examples(resume_from, train_set.examples, force_resume, say)

    source = cfg.model.name_or_path
    if cfg.model.random_init is not None:
        source = str(out / "base")
        if accelerator.is_main_process:
            M.build_random_base(cfg.model, tokenizer, Path(source), cfg.seed)
        accelerator.wait_for_everyone()
    M.check_model_source(source, cfg.model.trust_remote_code)

    set_seed(cfg.seed)  # LoRA init and dropout draw from here on
    base = M.load_base(cfg.model, source, accelerator.device)
    model = M.add_lora(base, cfg.lora, cfg.model.gradient_checkpointing, cfg.model.fused_ops)
    if accelerator.is_main_process:
        model.print_trainable_parameters()
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = S.restore(resume_from, accelerator, model, out) if resume_from else Position()
    return Parts(
        accelerator, tokenizer, model, optimizer, train_set.examples, val_set.examples,
        partial(collate, pad_id=tokenizer.pad_token_id, packed=cfg.data.batching == "pack"), out,
        val_pairs, start, data_stats,
    )


def run(
    cfg: Config, overwrite: bool = False, resume: str | None = None, force_resume: bool = False
) -> dict:
    from medqa_loop.checkpoint import save_adapter
    from medqa_loop.generate import eval_sampler
    from medqa_loop.debug import build_debugger
    from medqa_loop.loop import train
    from medqa_loop.metrics import MetricsLog
    from medqa_loop.profiling import StepProfiler
    from medqa_loop.state import StateSaver, examples_digest

    p = build_parts(cfg, overwrite, resume, force_resume)
    log = MetricsLog(p.out / "metrics.jsonl", enabled=p.accelerator.is_main_process)
    if p.start.step == 0:  # a resumed run's metrics.jsonl has it already
        log.write(step=0, **p.data_stats)
    saver = StateSaver(cfg, p.accelerator, p.model, examples_digest(p.train_examples))
    rank = p.accelerator.process_index if p.accelerator.num_processes > 1 else None
    profiler = StepProfiler(cfg.train.profile_steps, p.out / "profile", rank)

    def after_step(step: int, *position) -> None:
        profiler.stop(step)  # before the state save: a recording holds its step only
        saver.after_step(step, *position)
        profiler.start(step + 1)

    # What exists now (the model's modules, every example's token lists) lives as long as the
    # run. Frozen, Python's cyclic collector no longer walks it in each full collection, which
    # the many short-lived objects of a step's autograd trigger every few steps: 2% of a 7B
    # step's wall time on the H100 host (BENCHMARKS.md, run O).
    gc.collect()
    gc.freeze()
    profiler.start(p.start.step + 1)
    try:
        with saver.stop_on_signals():
            last = train(
                cfg,
                p.accelerator,
                p.model,
                p.optimizer,
                p.train_examples,
                p.val_examples,
                p.collate_fn,
                lambda name: save_adapter(p.accelerator, p.model, p.out / name, p.tokenizer),
                log,
                sample_answers=eval_sampler(
                    cfg, p.accelerator, p.model, p.tokenizer, p.val_pairs, p.out / "samples.jsonl"
                ),
                start=p.start,
                after_step=after_step,
                debugger=build_debugger(cfg, p.accelerator, p.model, p.optimizer, p.out),
            )
    finally:
        gc.unfreeze()  # a caller that goes on (a notebook, the tests) can collect it again
    p.accelerator.print(f"done: {last}; adapter in {p.out / 'final'}")
    return last


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        run(cfg, overwrite=args.overwrite, resume=args.resume, force_resume=args.force_resume)
    except (ConfigError, DataError, ModelLoadError, ValueError) as e:
        print(f"medqa_loop: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:  # SIGTERM/SIGINT: a state was saved; exit as killed by it, cleanly
        print(f"medqa_loop: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()

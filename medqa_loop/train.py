"""Training: ``medqa train`` / ``accelerate launch -m medqa_loop.train [--config NAME|FILE] [--set key.sub=value ...]``.

``prepare_run`` builds what the loop runs on, in the order that fails fastest: everything that
can be wrong in the config, the data or the paths is checked before the base model's weights are
read, so a typo costs seconds, not a 7B load. ``run`` adds what the loop hands work to (metrics,
states, sampling, profiling, debugging) and runs medqa_loop.loop.train.
"""

from __future__ import annotations

import gc
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import yaml

from medqa_loop.batching import collate
from medqa_loop.checkpoint.lock import RunLock
from medqa_loop.checkpoint.state import Position
from medqa_loop.config import Config, ConfigError
from medqa_loop.data import Pairs, encode_pairs, load_pairs, split_pairs, summarize_data
from medqa_loop.masking import resolve_mask

RUN_MARKERS = ("metrics.jsonl", "config.yaml")


def prepare_output_dir(cfg: Config, overwrite: bool, resume_from: Path | None = None) -> RunLock:
    """Take the run directory's lock, then clear it (an earlier run, with ``overwrite``) and make
    it. A directory that cannot be written (no permission, a read-only disk, a file in the way)
    is found here, by writing in it, before the model loads: the run's first files come after."""
    out = Path(cfg.output_dir)
    # Resuming from one of its own states is how a run directory is continued.
    continuing = resume_from is not None and out.resolve() in Path(resume_from).resolve().parents
    try:
        lock = RunLock(out).acquire()  # before anything in the directory is deleted
        if not continuing and any((out / m).exists() for m in RUN_MARKERS):
            if not overwrite:
                raise ConfigError(
                    f"output_dir {out} holds another run; pass --overwrite, set output_dir, or "
                    "continue it with --resume auto"
                )
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        culprit = f" ({e.filename})" if e.filename else ""
        raise ConfigError(
            f"output_dir {out} cannot be written: {e.strerror or e}{culprit}; pick another with "
            "--set output_dir=DIR"
        ) from None
    return lock


@dataclass
class PreparedRun:
    """What the loop runs on: built by ``prepare_run`` in the order that fails fastest."""

    cfg: Config  # the config as the run uses it: data.pack_tokens=auto resolved by the memory plan
    accelerator: object
    tokenizer: object
    model: object  # the base with LoRA, prepared by Accelerate
    optimizer: object
    train_examples: list[dict]  # tokenized pairs (data.encode_pairs)
    val_examples: list[dict]
    collate_fn: object  # examples -> Batch, padded or packed as data.batching says
    out: Path  # the run directory
    val_pairs: Pairs  # the texts behind val_examples (questions and references to sample)
    start: Position = Position()  # where a resumed run stands
    data_stats: dict = field(default_factory=dict)  # the first metrics.jsonl line: data, memory plan, fast path
    lock: RunLock | None = None  # the run directory's, held while this lives (main process)
    graphs: object = None  # model.cuda_graphs: the micro-batches as CUDA graphs (kernels.graphs.MicroBatchGraphs), or None


def prepare_run(
    cfg: Config, overwrite: bool = False, resume: str | None = None, force_resume: bool = False
) -> PreparedRun:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from medqa_loop import hub, memory
    from medqa_loop import model as M
    from medqa_loop.checkpoint import state as S
    from medqa_loop.distributed import check_processes
    from medqa_loop.kernels.graphs import ROW_MULTIPLE, MicroBatchGraphs, use_graphs
    from medqa_loop.kernels.patch import check_fast_path, fast_path_report
    from medqa_loop.kernels.patch import describe as describe_fast_path
    from medqa_loop.optim import build_optimizer
    from medqa_loop.trackers import check_installed

    # Trackers (train.report_to) write their files inside the run directory; their packages are
    # looked up first (Accelerate would leave a missing one out with a warning).
    check_installed(cfg.train.report_to)
    accelerator = Accelerator(log_with=cfg.train.report_to or None, project_dir=cfg.output_dir)
    accelerator.print(check_processes(accelerator))
    mask_fn = resolve_mask(cfg.data.mask)  # a mask by import path is imported here, to tokenize
    out = Path(cfg.output_dir)
    say, world, resume_from = accelerator.print, accelerator.num_processes, None
    use_graphs(cfg, accelerator.device, world)  # model.cuda_graphs: true where they cannot run fails here
    if resume:  # the state's files and config are checked before anything is loaded
        resume_from = S.find_state(out, resume, say)
        if resume_from is not None:
            S.check_config(resume_from, cfg, world, force_resume, say)
            if cfg.data.pack_tokens == "auto":  # the rows it trained in: the same micro-batches, exactly
                cfg = replace(cfg, data=replace(cfg.data, pack_tokens=S.saved_config(resume_from)["data"]["pack_tokens"]))
    # `--resume auto` with no state to resume from starts over, so a job script can always pass it.
    starting_over = resume == "auto" and resume_from is None
    lock = None
    if accelerator.is_main_process:
        lock = prepare_output_dir(cfg, overwrite or starting_over, resume_from)
    accelerator.wait_for_everyone()

    # A hub that does not answer costs seconds here, not minutes of retries (or a hang) in each load.
    hub.use_local_files_if_unreachable(hub.run_sources(cfg), say)
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
    model_config = M.check_model_source(source, cfg.model.trust_remote_code)
    M.check_lora_targets(model_config, cfg.lora.target_modules, cfg.model.trust_remote_code)
    # The memory plan, before the base is loaded: the rows (data.pack_tokens=auto), CUDA graphs,
    # how many layers to checkpoint. From here on cfg is the config as the run uses it.
    run_plan = memory.plan(cfg, model_config, train_set.examples, accelerator.device, world)
    cfg = replace(cfg, data=replace(cfg.data, pack_tokens=run_plan.rows))
    say(run_plan.line)
    data_stats.update(run_plan.record, cuda_graphs=run_plan.graphs)

    set_seed(cfg.seed)  # LoRA init and dropout draw from here on
    base = M.load_base(cfg.model, source, accelerator.device)
    model = M.add_lora(base, cfg.lora, run_plan.layers, cfg.model.fused_ops)
    fast_path = fast_path_report(model, cfg, accelerator.device)
    say(describe_fast_path(fast_path))
    check_fast_path(fast_path, cfg, accelerator.device.type == "cuda")
    data_stats.update(fast_path)
    if accelerator.is_main_process:
        model.print_trainable_parameters()
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    start = S.restore(resume_from, accelerator, model, optimizer, out) if resume_from else Position()
    graphs = None
    if run_plan.graphs:
        graphs = MicroBatchGraphs(model, train_set.examples + val_set.examples, tokenizer.pad_token_id, say)
        say("CUDA graphs: each training and evaluation micro-batch replayed as one graph (model.cuda_graphs), "
            f"rows padded to a multiple of {ROW_MULTIPLE} tokens")
    return PreparedRun(
        cfg, accelerator, tokenizer, model, optimizer, train_set.examples, val_set.examples,
        partial(collate, pad_id=tokenizer.pad_token_id, packed=cfg.data.batching == "pack"), out,
        val_pairs, start, data_stats, lock, graphs,
    )


def run(
    cfg: Config, overwrite: bool = False, resume: str | None = None, force_resume: bool = False
) -> dict:
    """Train as ``cfg`` says; return the last logged values."""
    from medqa_loop.checkpoint.state import StateSaver, examples_digest
    from medqa_loop.debug.profiling import StepProfiler
    from medqa_loop.debug.trace import build_debugger, load_pause_hooks
    from medqa_loop.generate import eval_sampler
    from medqa_loop.loop import Hooks, train
    from medqa_loop.metrics import MetricsLog, read_metrics, run_summary
    from medqa_loop.trackers import start_trackers

    started = time.perf_counter()
    pause_hooks = load_pause_hooks(cfg.debug)  # user code: imported here, checked before the base loads
    p = prepare_run(cfg, overwrite, resume, force_resume)
    cfg = p.cfg  # data.pack_tokens=auto resolved
    # Every record also goes to the trackers train.report_to names (a resumed run: after its step).
    forward = start_trackers(p.accelerator, cfg, p.start.step)
    log = MetricsLog(p.out / "metrics.jsonl", enabled=p.accelerator.is_main_process, forward=forward)
    if p.start.step == 0:  # a resumed run's metrics.jsonl has it already
        log.write(step=0, **p.data_stats)
    saver = StateSaver(cfg, p.accelerator, p.model, p.optimizer, examples_digest(p.train_examples))
    rank = p.accelerator.process_index if p.accelerator.num_processes > 1 else None
    hooks = Hooks(
        log=log,
        sample_answers=eval_sampler(cfg, p.accelerator, p.model, p.tokenizer, p.val_pairs, p.out / "samples.jsonl"),
        states=saver,
        profiler=StepProfiler(cfg.train.profile_steps, p.out / "profile", rank),
        debugger=build_debugger(cfg, p.accelerator, p.model, p.optimizer, p.out, pause_hooks),
    )

    # What exists now (the model's modules, every example's token lists) lives as long as the
    # run. Frozen, Python's cyclic collector no longer walks it in each full collection, which
    # the many short-lived objects of a step's autograd trigger every few steps (BENCHMARKS.md).
    gc.collect()
    gc.freeze()
    try:
        with saver.stop_on_signals():
            last = train(p, hooks)
    finally:
        gc.unfreeze()  # a caller that goes on (a notebook, the tests) can collect it again
        if p.lock is not None:
            p.lock.release()
        p.accelerator.end_training()  # the trackers finish (flush, close), also after an exception
    if p.accelerator.is_main_process:
        print(run_summary(read_metrics(p.out / "metrics.jsonl"), p.out, time.perf_counter() - started))
    return last


def main(argv: list[str] | None = None) -> None:
    """``python -m medqa_loop.train`` (how ``accelerate launch -m medqa_loop.train`` runs it) is
    ``medqa train``."""
    from medqa_loop.cli import main as cli_main

    cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

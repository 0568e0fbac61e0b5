"""The ``medqa`` command: every sub-command, its arguments and how it ends, in one place.

    medqa train     [--config NAME|FILE] [--set key.sub=value ...] [--overwrite | --resume auto|DIR]
    medqa generate  --adapter DIR [QUESTION ...] [--file F]
    medqa export    --adapter DIR --out DIR
    medqa replay    --run DIR --step N
    medqa selftest  [--config NAME|FILE] [--set ...]
    medqa plot      RUN_DIR

``python -m medqa_loop ...`` is the same command, and ``accelerate launch -m medqa_loop.train``
runs ``medqa train`` under Accelerate's launcher (one GPU or many). Every sub-command ends the
same way: 0 on success; a wrong argument, config key, path, row or adapter is one line
``medqa <command>: error: ...`` on stderr and exit 2, raised before any model weights are read
where it can be known then; a training run stopped by a non-finite step (``train.nan_policy:
stop``) exits 3, by SIGTERM/SIGINT 128 + the signal number, each having saved a state and saying
how to resume.

Heavy imports (torch, transformers) happen inside the sub-commands, so ``medqa --help`` is quick.
"""

from __future__ import annotations

import argparse
import json
import sys

from medqa_loop import __version__


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="NAME|FILE",
        help="a shipped preset (recipe, tiny) or a YAML file (default: the original recipe)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=2e-4 (repeatable; value parsed as YAML)",
    )


def _train_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
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


def _train(args: argparse.Namespace) -> int:
    from medqa_loop.config import load_config
    from medqa_loop.train import run

    if args.force_resume and not args.resume:
        raise _UsageError("--force-resume needs --resume")
    cfg = load_config(args.config, args.set)
    run(cfg, overwrite=args.overwrite, resume=args.resume, force_resume=args.force_resume)
    return 0


def _trust_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="let transformers run the base model repository's own code (an adapter's config.yaml cannot)",
    )


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("questions", nargs="*", help="question(s) to answer")
    p.add_argument("--adapter", required=True, help="adapter directory (e.g. runs/tiny/final)")
    p.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    _trust_argument(p)
    p.add_argument("--file", help="questions: .txt (one per line) or .jsonl/.json/.csv/.parquet")
    p.add_argument("--question-column", help="column of --file (default: the run's data.question_column)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--jsonl", action="store_true", help="print one JSON line per question")


def _generate(args: argparse.Namespace) -> int:
    from medqa_loop.generate import GenerationSettings, answer_questions

    if args.max_new_tokens <= 0:
        raise _UsageError("--max-new-tokens must be > 0")
    if args.temperature < 0:
        raise _UsageError("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        raise _UsageError("--top-p must be in (0, 1]")
    if not args.questions and not args.file:
        raise _UsageError("give a question or --file")
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    results = answer_questions(
        args.adapter, args.questions, settings, file=args.file, question_column=args.question_column,
        base=args.base, seed=args.seed, trust_remote_code=args.trust_remote_code,
    )
    for r in results:
        print(json.dumps(r) if args.jsonl else f"### Question:\n{r['question']}\n### Answer:\n{r['answer']}\n")
    return 0


def _export_arguments(p: argparse.ArgumentParser) -> None:
    from medqa_loop.config import DTYPE_NAMES

    p.add_argument("--adapter", required=True, help="adapter directory (e.g. runs/tiny/final)")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    _trust_argument(p)
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _export(args: argparse.Namespace) -> int:
    from medqa_loop.export import export_merged

    out = export_merged(args.adapter, args.out, args.base, args.dtype, args.overwrite, args.trust_remote_code)
    print(f"merged model ({args.dtype}) saved to {out}")
    return 0


def _replay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the run directory (holds config.yaml)")
    p.add_argument("--step", required=True, type=int, help="optimizer step to recompute, from 1")
    p.add_argument(
        "--checkpoint",
        help="a debug bundle, training state or adapter directory holding the state before --step "
        "(default: found in --run)",
    )
    p.add_argument("--fresh-dropout", action="store_true", help="draw new dropout masks instead of the run's")


def _replay(args: argparse.Namespace) -> int:
    from medqa_loop.debug.replay import replay, report

    print(report(replay(args.run, args.step, args.checkpoint, args.fresh_dropout)))
    return 0


def _selftest_arguments(p: argparse.ArgumentParser) -> None:
    _config_arguments(p)
    p.add_argument(
        "--eval-mode", action="store_true",
        help="both passes in eval mode (on the CPU: bitsandbytes' LLM.int8 path, as in CUDA training)",
    )


def _selftest(args: argparse.Namespace) -> int:
    from medqa_loop.debug.selftest import run_selftest

    passed, text = run_selftest(args.config, args.set, args.eval_mode)
    print(text)
    return 0 if passed else 1


def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="PNG file to write (default: RUN_DIR/training.png)")


def _plot(args: argparse.Namespace) -> int:
    from medqa_loop.debug.plot import plot_run

    for path in plot_run(args.run_dir, args.out).files:  # training.png, and gradients.png for a traced run
        print(f"wrote {path}")
    return 0


# name -> (one line for --help, its arguments, what it runs)
COMMANDS = {
    "train": ("fine-tune with LoRA over the 8-bit base (the loop)", _train_arguments, _train),
    "generate": ("answer questions with a trained adapter", _generate_arguments, _generate),
    "export": ("merge an adapter into a 16-bit copy of its base: a plain transformers model", _export_arguments, _export),
    "replay": ("recompute one optimizer step of a run and print its per-module gradients", _replay_arguments, _replay),
    "selftest": ("check that gradient accumulation equals one batch of the same pairs", _selftest_arguments, _selftest),
    "plot": ("draw a run's loss, lr, grad norm, clip coefficient; a traced run's gradient heatmaps", _plot_arguments, _plot),
}


class _UsageError(ValueError):
    """A combination of arguments argparse cannot express."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medqa", description="An explicit, debuggable 8-bit LoRA fine-tuning loop for Mistral-7B on medical QA.",
    )
    p.add_argument("--version", action="version", version=f"medqa_loop {__version__}")
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (summary, add_arguments, _) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=summary, description=summary))
    return p


def _quiet_libraries() -> None:
    """Silence what a user of the command cannot act on: the libraries' progress bars for
    generating a dataset split, writing and loading shards, the JSON and CSV readers' log of a
    file they cannot parse (medqa_loop.data raises it again, naming the line), and one
    deprecation warning PEFT triggers in transformers on every run. Real warnings and errors
    still show."""
    import logging
    import warnings

    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    for reader in ("datasets.packaged_modules.json.json", "datasets.packaged_modules.csv.csv"):
        logging.getLogger(reader).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> None:
    """Parse, run the sub-command, exit with its code (see the module docstring)."""
    args = parser().parse_args(argv)
    _, _, command = COMMANDS[args.command]
    _quiet_libraries()
    from medqa_loop.checkpoint.state import Interrupted
    from medqa_loop.checkpoint.writer import CheckpointWriteError
    from medqa_loop.loop import NonFiniteError
    from medqa_loop.model import ModelLoadError

    try:
        code = command(args)
    except NonFiniteError as e:  # the run diverged: not a usage error
        print(f"medqa {args.command}: stopped: {e}", file=sys.stderr)
        sys.exit(3)
    # The project's errors are ValueErrors (ConfigError, DataError, AdapterError, StateError,
    # LaunchError, NonFiniteError...), a ModelLoadError or a CheckpointWriteError; each message
    # names what is wrong.
    except (ValueError, ModelLoadError, CheckpointWriteError) as e:
        print(f"medqa {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:  # SIGTERM/SIGINT: a state was saved; exit as killed by it, cleanly
        print(f"medqa {args.command}: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    sys.exit(code)

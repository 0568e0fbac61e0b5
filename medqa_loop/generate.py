"""Answer questions with a fine-tuned adapter, from the command line and during training.

    python -m medqa_loop.generate --adapter runs/tiny/final "What is the first-line drug for ...?"
    python -m medqa_loop.generate --adapter runs/tiny/final --file questions.txt --jsonl

The prompt is built by the same function as in training (data.encode_prompt: BOS + the run's
prompt template), and the base is loaded like in training (model.load_base, 8-bit unless the
run said otherwise), so the adapter sees exactly the distribution it was trained on.
Greedy by default; ``--temperature > 0`` samples (with ``--top-p`` and ``--seed``).

Questions are answered one at a time, never batched: LLM.int8 picks its fp16 outlier columns per
batch, so a batched answer would depend on the other questions in its batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from medqa_loop.config import Config, ConfigError
from medqa_loop.data import DataError, Pairs, check_text, encode_prompt
from medqa_loop.metrics import MetricsLog
from medqa_loop.model import ModelLoadError


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0


@torch.no_grad()
def generate_answer(model, tokenizer, question: str, template: str, settings: GenerationSettings) -> str:
    """The model's answer to one question (text after the prompt, special tokens dropped)."""
    if not question.strip():
        raise ValueError("the question is empty")
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, question, template)], device=device)
    if settings.temperature > 0:
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
    else:
        sampling = {"do_sample": False}
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # load_base turns the KV cache off for training; generation wants it back.
        use_cache=True,
        **sampling,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def eval_sampler(
    cfg: Config, accelerator, model, tokenizer, val_pairs: Pairs, path: Path
) -> Callable[[int], None] | None:
    """``sample(step)`` for the loop: greedy answers to the first ``train.sample_questions``
    validation questions (the split is seeded, so the same ones every time), appended to ``path``
    as JSON lines (step, row, question, reference, generated). None when switched off.

    Greedy decoding draws no random numbers, so sampling leaves the training run unchanged.
    Only the main process generates: the unwrapped model's forward has no collective ops.
    """
    n = min(cfg.train.sample_questions, len(val_pairs))
    if n == 0:
        return None
    log = MetricsLog(path, enabled=accelerator.is_main_process)
    settings = GenerationSettings(max_new_tokens=cfg.train.sample_max_new_tokens)

    def sample(step: int) -> None:
        if not accelerator.is_main_process:
            return
        net = accelerator.unwrap_model(model)
        net.eval()  # dropout off
        try:
            for i in range(n):
                q, ref = val_pairs.questions[i], val_pairs.answers[i]
                answer = generate_answer(net, tokenizer, q, cfg.data.prompt_template, settings)
                log.write(step=step, row=val_pairs.rows[i], question=q, reference=ref, generated=answer)
        finally:
            net.train()

    return sample


# ---------------------------------------------------------------------------------------------
# Command line


def read_questions(path: str | Path, column: str) -> list[str]:
    """Questions from a .txt file (one per non-blank line) or a table (.jsonl/.json/.csv/.parquet,
    ``column``). A missing column or an empty or non-text row is an error naming it."""
    from medqa_loop.data import FILE_FORMATS, _load_source

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"questions file not found: {path}")
    if path.suffix.lower() == ".txt":
        questions = [line for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix.lower() in FILE_FORMATS:
        ds = _load_source(str(path), "train")
        if column not in ds.column_names:
            raise DataError(
                f"questions file {path}: missing column {column!r} (columns: {ds.column_names}; "
                "set --question-column)"
            )
        questions = ds[column]
        for row, text in enumerate(questions):
            check_text(str(path), row, column, text)
    else:
        raise DataError(f"questions file {path}: use .txt (one per line) or {', '.join(FILE_FORMATS)}")
    if not questions:
        raise DataError(f"questions file {path} holds no questions")
    return list(questions)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="medqa_loop.generate", description=__doc__.splitlines()[0])
    p.add_argument("questions", nargs="*", help="question(s) to answer")
    p.add_argument("--adapter", required=True, help="adapter directory (e.g. runs/tiny/final)")
    p.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    p.add_argument("--file", help="questions: .txt (one per line) or .jsonl/.json/.csv/.parquet")
    p.add_argument("--question-column", help="column of --file (default: the run's data.question_column)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--jsonl", action="store_true", help="print one JSON line per question")
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0:
        p.error("--max-new-tokens must be > 0")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if not args.questions and not args.file:
        p.error("give a question or --file")
    return args


def answer_questions(args: argparse.Namespace) -> list[dict]:
    """Check everything cheap first (questions, adapter, base shapes), then load and answer."""
    from transformers import set_seed

    from medqa_loop.adapter import adapter_tokenizer, check_adapter_fits, load_adapted_model, resolve_adapter

    for i, q in enumerate(args.questions):
        if not q.strip():
            raise ValueError(f"question {i + 1} on the command line is empty")
    src = resolve_adapter(args.adapter, args.base)
    questions = list(args.questions)
    if args.file:
        questions += read_questions(args.file, args.question_column or src.run.data.question_column)
    check_adapter_fits(src)
    tokenizer = adapter_tokenizer(src)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_adapted_model(src, src.run.model, device)
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    set_seed(args.seed)
    template = src.run.data.prompt_template
    return [{"question": q, "answer": generate_answer(model, tokenizer, q, template, settings)} for q in questions]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        results = answer_questions(args)
    except (ConfigError, DataError, ModelLoadError, ValueError) as e:  # AdapterError is a ValueError
        print(f"medqa_loop.generate: error: {e}", file=sys.stderr)
        sys.exit(2)
    for r in results:
        print(json.dumps(r) if args.jsonl else f"### Question:\n{r['question']}\n### Answer:\n{r['answer']}\n")


if __name__ == "__main__":
    main()

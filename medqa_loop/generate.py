"""Answer questions with a fine-tuned adapter, from the command line and during training.

    medqa generate --adapter runs/tiny/final "What is the first-line drug for ...?"
    medqa generate --adapter runs/tiny/final --file questions.txt --jsonl

The prompt is built by the same function as in training (data.encode_prompt: BOS + the run's
prompt template), and the base is loaded like in training (model.load_base, 8-bit unless the
run said otherwise), so the adapter sees exactly the distribution it was trained on.
Greedy by default; ``--temperature > 0`` samples (with ``--top-p`` and ``--seed``).

Questions are answered one at a time, never batched: LLM.int8 picks its fp16 outlier columns per
batch, so a batched answer would depend on the other questions in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from medqa_loop.config import Config
from medqa_loop.data import DataError, Pairs, check_text, encode_prompt
from medqa_loop.metrics import MetricsLog


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
# medqa generate


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
        src = _load_source(str(path), "train")
        if column not in src.ds.column_names:
            raise DataError(
                f"questions file {path}: missing column {column!r} (columns: {src.ds.column_names}; "
                "set --question-column)"
            )
        questions = src.ds[column]
        for row, text in enumerate(questions):
            check_text(str(path), src.where(row), column, text)
    else:
        raise DataError(f"questions file {path}: use .txt (one per line) or {', '.join(FILE_FORMATS)}")
    if not questions:
        raise DataError(f"questions file {path} holds no questions")
    return list(questions)


def answer_questions(
    adapter: str | Path, questions: list[str], settings: GenerationSettings, file: str | None = None,
    question_column: str | None = None, base: str | None = None, seed: int = 0, trust_remote_code: bool = False,
) -> list[dict]:
    """Answer ``questions`` (and those of ``file``) with ``adapter``: everything cheap is checked
    first (questions, adapter, base shapes), then the model is loaded. ``trust_remote_code`` lets
    the base's own code run (the adapter's config.yaml cannot: resolve_adapter)."""
    from transformers import set_seed

    from medqa_loop.checkpoint.adapter import adapter_tokenizer, check_adapter_fits, load_adapted_model, resolve_adapter

    for i, q in enumerate(questions):
        if not q.strip():
            raise ValueError(f"question {i + 1} on the command line is empty")
    src = resolve_adapter(adapter, base, trust_remote_code)
    questions = list(questions)
    if file:
        questions += read_questions(file, question_column or src.run.data.question_column)
    check_adapter_fits(src)
    tokenizer = adapter_tokenizer(src)
    template, limit = src.run.data.prompt_template, src.run.data.max_length
    for i, q in enumerate(questions):  # before the base loads: a long text costs minutes, then GBs
        tokens = len(encode_prompt(tokenizer, q, template))
        if tokens >= limit:
            raise ValueError(
                f"question {i + 1} is {tokens} tokens with its prompt; the adapter was trained on pairs of at "
                f"most data.max_length={limit} tokens, prompt and answer together: shorten it"
            )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_adapted_model(src, src.run.model, device)
    set_seed(seed)
    return [{"question": q, "answer": generate_answer(model, tokenizer, q, template, settings)} for q in questions]

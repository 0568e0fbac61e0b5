"""Data: load question/answer pairs, check them, split, tokenize, build labels.

Labels are built here and nowhere else: ``labels`` is ``input_ids`` with -100 wherever the loss
mask gives weight 0 (the prompt, by default); ``loss_weights`` carries the mask's weights.
Labels are *not* shifted: HF causal LMs (and medqa_loop.losses) shift them. How examples
become micro-batches is medqa_loop.batching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medqa_loop.config import DataConfig
from medqa_loop.masking import MaskFn, MaskInput, apply_mask

ASSETS = Path(__file__).parent / "assets"
FILE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class DataError(ValueError):
    """Bad dataset source or row. The message names the source, row and column."""


# ---------------------------------------------------------------------------------------------
# Loading


def _load_source(spec: str, split: str):
    """A datasets.Dataset from a hub name, a local file or directory, or an embedded sample."""
    import datasets

    if spec.startswith("embedded:"):
        path = ASSETS / f"{spec.split(':', 1)[1]}.jsonl"
        if not path.is_file():
            known = sorted(f"embedded:{p.stem}" for p in ASSETS.glob("*.jsonl"))
            raise DataError(f"unknown embedded dataset {spec!r}; available: {known}")
        return datasets.load_dataset("json", data_files=str(path), split="train")
    path = Path(spec).expanduser()
    if path.is_file():
        fmt = FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"dataset file {path}: unsupported extension {path.suffix!r} "
                f"(use {', '.join(FILE_FORMATS)} or a datasets.save_to_disk directory)"
            )
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"dataset {path} has splits {list(loaded)}, not {split!r}")
            loaded = loaded[split]
        return loaded
    if spec.startswith((".", "/", "~")) or path.suffix.lower() in FILE_FORMATS:
        raise DataError(f"dataset path not found: {spec}")
    try:
        return datasets.load_dataset(spec, split=split)
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        raise DataError(
            f"cannot load dataset {spec!r} from the hub ({type(e).__name__}: {e}). "
            "Offline? Point data.dataset at a local .parquet/.jsonl/.csv file or directory."
        ) from e


@dataclass
class Pairs:
    """Validated pairs; ``rows`` are indices into the loaded source, kept through the split."""

    source: str
    questions: list[str]
    answers: list[str]
    rows: list[int]
    skipped: list[str] = field(default_factory=list)  # bad rows left out (data.bad_rows=skip)

    def __len__(self) -> int:
        return len(self.rows)


def load_pairs(cfg: DataConfig) -> Pairs:
    ds = _load_source(cfg.dataset, cfg.split)
    for column in (cfg.question_column, cfg.answer_column):
        if column not in ds.column_names:
            raise DataError(
                f"dataset {cfg.dataset}: missing column {column!r} "
                f"(columns: {ds.column_names}; set data.question_column / data.answer_column)"
            )
    if cfg.max_rows is not None:
        ds = ds.select(range(min(cfg.max_rows, len(ds))))
    questions, answers = ds[cfg.question_column], ds[cfg.answer_column]
    keep, skipped = [], []
    for row, (q, a) in enumerate(zip(questions, answers)):
        problem = _row_problem(row, ((cfg.question_column, q), (cfg.answer_column, a)))
        if problem is None:
            keep.append(row)
        else:
            skipped.append(_bad_row(cfg.dataset, cfg.bad_rows, problem))
    return Pairs(
        cfg.dataset, [questions[i] for i in keep], [answers[i] for i in keep], keep, skipped
    )


def _row_problem(row: int, texts) -> str | None:
    """What is wrong with one row's (column, text) pairs, naming row and column; None if fine."""
    for column, text in texts:
        if text is None:  # a null, or a JSON line without the key (datasets fills in None)
            return f"row {row}, column {column!r}: missing or null (expected text, got NoneType)"
        if not isinstance(text, str):
            return f"row {row}, column {column!r}: expected text, got {type(text).__name__} {text!r:.40}"
        if not text.strip():
            return f"row {row}, column {column!r}: empty text"
    return None


def _bad_row(source: str, mode: str, problem: str) -> str:
    """data.bad_rows=error: raise naming the row; skip: return the problem, to count and report."""
    if mode != "skip":
        raise DataError(f"dataset {source}: {problem} (data.bad_rows=skip leaves such rows out)")
    return problem


def check_text(source: str, row: int, column: str, text) -> None:
    """A cell must be non-blank text; the error names the source, row and column."""
    problem = _row_problem(row, ((column, text),))
    if problem is not None:
        raise DataError(f"dataset {source}: {problem}")


def split_pairs(pairs: Pairs, val_fraction: float, seed: int) -> tuple[Pairs, Pairs]:
    """A seeded shuffle, then the last ``val_fraction`` (rounded up) is validation."""
    n_val = math.ceil(len(pairs) * val_fraction)
    if n_val >= len(pairs):
        raise DataError(
            f"dataset {pairs.source}: {len(pairs)} rows leave nothing to train on "
            f"with data.val_fraction={val_fraction}"
        )
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()

    def take(idx: list[int]) -> Pairs:
        return Pairs(
            pairs.source,
            [pairs.questions[i] for i in idx],
            [pairs.answers[i] for i in idx],
            [pairs.rows[i] for i in idx],
        )

    return take(perm[n_val:]), take(perm[:n_val])


# ---------------------------------------------------------------------------------------------
# Tokenization and labels


def format_prompt(question: str, template: str) -> str:
    """The text before the answer: the same in training (encode_pairs) and at inference
    (medqa_loop.generate), so a fine-tuned model is asked exactly what it was trained on."""
    return template.format(input_text=question)


def bos_prefix(tokenizer) -> list[int]:
    """``[BOS]``, added explicitly: the bare sentencepiece tokenizer does not add it itself."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode_prompt(tokenizer, question: str, template: str) -> list[int]:
    """BOS + prompt tokens: what generation starts from. Equal to the first ``prompt_len``
    tokens encode_pairs gives the same question (tests/cli/test_generate.py checks it)."""
    text = format_prompt(question, template)
    return bos_prefix(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Encoded:
    examples: list[dict]  # input_ids, labels, loss_weights, row (lists; unpadded)
    truncated: int  # pairs whose answer was cut at max_length
    skipped: list[str] = field(default_factory=list)  # prompts too long (data.bad_rows=skip)


def encode_pairs(pairs: Pairs, tokenizer, cfg: DataConfig, mask_fn: MaskFn) -> Encoded:
    """Tokenize ``BOS + prompt + answer + EOS`` and build labels and loss weights.

    The pair is tokenized as one string (what the model sees at inference), and the prompt's
    length is read off the offsets, so the boundary token is never tokenized differently from
    the full text. BOS/EOS are added here explicitly: some tokenizer files (e.g. the bare
    sentencepiece model) don't add BOS by themselves, and Mistral was trained with it.
    A pair longer than ``max_length`` loses the end of its answer (and its EOS, since it did not
    end there); a prompt that leaves no room for the answer is an error naming the row (or, with
    ``data.bad_rows=skip``, a skipped row).
    """
    prompts = [format_prompt(q, cfg.prompt_template) for q in pairs.questions]
    texts = [p + a for p, a in zip(prompts, pairs.answers)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    head = bos_prefix(tokenizer)
    examples, truncated, skipped = [], 0, []
    for prompt, ids, offsets, row in zip(prompts, enc["input_ids"], enc["offset_mapping"], pairs.rows):
        prompt_len = len(head) + sum(1 for start, _ in offsets if start < len(prompt))
        if prompt_len >= cfg.max_length:
            problem = (
                f"row {row}, column {cfg.question_column!r}: the prompt alone is {prompt_len} "
                f"tokens, leaving no room for the answer in data.max_length={cfg.max_length}"
            )
            skipped.append(_bad_row(pairs.source, cfg.bad_rows, problem))
            continue
        full = head + ids + [eos]
        if len(full) > cfg.max_length:
            full = full[: cfg.max_length]
            truncated += 1
        weights = apply_mask(mask_fn, MaskInput(full, prompt_len, row))
        labels = [t if w > 0 else -100 for t, w in zip(full, weights)]
        examples.append({"input_ids": full, "labels": labels, "loss_weights": weights, "row": row})
    return Encoded(examples, truncated, skipped)


def summarize_data(cfg: DataConfig, pairs: Pairs, train: Encoded, val: Encoded, say=print) -> dict:
    """Report what loading kept, truncated and skipped (listing skipped rows: none go silently),
    refuse an empty split, and return the counts for metrics.jsonl."""
    skipped = pairs.skipped + train.skipped + val.skipped
    stats = {
        "data_train_pairs": len(train.examples),
        "data_val_pairs": len(val.examples),
        "data_truncated_answers": train.truncated + val.truncated,
        "data_skipped_rows": len(skipped),
    }
    say(
        f"data: {stats['data_train_pairs']} train / {stats['data_val_pairs']} validation pairs "
        f"from {cfg.dataset}; {stats['data_truncated_answers']} answers truncated at "
        f"{cfg.max_length} tokens; {len(skipped)} bad rows skipped"
    )
    limit = 20
    for problem in skipped[:limit]:
        say(f"data: skipped {problem}")
    if len(skipped) > limit:
        say(f"data: ... and {len(skipped) - limit} more skipped rows")
    for name, split in (("training", train), ("validation", val)):
        if not split.examples:
            raise DataError(f"dataset {cfg.dataset}: the {name} split is empty after skipping bad rows")
    return stats

"""Data: load question/answer pairs, check them, split, tokenize, build labels.

Labels are built here and nowhere else: ``labels`` is ``input_ids`` with -100 wherever the loss
mask gives weight 0 (the prompt, by default); ``loss_weights`` carries the mask's weights.
Labels are *not* shifted: HF causal LMs (and medqa_loop.losses) shift them. How examples
become micro-batches is medqa_loop.batching.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medqa_loop.config import DataConfig
from medqa_loop.hub import looks_local
from medqa_loop.masking import MaskFn, MaskInput, apply_mask

ASSETS = Path(__file__).parent / "assets"
FILE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
# Formats read as text, whose rows messages name by line.
TEXT_FORMATS = ("json", "csv")


class DataError(ValueError):
    """Bad dataset source or row. The message names the source, row and column."""


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class Source:
    """A loaded dataset, with what messages call it and where its rows are in the file."""

    ds: object  # a datasets.Dataset
    name: str  # the file, directory or hub name (with the file it was read from)
    lines: list[int] | None = None  # the line each row starts on, for a .jsonl/.json/.csv file

    def where(self, row: int) -> str:
        return row_label(row, self.lines)


def row_label(row: int, lines: list[int] | None) -> str:
    """How a message names a row: by its line in a text file, numbered as an editor numbers it
    (from 1; a CSV's header is line 1), else by its index, counted from 0 as ``ds[row]`` and the
    ``row`` of samples.jsonl and the debug traces are."""
    return f"line {lines[row]}" if lines is not None else f"row {row} (counted from 0)"


def _load_source(spec: str, split: str) -> Source:
    """A dataset from a hub name, a local file or directory, or an embedded sample."""
    if spec.startswith("embedded:"):
        path = ASSETS / f"{spec.split(':', 1)[1]}.jsonl"
        if not path.is_file():
            known = sorted(f"embedded:{p.stem}" for p in ASSETS.glob("*.jsonl"))
            raise DataError(f"unknown embedded dataset {spec!r}; available: {known}")
        return _load_file(path)
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        return _load_directory(path, split)
    if looks_local(spec) or path.suffix.lower() in FILE_FORMATS:
        raise DataError(f"dataset path not found: {spec}")
    return _load_hub(spec, split)


def _load_file(path: Path) -> Source:
    """One .parquet/.jsonl/.json/.csv file. A text file is checked first (UTF-8, not empty, has
    rows), so what the readers would fail on deep inside is named by its line."""
    import datasets

    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"dataset file {path}: unsupported extension {path.suffix!r} "
            f"(use {', '.join(FILE_FORMATS)} or a datasets.save_to_disk directory)"
        )
    lines = _row_lines(path, fmt) if fmt in TEXT_FORMATS else None
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # pyarrow, pandas and datasets raise many types for a file they cannot read
        raise DataError(f"dataset file {path}: {_parse_problem(path, fmt) or _innermost(e)}") from e
    if len(ds) == 0:
        raise DataError(f"dataset file {path} holds no rows")
    # The readers skip blank lines as _row_lines does; a file they read otherwise (a JSON
    # document, not lines) has its rows named by index.
    return Source(ds, str(path), lines if lines is not None and len(lines) == len(ds) else None)


def _row_lines(path: Path, fmt: str) -> list[int]:
    """The line (from 1) each row of a text data file starts on; refuses a file that is not
    UTF-8, is empty, or (a CSV) holds only its header."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"dataset file {path}, line {line}: not valid UTF-8 (byte {raw[e.start]:#04x} at byte "
            f"{e.start} of the file); save it as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"dataset file {path} is empty")
    if fmt == "json":  # one row per non-blank line (a JSON document: checked by the count)
        return [n for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    reader = csv.reader(io.StringIO(text, newline=""))
    starts, previous_end = [], 0
    for record in reader:  # a quoted cell may span lines: a row starts after the last one ended
        if record:  # a blank line reads as [] (and is skipped, as pandas skips it)
            starts.append(previous_end + 1)
        previous_end = reader.line_num
    if len(starts) < 2:
        raise DataError(f"dataset file {path} holds a header line and no rows")
    return starts[1:]


def _parse_problem(path: Path, fmt: str) -> str | None:
    """Where a text data file that a reader refused first goes wrong, by line; None if not found."""
    if fmt not in TEXT_FORMATS:
        return None
    text = path.read_text(encoding="utf-8")  # _row_lines has checked it decodes
    if fmt == "csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        header, previous_end = next(reader, []), reader.line_num
        for record in reader:
            if len(record) > len(header):  # pandas fills a short row with nulls, but refuses a long one
                return f"line {previous_end + 1}: {len(record)} fields, the header has {len(header)}"
            previous_end = reader.line_num
        return None
    if text.lstrip().startswith("["):  # one JSON document, not JSON lines
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})"
        return None
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n}: invalid JSON ({e.msg} at column {e.colno})"
        if not isinstance(value, dict):
            return f"line {n}: expected a JSON object of columns, got {type(value).__name__}"
    return None


def _innermost(e: BaseException) -> str:
    """The first line of the error at the bottom of a chain (datasets wraps the reader's)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _load_directory(path: Path, split: str) -> Source:
    """A ``datasets.save_to_disk`` directory, or a folder of data files (a hub snapshot, say:
    data/train-00000-of-00001.parquet), whose split's files datasets finds by its naming rules
    (and the README's ``configs``)."""
    import datasets

    if (path / datasets.config.DATASETDICT_JSON_FILENAME).is_file() or (
        path / datasets.config.DATASET_STATE_JSON_FILENAME
    ).is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"dataset {path} has splits {list(loaded)}, not {split!r}")
            loaded = loaded[split]
        return Source(loaded, str(path))
    try:
        found = {str(name): [Path(f) for f in files]
                 for name, files in datasets.load_dataset_builder(str(path)).config.data_files.items()}
    except FileNotFoundError:  # datasets' "doesn't contain any data files"
        found = {}
    names = [f.name for files in found.values() for f in files]
    if not names or any(Path(name).suffix.lower() not in FILE_FORMATS for name in names):
        raise DataError(
            f"dataset directory {path} is neither a datasets.save_to_disk directory nor a folder "
            f"of data files ({', '.join(FILE_FORMATS)})" + (f"; it holds {names[:5]}" if names else "")
        )
    if split not in found:
        raise DataError(f"dataset {path} has splits {list(found)}, not {split!r}")
    files = found[split]
    if len(files) == 1:
        return _load_file(files[0])
    # Several files: each checked (and named) alone, their rows then counted across all of them.
    return Source(datasets.concatenate_datasets([_load_file(f).ds for f in files]), str(path))


def _load_hub(spec: str, split: str) -> Source:
    """A hub dataset. Offline (HF_HUB_OFFLINE=1), the snapshot in the hub cache that
    ``snapshot_download`` left (datasets offline reads only its own cache of an earlier online
    load, tried next); online, datasets downloads it."""
    import datasets
    import huggingface_hub

    not_cached = None
    if huggingface_hub.is_offline_mode():
        snapshot, not_cached = _cached_snapshot(spec)
        if snapshot is not None:
            found = _load_directory(snapshot, split)
            return dataclasses.replace(found, name=f"{spec} ({found.name})")
    try:
        return Source(datasets.load_dataset(spec, split=split), spec)
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        if not_cached is not None:
            raise DataError(
                f"cannot load dataset {spec!r}: HF_HUB_OFFLINE=1 and it is not in the hub cache "
                f"{huggingface_hub.constants.HF_HUB_CACHE} ({not_cached}). Download it "
                f"once online (hf download --repo-type dataset {spec}), or point data.dataset at "
                "a local .parquet/.jsonl/.csv file or directory."
            ) from e
        raise DataError(
            f"cannot load dataset {spec!r} from the hub ({type(e).__name__}: {e}). "
            "Offline? Point data.dataset at a local .parquet/.jsonl/.csv file or directory."
        ) from e


def _cached_snapshot(spec: str) -> tuple[Path | None, str | None]:
    """The hub cache's snapshot of dataset ``spec`` as snapshot_download left it, or None and why."""
    from huggingface_hub import errors, snapshot_download

    try:
        return Path(snapshot_download(spec, repo_type="dataset", local_files_only=True)), None
    except errors.IncompleteSnapshotError as e:  # it names the missing files
        return None, str(e)
    except errors.LocalEntryNotFoundError:
        return None, "no snapshot of it there"
    except ValueError as e:  # not a valid repo id
        return None, str(e)


@dataclass
class Pairs:
    """Validated pairs; ``rows`` are indices into the loaded source, kept through the split."""

    source: str
    questions: list[str]
    answers: list[str]
    rows: list[int]
    skipped: list[str] = field(default_factory=list)  # bad rows left out (data.bad_rows=skip)
    lines: list[int] | None = None  # the source's line of each of its rows (Source.lines)
    duplicates: int = 0  # repeated pairs left out (data.dedupe)

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, row: int) -> str:
        return row_label(row, self.lines)


def load_pairs(cfg: DataConfig) -> Pairs:
    src = _load_source(cfg.dataset, cfg.split)
    ds = src.ds
    for column in (cfg.question_column, cfg.answer_column):
        if column not in ds.column_names:
            raise DataError(
                f"dataset {src.name}: missing column {column!r} "
                f"(columns: {ds.column_names}; set data.question_column / data.answer_column)"
            )
    if cfg.max_rows is not None:
        ds = ds.select(range(min(cfg.max_rows, len(ds))))
    # As lists: datasets >= 4 gives a lazy Column, whose every item read is an Arrow lookup
    # (~0.1 ms: 20 s for 100k pairs read twice).
    questions, answers = ds[cfg.question_column][:], ds[cfg.answer_column][:]
    keep, skipped = [], []
    for row, (q, a) in enumerate(zip(questions, answers)):
        problem = _text_problem(((cfg.question_column, q), (cfg.answer_column, a)))
        if problem is None:
            keep.append(row)
        else:
            skipped.append(_bad_row(src.name, cfg.bad_rows, f"{src.where(row)}, {problem}"))
    unique = _first_of_each_pair(keep, questions, answers) if cfg.dedupe else keep
    return Pairs(
        src.name, [questions[i] for i in unique], [answers[i] for i in unique], unique, skipped,
        src.lines, len(keep) - len(unique),
    )


def _pair_key(question: str, answer: str) -> tuple[str, str]:
    """Two pairs are the same pair when their question and answer are, outer whitespace aside."""
    return question.strip(), answer.strip()


def _first_of_each_pair(rows: list[int], questions: list[str], answers: list[str]) -> list[int]:
    """``rows`` without the repeats of a pair (data.dedupe): the first of identical pairs stays."""
    seen, first = set(), []
    for row in rows:
        key = _pair_key(questions[row], answers[row])
        if key not in seen:
            seen.add(key)
            first.append(row)
    return first


def _text_problem(texts) -> str | None:
    """What is wrong with one row's (column, text) pairs, naming the column; None if fine."""
    for column, text in texts:
        if text is None:  # a null, or a JSON line without the key (datasets fills in None)
            return f"column {column!r}: missing or null (expected text, got NoneType)"
        if not isinstance(text, str):
            return f"column {column!r}: expected text, got {type(text).__name__} {text!r:.40}"
        if not text.strip():
            return f"column {column!r}: empty text"
    return None


def _bad_row(source: str, mode: str, problem: str) -> str:
    """data.bad_rows=error: raise naming the row; skip: return the problem, to count and report."""
    if mode != "skip":
        raise DataError(f"dataset {source}: {problem} (data.bad_rows=skip leaves such rows out)")
    return problem


def check_text(source: str, where: str, column: str, text) -> None:
    """A cell must be non-blank text; the error names the source, the row (``where``, as
    row_label words it) and the column."""
    problem = _text_problem(((column, text),))
    if problem is not None:
        raise DataError(f"dataset {source}: {where}, {problem}")


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
            lines=pairs.lines,
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
                f"{pairs.where(row)}, column {cfg.question_column!r}: the prompt alone is {prompt_len} "
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
    """Report what loading kept, truncated, skipped and dropped as duplicates (listing skipped
    rows: none go silently) and how many validation pairs are training pairs too, refuse an
    empty split, and return the counts for metrics.jsonl."""
    skipped = pairs.skipped + train.skipped + val.skipped
    stats = {
        "data_train_pairs": len(train.examples),
        "data_val_pairs": len(val.examples),
        "data_truncated_answers": train.truncated + val.truncated,
        "data_skipped_rows": len(skipped),
        "data_dropped_duplicates": pairs.duplicates,
        "data_val_duplicates": _val_duplicates(pairs, train, val),
    }
    say(
        f"data: {stats['data_train_pairs']} train / {stats['data_val_pairs']} validation pairs "
        f"from {cfg.dataset}; {stats['data_truncated_answers']} answers truncated at "
        f"{cfg.max_length} tokens; {len(skipped)} bad rows skipped; "
        f"{stats['data_val_duplicates']} validation pairs repeat a training pair"
        + (f"; {pairs.duplicates} repeated pairs dropped (data.dedupe)" if cfg.dedupe else "")
    )
    limit = 20
    for problem in skipped[:limit]:
        say(f"data: skipped {problem}")
    if len(skipped) > limit:
        say(f"data: ... and {len(skipped) - limit} more skipped rows")
    if stats["data_val_duplicates"]:
        say(
            f"data: warning: {stats['data_val_duplicates']} validation pairs repeat a training pair "
            "(the same question and answer), which flatters the eval loss; data.dedupe=true drops "
            "repeated pairs before the split"
        )
    for name, split in (("training", train), ("validation", val)):
        if not split.examples:
            raise DataError(f"dataset {cfg.dataset}: the {name} split is empty after skipping bad rows")
    return stats


def _val_duplicates(pairs: Pairs, train: Encoded, val: Encoded) -> int:
    """How many validation examples have the question and answer of a training example
    (``pairs``, as loaded, holds the texts of both splits' rows)."""
    key = {row: _pair_key(q, a) for row, q, a in zip(pairs.rows, pairs.questions, pairs.answers)}
    trained = {key[e["row"]] for e in train.examples}
    return sum(key[e["row"]] in trained for e in val.examples)

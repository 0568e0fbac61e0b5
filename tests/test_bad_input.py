"""Bad input: each bad-row kind named or (data.bad_rows=skip) skipped and counted, degenerate splits
and batches, and wrong paths / names / tokenizers / keys failing before any model is loaded."""

import json
import math

import pytest
import torch

from medqa_loop.batching import accumulation_windows, steps_per_epoch
from medqa_loop.config import ConfigError, DataConfig, load_config
from medqa_loop.data import DataError, Encoded, Pairs, encode_pairs, load_pairs, split_pairs, summarize_data
from medqa_loop.masking import MASKS
from medqa_loop.train import main

from conftest import TINY

GOOD = {"question": "What is sepsis?", "response": "A dysregulated host response to infection."}
# One row of each bad kind, at lines 2-5 of a JSONL file whose lines 1 and 6 are good (lines as an
# editor numbers them, from 1).
BAD = [
    ({"response": "a"}, "line 2, column 'question': missing or null"),  # no such key in the line
    ({"question": None, "response": "a"}, "line 3, column 'question': missing or null"),
    ({"question": "q?", "response": " \n "}, "line 4, column 'response': empty text"),
    ({"question": "q?", "response": ["a", "list"]}, "line 5, column 'response': expected text, got list"),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("index", range(len(BAD)))
def test_each_bad_row_kind_stops_with_row_and_column_named(tmp_path, index):
    rows = [GOOD, GOOD, GOOD, GOOD, GOOD, GOOD]
    rows[index + 1] = BAD[index][0]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_pairs(DataConfig(dataset=str(path)))
    assert BAD[index][1] in str(err.value) and str(path) in str(err.value)
    assert "data.bad_rows=skip" in str(err.value)  # the way out is named too


def test_bad_rows_skip_leaves_out_exactly_the_bad_rows_and_lists_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, *(row for row, _ in BAD), {**GOOD, "question": "Last?"}])
    pairs = load_pairs(DataConfig(dataset=str(path), bad_rows="skip"))
    assert pairs.rows == [0, 5] and pairs.questions == ["What is sepsis?", "Last?"]
    assert len(pairs.skipped) == 4
    for (_, problem), skipped in zip(BAD, pairs.skipped):
        assert skipped.startswith(problem)


def encode(tokenizer, questions, **cfg):
    cfg = DataConfig(**cfg)
    pairs = Pairs("d.jsonl", questions, ["Yes."] * len(questions), list(range(len(questions))))
    return encode_pairs(pairs, tokenizer, cfg, MASKS[cfg.mask])


def test_a_prompt_alone_over_max_length_is_named_or_skipped(tokenizer):
    questions = ["Short?", "very " * 40, "Also short?"]
    with pytest.raises(DataError, match=r"d\.jsonl: row 1 \(counted from 0\), column 'question': the prompt alone is \d+ tokens"):
        encode(tokenizer, questions, max_length=24)
    enc = encode(tokenizer, questions, max_length=24, bad_rows="skip")
    assert [e["row"] for e in enc.examples] == [0, 2]
    assert len(enc.skipped) == 1 and enc.skipped[0].startswith("row 1 (counted from 0), column 'question': the prompt alone")


def test_summary_counts_skips_and_truncations_and_refuses_an_empty_split(tokenizer):
    cfg = DataConfig(dataset="d.jsonl", max_length=24, bad_rows="skip")
    pairs = Pairs("d.jsonl", ["Short?", "very " * 40, "Why " * 3], ["Yes."] * 3, [0, 1, 2],
                  skipped=["row 9, column 'response': empty text"])
    train, val = (encode_pairs(part, tokenizer, cfg, MASKS[cfg.mask]) for part in subsets(pairs, [0, 1], [2]))
    said = []
    stats = summarize_data(cfg, pairs, train, val, said.append)
    assert stats == {"data_train_pairs": 1, "data_val_pairs": 1, "data_truncated_answers": 0, "data_skipped_rows": 2,
                     "data_dropped_duplicates": 0, "data_val_duplicates": 0}
    assert "2 bad rows skipped" in said[0] and "0 validation pairs repeat a training pair" in said[0]
    assert said[1:] == ["data: skipped row 9, column 'response': empty text",
                        f"data: skipped {train.skipped[0]}"]
    long_answer = encode_pairs(Pairs("d", ["Why?"], ["word " * 50], [0]), tokenizer, cfg, MASKS["completion_only"])
    assert summarize_data(cfg, pairs, long_answer, val, said.append)["data_truncated_answers"] == 1
    with pytest.raises(DataError, match="d.jsonl: the validation split is empty after skipping bad rows"):
        summarize_data(cfg, pairs, train, Encoded([], 0, ["row 4, ..."]), said.append)


def subsets(pairs, *row_lists):
    """``pairs`` cut into the given rows, as split_pairs cuts it."""
    return [Pairs(pairs.source, [pairs.questions[r] for r in rows], [pairs.answers[r] for r in rows], rows)
            for rows in row_lists]


def test_a_split_too_small_for_one_full_window_still_makes_one_step():
    pairs = Pairs("d", ["q1", "q2"], ["a1", "a2"], [0, 1])
    train, val = split_pairs(pairs, 0.2, seed=0)
    assert (len(train), len(val)) == (1, 1)
    # GA 4 x micro-batch 2 over 1 pair: one short window of one micro-batch, i.e. one step.
    assert steps_per_epoch(1, 2, 4) == 1 and accumulation_windows([0], 2, 4) == [[[0]]]
    with pytest.raises(DataError, match="1 rows leave nothing to train on"):
        split_pairs(Pairs("d", ["q"], ["a"], [0]), 0.2, seed=0)


def test_tiny_dataset_with_bad_rows_skipped_trains_and_reports_them(tiny_cfg, tmp_path):
    """End to end: 3 bad rows skipped and counted in metrics.jsonl; 3 training pairs make one
    short window per epoch (GA 4 x 2 wants 8); the step's loss is finite."""
    from medqa_loop.metrics import read_metrics
    from medqa_loop.train import run

    rows = [GOOD, BAD[1][0], {**GOOD, "question": "What is anaemia?"}, BAD[2][0],
            {**GOOD, "question": "Define shock."}, BAD[3][0], {**GOOD, "question": "What is a fever?"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = tiny_cfg(f"data.dataset={path}", "data.bad_rows=skip", "data.val_fraction=0.25", "train.epochs=2",
                   "train.sanity_eval_batches=0")
    last = run(cfg)
    records = read_metrics(f"{cfg.output_dir}/metrics.jsonl")
    data = {k: v for k, v in records[0].items() if k.startswith("data_")}
    assert records[0]["step"] == 0 and data == {"data_train_pairs": 3, "data_val_pairs": 1,
                                                "data_truncated_answers": 0, "data_skipped_rows": 3,
                                                "data_dropped_duplicates": 0, "data_val_duplicates": 0}
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and last["step"] == 2
    assert all(math.isfinite(r["loss"]) and r["target_tokens"] > 0 for r in steps)
    assert math.isfinite(last["eval_loss"])


def test_an_all_masked_micro_batch_adds_nothing_and_an_all_masked_window_is_zero_not_nan(tiny_cfg):
    from medqa_loop.batching import with_targets
    from medqa_loop.loop import backward_window, window_counts
    from medqa_loop.train import prepare_run

    parts = prepare_run(tiny_cfg("lora.dropout=0.0", "data.max_rows=8", "data.max_length=48"))
    with torch.no_grad():  # LoRA B starts at 0; give it values so every gradient is non-trivial
        for n, p in parts.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    real = parts.collate_fn(parts.train_examples[:2])
    masked = parts.collate_fn(parts.train_examples[2:4])
    masked["labels"].fill_(-100)
    masked["loss_weights"].zero_()
    masked = with_targets(masked)  # what the fused loss head reads, derived again

    def window(batches):
        parts.model.zero_grad(set_to_none=True)
        counts = window_counts(parts.accelerator, batches)
        loss_sum = backward_window(parts.accelerator, parts.model, batches, counts[0])
        grads = {n: p.grad.clone() for n, p in parts.model.named_parameters() if p.requires_grad}
        return counts, loss_sum, grads

    _, loss_real, alone = window([real])
    counts, loss_both, with_masked = window([real, masked])
    assert counts[1] == (real["labels"][:, 1:] != -100).sum()  # the masked one adds no targets
    assert torch.equal(loss_both, loss_real)
    assert all(torch.equal(with_masked[n], alone[n]) for n in alone)
    counts, loss_sum, grads = window([masked])
    assert counts[0] == 0 and counts[1] == 0 and loss_sum == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())  # zero, not NaN


def tokenizer_without_eos(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "what": 1, "is": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        (["model.random_init=null", "model.name_or_path=/no/such/mistral"],
         "model path /no/such/mistral is not a model directory"),
        (["model.random_init=null", "model.name_or_path=nobody/no-such-model"],
         "cannot load model 'nobody/no-such-model'"),
        (["data.dataset=/no/such/medqa.jsonl"], "dataset path not found: /no/such/medqa.jsonl"),
        (["data.dataset=nobody/no-such-dataset"],
         "cannot load dataset 'nobody/no-such-dataset': HF_HUB_OFFLINE=1 and it is not in the hub cache"),
        (["model.tokenizer={tmp}/tok"], "tokenizer '{tmp}/tok' has no EOS token"),
        (["train.save_every=0"], "train.save_every"),
        (["train.save_every=2.5"], "train.save_every"),
        (["train.keep_states=0"], "train.keep_states"),
        (["data.bad_rows=drop"], "data.bad_rows"),
        (["train.keep_state=3"], "train.keep_state"),
    ],
    ids=["model-path", "model-hub-offline", "data-path", "data-hub-offline", "no-eos",
         "save-every-0", "save-every-float", "keep-states-0", "bad-rows-value", "typo"],
)
def test_bad_paths_names_and_keys_fail_before_any_model_load(tmp_path, monkeypatch, capsys, overrides, culprit):
    import medqa_loop.model as M

    def boom(*a, **k):
        raise AssertionError("model weights touched despite bad input")

    monkeypatch.setattr(M, "load_base", boom)
    monkeypatch.setattr(M, "build_random_base", boom)
    tokenizer_without_eos(tmp_path / "tok")
    sets = [f"output_dir={tmp_path / 'run'}", *(o.format(tmp=tmp_path) for o in overrides)]
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(TINY), *(a for s in sets for a in ("--set", s))])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert culprit.format(tmp=tmp_path) in err and "Traceback" not in err


def test_new_keys_default_and_load():
    cfg = load_config(TINY, ["train.save_every=null", "data.bad_rows=skip", "train.keep_states=1"])
    assert (cfg.train.save_every, cfg.data.bad_rows, cfg.train.keep_states) == (None, "skip", 1)
    default = load_config()
    assert (default.train.save_every, default.train.keep_states, default.data.bad_rows) == (50, 2, "error")
    with pytest.raises(ConfigError, match="data.bad_rows' must be one of error, skip"):
        load_config(TINY, ["data.bad_rows=Skip"])


def test_a_lora_target_that_names_no_module_fails_before_the_base_loads(tiny_cfg, monkeypatch):
    import medqa_loop.model as M
    from medqa_loop.config import ConfigError
    from medqa_loop.train import prepare_run

    def never(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(M, "load_base", never)
    with pytest.raises(ConfigError, match=r"'qkv_proj' names no linear module of mistral .*q_proj.*v_proj"):
        prepare_run(tiny_cfg("lora.target_modules=[q_proj, qkv_proj]"))


# ---------------------------------------------------------------------------------------------
# Bad data files: named by file and line (as an editor numbers lines, from 1), never a traceback


def good_lines(n):
    return [json.dumps({"question": f"Q{i}?", "response": f"A{i}."}) for i in range(n)]


def jsonl_with_line_3(bad: str) -> bytes:
    lines = good_lines(5)
    lines[2] = bad
    return ("\n".join(lines) + "\n").encode()


BAD_FILES = {
    "json-line": ("d.jsonl", jsonl_with_line_3('{"question": "Q?", "response": oops}'),
                  r"d\.jsonl: line 3: invalid JSON \(Expecting value at column 32\)"),
    "json-not-object": ("d.jsonl", jsonl_with_line_3("[1, 2]"), r"d\.jsonl: line 3: expected a JSON object of columns, got list"),
    "json-document": ("d.json", b'[{"question": "Q?", "response": "A."},\n {"question": "Q2?" "response": "A."}]\n',
                      r"d\.json: line 2, column 21: invalid JSON \(Expecting ',' delimiter\)"),
    "utf8-jsonl": ("d.jsonl", jsonl_with_line_3('{"question": "Q\xff?", "response": "A."}').replace("\xff".encode(), b"\xff"),
                   r"d\.jsonl, line 3: not valid UTF-8 \(byte 0xff"),
    "utf8-csv": ("d.csv", b'question,response\nQ1?,A1.\n"Q2\n\xe9?",A2.\n', r"d\.csv, line 4: not valid UTF-8 \(byte 0xe9"),
    "empty-jsonl": ("d.jsonl", b"", r"d\.jsonl is empty"),
    "blank-jsonl": ("d.jsonl", b"\n  \n", r"d\.jsonl is empty"),
    "empty-csv": ("d.csv", b"", r"d\.csv is empty"),
    "header-only-csv": ("d.csv", b"question,response\n", r"d\.csv holds a header line and no rows"),
    "csv-extra-field": ("d.csv", b'question,response\nQ1?,A1.\n"Q2\n?",A2.,extra\n', r"d\.csv: line 3: 3 fields, the header has 2"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_data_file_is_named_by_file_and_line(tmp_path, case):
    name, content, message = BAD_FILES[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_pairs(DataConfig(dataset=str(tmp_path / name)))
    assert str(tmp_path / name) in str(err.value)


def test_a_bad_data_file_ends_the_cli_in_one_line_before_any_model_load(tmp_path, monkeypatch, capsys):
    import medqa_loop.model as M

    def boom(*a, **k):
        raise AssertionError("model weights touched despite a bad data file")

    monkeypatch.setattr(M, "build_random_base", boom)
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_with_line_3("{not json"))
    with pytest.raises(SystemExit) as exit_:
        main(["--config", TINY, "--set", f"output_dir={tmp_path / 'run'}", "--set", f"data.dataset={path}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # not the reader's own log of the failure too
    assert err.startswith(f"medqa train: error: dataset file {path}: line 3: invalid JSON")


def test_bad_rows_are_named_by_the_line_an_editor_shows(tmp_path):
    """Blank lines, a CRLF line and a quoted CSV cell over two lines do not shift the numbers."""
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'\n'.join([good_lines(1)[0].encode(), b"", b"  ", good_lines(2)[1].encode() + b"\r",
                                  b'{"question": "Q?", "response": ""}']) + b"\n")
    with pytest.raises(DataError, match=r"d\.jsonl: line 5, column 'response': empty text"):
        load_pairs(DataConfig(dataset=str(jsonl)))
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('question,response\n"Two\nlines?",A.\n\nQ?,\nQ3?,A3.\n')
    with pytest.raises(DataError, match=r"d\.csv: line 5, column 'response': missing or null"):
        load_pairs(DataConfig(dataset=str(csv_file)))
    pairs = load_pairs(DataConfig(dataset=str(csv_file), bad_rows="skip"))
    assert pairs.rows == [0, 2] and pairs.skipped == ["line 5, column 'response': missing or null (expected text, got NoneType)"]


def test_a_row_of_a_table_without_lines_is_named_by_its_index_from_0(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"question": ["Q0?", "Q1?", "Q2?"], "response": ["A0.", "A1.", " "]}).to_parquet(
        str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet: row 2 \(counted from 0\), column 'response': empty text"):
        load_pairs(DataConfig(dataset=str(tmp_path / "d.parquet")))


def test_a_prompt_too_long_is_named_by_its_line_through_the_split(tmp_path, tokenizer):
    rows = [{"question": f"Q{i}?", "response": "A."} for i in range(6)]
    rows[3]["question"] = "very " * 40
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(dataset=str(path), max_length=24, val_fraction=0.5)
    train, val = split_pairs(load_pairs(cfg), cfg.val_fraction, seed=0)
    with pytest.raises(DataError, match=r"d\.jsonl: line 4, column 'question': the prompt alone is \d+ tokens"):
        for part in (train, val):
            encode_pairs(part, tokenizer, cfg, MASKS[cfg.mask])


@pytest.mark.parametrize("content", [[], ["notes.txt"]], ids=["empty", "no-data-files"])
def test_a_directory_that_is_no_dataset_is_named(tmp_path, content):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in content:
        (folder / name).write_text("some notes\n")
    with pytest.raises(DataError, match=r"dataset directory .*folder is neither a datasets\.save_to_disk directory nor a folder of data files"):
        load_pairs(DataConfig(dataset=str(folder)))


# ---------------------------------------------------------------------------------------------
# Validation pairs that repeat a training pair: counted at load; data.dedupe drops repeats first


def test_validation_pairs_repeating_a_training_pair_are_counted_and_dedupe_drops_them(tmp_path, tokenizer):
    rows = [{"question": f"Q{i}?", "response": f"A{i}."} for i in range(8)]
    rows += [rows[0], {**rows[1], "question": " Q1? "}, rows[0], {**rows[2], "response": "Other."}]  # 3 repeats
    path = write_jsonl(tmp_path / "d.jsonl", rows)

    def load(**cfg):
        cfg = DataConfig(dataset=str(path), val_fraction=0.5, **cfg)
        pairs = load_pairs(cfg)
        train, val = split_pairs(pairs, cfg.val_fraction, seed=0)
        said = []
        enc = [encode_pairs(p, tokenizer, cfg, MASKS[cfg.mask]) for p in (train, val)]
        return pairs, train, val, summarize_data(cfg, pairs, *enc, said.append), said

    pairs, train, val, stats, said = load()
    key = {r: (pairs.questions[i].strip(), pairs.answers[i]) for i, r in enumerate(pairs.rows)}
    trained = {key[r] for r in train.rows}
    expected = sum(key[r] in trained for r in val.rows)
    assert len(pairs) == 12 and expected > 0  # seed 0 puts a repeat on each side
    assert stats["data_val_duplicates"] == expected and stats["data_dropped_duplicates"] == 0
    assert f"{expected} validation pairs repeat a training pair" in said[0]
    assert any(line.startswith(f"data: warning: {expected} validation pairs repeat") and "data.dedupe=true" in line
               for line in said)

    pairs, train, val, stats, said = load(dedupe=True)
    assert pairs.rows == list(range(8)) + [11] and pairs.duplicates == 3  # the first of each stays
    assert stats["data_val_duplicates"] == 0 and stats["data_dropped_duplicates"] == 3
    assert "3 repeated pairs dropped (data.dedupe)" in said[0] and not any("warning" in line for line in said)


# ---------------------------------------------------------------------------------------------
# An output directory that cannot be written: one line naming it, before the model loads


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write in: mode 0555, and for root (whom modes do not stop)
    the immutable attribute; skipped where neither holds."""
    import subprocess

    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    try:
        (path / "probe").touch()
    except PermissionError:
        pass
    else:
        (path / "probe").unlink()
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode == 0
        if not immutable:
            pytest.skip("cannot make a directory read-only here (root, and no chattr)")
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


@pytest.mark.parametrize("where", ["read-only", "under-a-file"])
def test_an_output_dir_that_cannot_be_written_fails_before_the_model_loads(tmp_path, read_only_dir, monkeypatch,
                                                                            capsys, where):
    import medqa_loop.model as M

    def boom(*a, **k):
        raise AssertionError("model weights touched despite an unwritable output_dir")

    monkeypatch.setattr(M, "build_random_base", boom)
    monkeypatch.setattr(M, "load_base", boom)
    (tmp_path / "a-file").write_text("x")
    out = read_only_dir if where == "read-only" else tmp_path / "a-file" / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["--config", TINY, "--set", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert f"medqa train: error: output_dir {out} cannot be written" in err and "--set output_dir=" in err

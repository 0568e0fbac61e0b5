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

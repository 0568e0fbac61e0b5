"""Data and labels on the real Mistral tokenizer: BOS/EOS, the prompt mask, padding, bad rows."""

import json

import pytest
import torch

from medqa_loop.batching import collate
from medqa_loop.config import DataConfig
from medqa_loop.data import DataError, Pairs, encode_pairs, load_pairs, split_pairs
from medqa_loop.masking import MASKS, completion_only, full_sequence

CFG = DataConfig(dataset="embedded:sample_medqa")


def encode(tokenizer, questions, answers, **cfg):
    pairs = Pairs("test", questions, answers, list(range(len(questions))))
    cfg = DataConfig(**{"mask": "completion_only", **cfg})
    return encode_pairs(pairs, tokenizer, cfg, MASKS[cfg.mask])


def test_bos_prepended_eos_appended_and_text_round_trips(tokenizer):
    ex = encode(tokenizer, ["What is sepsis?"], ["A dysregulated response to infection."]).examples[0]
    ids = ex["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1 and ids[-1] == tokenizer.eos_token_id == 2
    assert ids.count(1) == 1 and ids.count(2) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        "### Question:\nWhat is sepsis?\n\n### Answer:\nA dysregulated response to infection."
    )


def test_completion_mask_zeroes_exactly_the_prompt_and_padding(tokenizer):
    q, a = ["What is sepsis?", "Define anaemia in one line, please?"], ["Infection gone systemic.", "Low Hb."]
    enc = encode(tokenizer, q, a)
    batch = collate(enc.examples, pad_id=tokenizer.pad_token_id)
    for i, (question, answer) in enumerate(zip(q, a)):
        prompt_ids = tokenizer(CFG.prompt_template.format(input_text=question), add_special_tokens=False).input_ids
        n_prompt = 1 + len(prompt_ids)  # BOS + prompt
        n_real = len(enc.examples[i]["input_ids"])
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        assert (labels[:n_prompt] == -100).all()
        assert torch.equal(labels[n_prompt:n_real], ids[n_prompt:n_real])  # answer + EOS kept
        assert (labels[n_real:] == -100).all() and (batch["attention_mask"][i, n_real:] == 0).all()
        assert tokenizer.decode(ids[n_prompt:n_real], skip_special_tokens=True) == answer
        assert batch["loss_weights"][i].tolist() == [0.0] * n_prompt + [1.0] * (n_real - n_prompt) + [0.0] * (
            batch["input_ids"].shape[1] - n_real
        )


def test_full_sequence_mask_trains_on_prompt_but_never_on_padding(tokenizer):
    enc = encode(tokenizer, ["Q one?", "A much longer question about renal failure?"], ["A.", "B."], mask="full_sequence")
    batch = collate(enc.examples, pad_id=tokenizer.pad_token_id)
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"] != -100, real)
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])


def test_padding_is_dynamic_not_max_length(tokenizer):
    enc = encode(tokenizer, ["Short?", "A somewhat longer question here?"], ["Yes.", "No."], max_length=1024)
    batch = collate(enc.examples, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] == max(len(e["input_ids"]) for e in enc.examples) < 40


def test_long_answer_truncated_from_the_end_prompt_kept(tokenizer):
    enc = encode(tokenizer, ["Why?"], ["word " * 500], max_length=64)
    ex = enc.examples[0]
    assert enc.truncated == 1 and len(ex["input_ids"]) == 64
    assert ex["input_ids"][-1] != tokenizer.eos_token_id  # a cut answer must not teach "stop here"
    n_prompt = 1 + len(tokenizer(CFG.prompt_template.format(input_text="Why?"), add_special_tokens=False).input_ids)
    assert ex["labels"][:n_prompt] == [-100] * n_prompt and -100 not in ex["labels"][n_prompt:]


def test_prompt_longer_than_max_length_names_the_row(tokenizer):
    with pytest.raises(DataError, match=r"row 1 \(counted from 0\), column 'question'.*max_length=16"):
        encode(tokenizer, ["ok?", "very " * 40], ["a", "b"], max_length=16)


def test_embedded_sample_loads_and_splits_deterministically():
    pairs = load_pairs(CFG)
    assert len(pairs) == 120 and all(q.strip() and a.strip() for q, a in zip(pairs.questions, pairs.answers))
    train, val = split_pairs(pairs, 0.2, seed=42)
    assert (len(train), len(val)) == (96, 24)
    assert sorted(train.rows + val.rows) == list(range(120))
    assert split_pairs(pairs, 0.2, seed=42)[1].rows == val.rows != split_pairs(pairs, 0.2, seed=7)[1].rows


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"question": None, "response": "x"}, r"line 3, column 'question'.*NoneType"),
        ({"question": "q", "response": "   "}, r"line 3, column 'response'.*empty"),
        ({"question": "q", "response": 7}, r"line 3, column 'response'.*int"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, problem):
    path = tmp_path / "d.jsonl"
    good = {"question": "q?", "response": "a."}
    path.write_text("\n".join(json.dumps(r) for r in [good, good, row, good]) + "\n")
    with pytest.raises(DataError, match=problem) as err:
        load_pairs(DataConfig(dataset=str(path)))
    assert str(path) in str(err.value)


def test_missing_column_and_missing_path_are_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq?,a.\n")
    with pytest.raises(DataError, match=r"missing column 'response'.*\['question', 'answer'\]"):
        load_pairs(DataConfig(dataset=str(path)))
    assert load_pairs(DataConfig(dataset=str(path), answer_column="answer")).answers == ["a."]
    with pytest.raises(DataError, match="not found"):
        load_pairs(DataConfig(dataset=str(tmp_path / "nope.parquet")))


def test_parquet_and_saved_datasets_directory_load(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"question": ["q1?", "q2?"], "response": ["a1", "a2"]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    for spec in (tmp_path / "d.parquet", tmp_path / "saved"):
        assert load_pairs(DataConfig(dataset=str(spec))).questions == ["q1?", "q2?"]


def test_builtin_masks():
    from medqa_loop.masking import MaskInput

    ex = MaskInput([1, 5, 6, 7, 8, 2], prompt_len=3, row=0)
    assert completion_only(ex) == [0, 0, 0, 1, 1, 1] and full_sequence(ex) == [1] * 6
    assert ex.answer_span == (3, 6)


# ---------------------------------------------------------------------------------------------
# A folder of data files, and a hub dataset read offline from the hub cache


def write_parquet(path, questions, responses):
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"question": questions, "response": responses}).to_parquet(str(path))
    return path


CARD = b"---\nlicense: apache-2.0\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n---\n"


def test_a_folder_of_data_files_loads_by_split(tmp_path):
    snapshot = tmp_path / "snapshot"  # the layout of a hub dataset's snapshot
    write_parquet(snapshot / "data" / "train-00000-of-00001.parquet", ["q1?", "q2?"], ["a1", "a2"])
    (snapshot / "README.md").write_bytes(CARD)
    pairs = load_pairs(DataConfig(dataset=str(snapshot)))
    assert pairs.questions == ["q1?", "q2?"] and pairs.source.endswith("train-00000-of-00001.parquet")

    shards = tmp_path / "shards"  # JSONL files, a split per file name; two train shards, rows in order
    for name, rows in {"train-0.jsonl": ["t1?", "t2?"], "train-1.jsonl": ["t3?"], "test.jsonl": ["e1?"]}.items():
        (shards / "data").mkdir(parents=True, exist_ok=True)
        (shards / "data" / name).write_text("".join(json.dumps({"question": q, "response": "a"}) + "\n" for q in rows))
    assert load_pairs(DataConfig(dataset=str(shards))).questions == ["t1?", "t2?", "t3?"]
    assert load_pairs(DataConfig(dataset=str(shards), split="test")).questions == ["e1?"]
    with pytest.raises(DataError, match=r"has splits \['train', 'test'\], not 'validation'"):
        load_pairs(DataConfig(dataset=str(shards), split="validation"))
    (shards / "data" / "test.jsonl").write_text('{"question": "e1?", "response": ""}\n')
    with pytest.raises(DataError, match=r"test\.jsonl: line 1, column 'response': empty text"):  # one file: its lines
        load_pairs(DataConfig(dataset=str(shards), split="test"))


def fake_hub_cache(hf_home, repo_id, files: dict, revision="0123456789abcdef0123456789abcdef01234567"):
    """A dataset in the hub cache as snapshot_download leaves it: blobs named by their hash, the
    snapshot's files links to them, refs/main naming the snapshot."""
    import hashlib
    import os

    repo = hf_home / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


LOAD_BY_NAME = """
import sys
from medqa_loop.config import DataConfig
from medqa_loop.data import DataError, load_pairs
try:
    pairs = load_pairs(DataConfig(dataset=sys.argv[1], bad_rows=sys.argv[2]))
except DataError as e:
    print("DataError:", e)
else:
    print(len(pairs), pairs.questions[:2], pairs.skipped, pairs.source)
"""


def load_by_name(name, hf_home, bad_rows="error"):
    """load_pairs of the installed package in a process whose environment says where the hub
    cache is (HF_HOME), offline."""
    import subprocess
    import sys

    from conftest import subprocess_env

    env = subprocess_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", LOAD_BY_NAME, name, bad_rows], capture_output=True, text=True,
                          timeout=300, env=env, cwd=hf_home.parent, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_a_hub_dataset_loads_by_name_offline_from_the_hub_cache(tmp_path):
    """The real dataset's layout (one train split, question/response, one parquet file: see
    /work/shared/dataset-facts.md), with one empty answer to see how a row is named."""
    rows = 40
    parquet = write_parquet(tmp_path / "made.parquet", [f"What is condition {i}?" for i in range(rows)],
                            [f"Answer {i}, in several paragraphs." if i != 7 else "" for i in range(rows)])
    hf_home = tmp_path / "hf"
    snapshot = fake_hub_cache(hf_home, "thesven/SyntheticMedicalQA-4336", {
        "data/train-00000-of-00001.parquet": parquet.read_bytes(), "README.md": CARD, ".gitattributes": b"*.parquet filter=lfs\n",
    })
    said = load_by_name("thesven/SyntheticMedicalQA-4336", hf_home)
    assert said.startswith("DataError: dataset thesven/SyntheticMedicalQA-4336 (") and str(snapshot) in said
    assert "train-00000-of-00001.parquet): row 7 (counted from 0), column 'response': empty text" in said
    said = load_by_name("thesven/SyntheticMedicalQA-4336", hf_home, bad_rows="skip")
    assert said.startswith(f"{rows - 1} ['What is condition 0?', 'What is condition 1?']")

    said = load_by_name("thesven/not-downloaded", hf_home)
    assert said.startswith("DataError: cannot load dataset 'thesven/not-downloaded': HF_HUB_OFFLINE=1 and it is "
                           f"not in the hub cache {hf_home / 'hub'} (no snapshot of it there)")


def test_a_100k_row_file_loads_in_seconds(tmp_path):
    """Reading the texts item by item from datasets' lazy Column took ~20 s for 100k pairs; as
    lists, well under a second (a wide margin for a loaded machine)."""
    import time

    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{i}?", "response": f"A{i}."}) + "\n" for i in range(100_000)))
    start = time.perf_counter()
    pairs = load_pairs(DataConfig(dataset=str(path)))
    assert len(pairs) == 100_000 and pairs.questions[-1] == "Q99999?"
    assert time.perf_counter() - start < 8

"""Answering questions with a trained adapter (medqa_loop.generate, ``medqa generate``): the
training prompt, the 8-bit base, greedy and seeded sampling, answers sampled during training, and
clear errors before any weights load."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medqa_loop.checkpoint.adapter import adapter_tokenizer, load_adapted_model, resolve_adapter
from medqa_loop.cli import main
from medqa_loop.config import DataConfig
from medqa_loop.data import DataError, Pairs, encode_pairs, encode_prompt, load_pairs, split_pairs
from medqa_loop.generate import GenerationSettings, answer_questions, generate_answer, read_questions
from medqa_loop.masking import MASKS
from medqa_loop.metrics import read_metrics

from conftest import BASE_CODE_RAN, subprocess_env


def final_adapter(cfg) -> Path:
    return Path(cfg.output_dir) / "final"


def run_main(capsys, *argv):
    """``medqa generate ...`` in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main(["generate", *(str(a) for a in argv)])
    code = exit_.value.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("template", [DataConfig.prompt_template, "Q: {input_text}\nA:"])
def test_generation_prompt_is_exactly_the_training_prefix(tokenizer, template):
    """The tokens generation starts from are the first prompt_len tokens training saw."""
    questions = [
        *load_pairs(DataConfig(dataset="embedded:sample_medqa", max_rows=5)).questions,
        "Dose of {drug} in µg/kg?",  # braces and non-ASCII in the question itself
        "Line one\nline two?",
    ]
    pairs = Pairs("test", questions, ["An answer."] * len(questions), list(range(len(questions))))
    cfg = DataConfig(prompt_template=template)
    for q, ex in zip(questions, encode_pairs(pairs, tokenizer, cfg, MASKS["completion_only"]).examples):
        prompt_len = ex["loss_weights"].index(1.0)
        assert encode_prompt(tokenizer, q, template) == ex["input_ids"][:prompt_len]
        assert ex["input_ids"][0] == tokenizer.bos_token_id


def test_answers_sampled_in_training_equal_the_cli_answers(trained_run, capsys):
    """samples.jsonl holds the first 2 validation questions at every evaluation; at the last one
    the model is the saved final adapter, so the CLI (8-bit base, tokenizer saved with the
    adapter, run's template, greedy) must give the very same answers."""
    out = Path(trained_run.output_dir)
    _, val = split_pairs(load_pairs(trained_run.data), trained_run.data.val_fraction, trained_run.seed)
    samples = read_metrics(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [0, 0, 2, 2, 4, 4]
    assert [s["question"] for s in samples] == val.questions[:2] * 3
    assert [s["reference"] for s in samples] == val.answers[:2] * 3
    assert [s["row"] for s in samples] == val.rows[:2] * 3
    assert all(s["generated"].strip() for s in samples)

    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(0.0 <= r["eval_token_acc"] <= 1.0 for r in evals)

    code, stdout, err = run_main(
        capsys, "--adapter", final_adapter(trained_run), "--max-new-tokens", 12, "--jsonl", *val.questions[:2]
    )
    assert code == 0, err
    answers = [json.loads(line) for line in stdout.splitlines()]
    assert answers == [{"question": s["question"], "answer": s["generated"]} for s in samples[-2:]]


def test_answer_questions_takes_the_command_line_then_the_file(trained_run, tmp_path):
    """The function behind ``medqa generate``: questions given, then those of ``file`` (its
    column defaulting to the run's data.question_column), answered greedily as in training."""
    out = Path(trained_run.output_dir)
    samples = read_metrics(out / "samples.jsonl")[-2:]  # the final model's answers at step 4
    table = tmp_path / "qs.jsonl"
    table.write_text(json.dumps({"question": samples[1]["question"]}) + "\n")
    got = answer_questions(final_adapter(trained_run), [samples[0]["question"]], GenerationSettings(12), file=str(table))
    assert got == [{"question": s["question"], "answer": s["generated"]} for s in samples]


def test_an_adapters_config_runs_none_of_the_code_it_names(adapter_naming_code, import_probe, capsys):
    """Its config.yaml gives the template and the base's settings; its mask and hook are never
    imported, and its model.trust_remote_code does not let the base's own code run."""
    code, stdout, err = run_main(capsys, "--adapter", adapter_naming_code, "--max-new-tokens", 4, "What is sepsis?")
    assert code == 0, err
    assert "### Question:\nWhat is sepsis?\n### Answer:\n" in stdout
    assert not import_probe.exists() and not (adapter_naming_code.parent / BASE_CODE_RAN).exists()


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies a repository's code into its modules cache to run it: a temporary one
    here, so that the test leaves ~/.cache and sys.path as they were."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # init_hf_modules appends the cache to it
    yield
    for name in [m for m in sys.modules if m.split(".")[0] == "transformers_modules"]:
        del sys.modules[name]


def test_the_bases_own_code_runs_only_with_trust_remote_code(adapter_naming_code, import_probe, modules_cache, capsys):
    argv = ["--adapter", adapter_naming_code, "--max-new-tokens", 4, "--trust-remote-code", "What is sepsis?"]
    code, _, err = run_main(capsys, *argv)
    assert code == 0, err
    assert (adapter_naming_code.parent / BASE_CODE_RAN).exists()  # the user asked for it
    assert not import_probe.exists()  # the mask and hook: still never


def test_sampling_is_seeded_and_differs_from_greedy(trained_run):
    from transformers import set_seed

    src = resolve_adapter(final_adapter(trained_run))
    model = load_adapted_model(src, src.run.model, torch.device("cpu"))
    tok = adapter_tokenizer(src)
    q, template = "What is sepsis?", src.run.data.prompt_template

    def answer(seed, temperature):
        set_seed(seed)
        return generate_answer(model, tok, q, template, GenerationSettings(16, temperature, 0.95))

    greedy = answer(0, 0.0)
    assert answer(1, 0.0) == greedy  # greedy ignores the seed
    sampled = answer(1, 1.0)
    assert answer(1, 1.0) == sampled != answer(2, 1.0)
    assert sampled != greedy


@pytest.mark.slow
def test_cli_answers_a_file_offline_in_a_subprocess(trained_run, tmp_path):
    """As a user runs it: another working directory, hub access off, a .txt of questions."""
    questions = tmp_path / "q.txt"
    questions.write_text("What is sepsis?\n\nWhat causes anaemia?\n")
    proc = subprocess.run(
        [sys.executable, "-m", "medqa_loop", "generate", "--adapter", str(final_adapter(trained_run)),
         "--file", str(questions), "--max-new-tokens", "8"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=subprocess_env(HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("### Answer:\n") == 2
    assert "### Question:\nWhat is sepsis?\n" in proc.stdout and "What causes anaemia?" in proc.stdout


def test_read_questions_from_text_and_tables(tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_text("First?\n\n  \nSecond?\n")
    assert read_questions(txt, "question") == ["First?", "Second?"]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text('{"q": "One?", "a": "x"}\n{"q": "Two?", "a": "y"}\n')
    assert read_questions(jsonl, "q") == ["One?", "Two?"]
    with pytest.raises(DataError, match=r"missing column 'question'.*\['q', 'a'\]"):
        read_questions(jsonl, "question")
    jsonl.write_text('{"q": "One?"}\n{"q": " "}\n')
    with pytest.raises(DataError, match=r"q\.jsonl: line 2, column 'q': empty text"):
        read_questions(jsonl, "q")
    with pytest.raises(DataError, match="questions file not found"):
        read_questions(tmp_path / "nope.txt", "question")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="holds no questions"):
        read_questions(tmp_path / "blank.txt", "question")


@pytest.fixture(scope="module")
def other_bases(trained_run, tmp_path_factory, tokenizer):
    """Random-init bases of another hidden size and of a shallower and a deeper depth than the trained one."""
    from medqa_loop.model import build_random_base

    root = tmp_path_factory.mktemp("other_bases")
    made = {}
    for name, change in {"hidden64": {"hidden_size": 64}, "layers1": {"num_hidden_layers": 1},
                         "layers3": {"num_hidden_layers": 3}}.items():
        model_cfg = dataclasses.replace(
            trained_run.model, random_init={**trained_run.model.random_init, **change}
        )
        made[name] = build_random_base(model_cfg, tokenizer, root / name, seed=0)
    return made


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_dir", ["adapter directory not found", "no-such-run"]),
        ("not_adapter", ["is not a PEFT adapter directory", "adapter_config.json"]),
        ("empty_question", ["question 2 on the command line is empty"]),
        ("empty_in_file", ["line 2, column 'question': empty text", "qs.jsonl"]),
        ("missing_base", ["not a model directory", "no-such-base"]),
        ("hidden64", ["does not fit base", "has 128 outputs in the adapter but 64 in the base", "hidden size 64"]),
        ("layers1", ["does not fit base", "model.layers.1.", "num_hidden_layers=1"]),
        ("layers3", ["does not fit base", "it adapts 2 decoder layers", "num_hidden_layers=3"]),
        ("long_question", ["question 1 is", "data.max_length=512", "shorten it"]),
    ],
)
def test_clear_errors_before_any_weights_load(
    case, expected, trained_run, other_bases, tmp_path, monkeypatch, capsys
):
    import medqa_loop.model as M

    def boom(*a, **k):
        raise AssertionError("base weights loaded despite bad input")

    monkeypatch.setattr(M, "load_base", boom)
    monkeypatch.setattr("medqa_loop.checkpoint.adapter.load_base", boom)
    adapter = final_adapter(trained_run)
    (tmp_path / "qs.jsonl").write_text('{"question": "ok?"}\n{"question": ""}\n')
    argv = {
        "missing_dir": ["--adapter", tmp_path / "no-such-run", "q?"],
        "not_adapter": ["--adapter", trained_run.output_dir, "q?"],
        "empty_question": ["--adapter", adapter, "q?", "   "],
        "empty_in_file": ["--adapter", adapter, "--file", tmp_path / "qs.jsonl"],
        "missing_base": ["--adapter", adapter, "--base", tmp_path / "no-such-base", "q?"],
        "hidden64": ["--adapter", adapter, "--base", other_bases.get("hidden64"), "q?"],
        "layers1": ["--adapter", adapter, "--base", other_bases.get("layers1"), "q?"],
        "layers3": ["--adapter", adapter, "--base", other_bases.get("layers3"), "q?"],
        "long_question": ["--adapter", adapter, "why? " * 2000],
    }[case]
    code, _, err = run_main(capsys, *argv)
    assert code == 2
    for text in expected:
        assert text in err
    assert "Traceback" not in err and "size mismatch" not in err

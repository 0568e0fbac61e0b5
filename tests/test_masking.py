"""Loss masks: the built-ins on real tokenizer output, custom masks by import path (imported when
training tokenizes, checked before they are called) and their effect on the gradient, fully masked
micro-batches, and the README's example through the real loop."""

import dataclasses
import math
import re
import sys

import pytest
import torch

from conftest import ROOT, TINY, BaseLoaded
from medqa_loop.batching import accumulation_windows, collate, epoch_order
from medqa_loop.cli import main
from medqa_loop.config import ConfigError, DataConfig, load_config
from medqa_loop.data import encode_pairs, load_pairs, split_pairs
from medqa_loop.loop import Hooks, backward_window, train, window_counts
from medqa_loop.losses import token_losses
from medqa_loop.masking import MASKS, PROMPT_WEIGHT, resolve_mask
from medqa_loop.metrics import MetricsLog, read_metrics
from medqa_loop.train import prepare_run
from test_loop import grads, rel_diff, window_grad

BUILTINS = {"completion_only", "full_sequence", "prompt_weighted"}


def expected_weights(mask: str, n_prompt: int, n_tokens: int) -> list[float]:
    """What each built-in claims, given where the prompt ends."""
    prompt = {"completion_only": 0.0, "full_sequence": 1.0, "prompt_weighted": PROMPT_WEIGHT}[mask]
    return [prompt] * n_prompt + [1.0] * (n_tokens - n_prompt)


@pytest.mark.parametrize("mask", sorted(BUILTINS))
def test_builtin_masks_weight_exactly_what_they_claim_on_real_tokens(tokenizer, mask):
    cfg = DataConfig(dataset="embedded:sample_medqa", mask=mask, max_rows=4)
    pairs = load_pairs(cfg)
    examples = encode_pairs(pairs, tokenizer, cfg, resolve_mask(mask)).examples
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    for i, (question, answer, ex) in enumerate(zip(pairs.questions, pairs.answers, examples)):
        # Where the prompt ends, from tokenizing the prompt alone (BOS + prompt).
        n_prompt = 1 + len(tokenizer(cfg.prompt_template.format(input_text=question), add_special_tokens=False).input_ids)
        n = len(ex["input_ids"])
        assert tokenizer.decode(ex["input_ids"][n_prompt:], skip_special_tokens=True) == answer
        want = expected_weights(mask, n_prompt, n)
        assert ex["loss_weights"] == want
        assert ex["labels"] == [t if w > 0 else -100 for t, w in zip(ex["input_ids"], want)]
        assert torch.equal(batch["loss_weights"][i], torch.tensor(want + [0.0] * (width - n)))  # pads never count
        assert (batch["labels"][i, n:] == -100).all()


def test_every_builtin_is_covered():
    assert {name for name, fn in MASKS.items() if fn.__module__ == "medqa_loop.masking"} == BUILTINS


def encoded(cfg, tokenizer, mask: str) -> list[dict]:
    train_pairs, _ = split_pairs(load_pairs(cfg.data), cfg.data.val_fraction, cfg.seed)
    return encode_pairs(train_pairs, tokenizer, cfg.data, resolve_mask(mask)).examples


def short_examples(examples, parity: int, n: int = 2) -> list[int]:
    """Indices of the n shortest examples whose dataset row has the given parity (cheap forwards)."""
    idx = sorted((i for i, e in enumerate(examples) if e["row"] % 2 == parity), key=lambda i: len(examples[i]["input_ids"]))
    return idx[:n]


def test_custom_mask_by_import_path_changes_the_gradient_as_expected(lora_parts):
    """``user_plugins:even_rows_only`` (selected through the config) drops odd rows: the window's
    gradient is exactly that of its even rows alone under completion_only, and not that of all."""
    cfg, parts = lora_parts
    custom = load_config(TINY, ["data.mask=user_plugins:even_rows_only"])
    with_mask = dataclasses.replace(parts, train_examples=encoded(custom, parts.tokenizer, custom.data.mask))
    (e1, e2), (o1, o2) = short_examples(parts.train_examples, 0), short_examples(parts.train_examples, 1)
    got = window_grad(with_mask, [[e1, o1], [o2, e2]])
    assert rel_diff(got, window_grad(parts, [[e1], [e2]])) < 1e-5
    assert rel_diff(got, window_grad(parts, [[e1, o1], [o2, e2]])) > 0.05
    parts.model.zero_grad(set_to_none=True)


def test_weights_are_normalised_exactly_and_bool_masks_work(lora_parts):
    cfg, parts = lora_parts
    tripled = dataclasses.replace(parts, train_examples=encoded(cfg, parts.tokenizer, "user_plugins:completion_x3"))
    groups = [short_examples(parts.train_examples, 0), short_examples(parts.train_examples, 1)]
    assert rel_diff(window_grad(tripled, groups), window_grad(parts, groups)) < 1e-6
    as_bools = encoded(cfg, parts.tokenizer, "user_plugins:answer_as_bools")
    assert [e["loss_weights"] for e in as_bools] == [e["loss_weights"] for e in parts.train_examples]
    parts.model.zero_grad(set_to_none=True)


def test_fully_masked_micro_batch_and_window_give_no_nan(lora_parts):
    cfg, parts = lora_parts
    acc, model = parts.accelerator, parts.model
    examples = encoded(cfg, parts.tokenizer, "user_plugins:even_rows_only")
    even, odd = short_examples(examples, 0), short_examples(examples, 1)
    batch = lambda idx: parts.collate_fn([examples[i] for i in idx])  # noqa: E731

    micro_losses = []
    model.zero_grad(set_to_none=True)
    window = [batch(even), batch(odd)]  # micro-batch 1: every token masked
    backward_window(acc, model, window, window_counts(acc, window)[0], lambda i, b, loss: micro_losses.append(float(loss)))
    with_masked = grads(model)
    assert micro_losses[1] == 0.0 and all(torch.isfinite(g).all() for g in with_masked.values())
    model.zero_grad(set_to_none=True)
    backward_window(acc, model, [batch(even)], window_counts(acc, [batch(even)])[0])
    assert all(torch.equal(with_masked[k], g) for k, g in grads(model).items())  # it added exactly 0

    model.zero_grad(set_to_none=True)
    counts = window_counts(acc, [batch(odd)])
    loss_sum = backward_window(acc, model, [batch(odd)], counts[0])  # the whole window masked
    assert counts[0] == 0 and loss_sum == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads(model).values())
    model.zero_grad(set_to_none=True)


def test_a_mask_by_import_path_is_imported_when_training_tokenizes(tiny_cfg, import_probe, no_base):
    cfg = tiny_cfg("data.mask=import_probe:mask")
    assert not import_probe.exists()  # reading the config ran nothing
    with pytest.raises(BaseLoaded):
        prepare_run(cfg)
    # Imported by training, and called once per pair of the data as it was tokenized.
    assert import_probe.exists()
    assert sorted(sys.modules["import_probe"].MASKED_ROWS) == sorted(load_pairs(cfg.data).rows)


@pytest.mark.parametrize(
    "spec, names",
    [
        ("user_plugins:record", ["'user_plugins:record' takes record(step, model, batches)",
                                 "called as record(example)", "missing a required argument: 'model'"]),
        ("user_plugins:CALLS", ["'user_plugins:CALLS' is not callable (a list)"]),
        ("user_plugins:nope", ["cannot import 'user_plugins:nope'", "has no 'nope'"]),
        ("broken_plugin:mask", ["cannot import 'broken_plugin:mask'", "RuntimeError: broken_plugin fails"]),
    ],
)
def test_a_mask_that_cannot_be_called_as_a_mask_is_refused_before_the_base_loads(
    spec, names, tmp_path, no_base, capsys
):
    """One line naming the key and the spec, exit 2, before any pair is masked or the base loads."""
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", TINY, "--set", f"output_dir={tmp_path / 'run'}", "--set", f"data.mask={spec}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("medqa train: error: config key 'data.mask': ")
    for name in names:
        assert name in err
    assert "Traceback" not in err


def test_an_import_error_in_a_mask_keeps_its_cause():
    with pytest.raises(ConfigError, match="config key 'data.mask': cannot import 'broken_plugin:mask'") as err:
        resolve_mask("broken_plugin:mask")
    assert isinstance(err.value.__cause__, RuntimeError)


def readme_mask_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Loss masks", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_mask_example_runs_through_the_real_loop(tiny_cfg, tmp_path, monkeypatch):
    """The README's ten-line mask, imported by path, drives the loop's first step: the logged loss
    is the README's weighting of the token losses, not the plain completion mean."""
    code = readme_mask_example()
    assert len(code.strip().splitlines()) <= 10
    (tmp_path / "readme_masks.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = re.search(r"def (\w+)\(", code).group(1)
    cfg = tiny_cfg(f"data.mask=readme_masks:{name}", "data.batching=pad", "lora.dropout=0.0", "train.max_steps=1", "train.sanity_eval_batches=0")
    parts = prepare_run(cfg)

    t = cfg.train
    window = accumulation_windows(epoch_order(len(parts.train_examples), cfg.seed, 0), t.micro_batch_size, t.grad_accum_steps)[0]
    weighted = plain = weight_sum = tokens = 0.0
    parts.model.train()  # as the loop runs it (dropout is 0: the forward is deterministic)
    with torch.no_grad():
        for mb in window:
            batch = parts.collate_fn([parts.train_examples[i] for i in mb])
            for i in mb:
                ex = parts.train_examples[i]
                start, n = next(k for k, label in enumerate(ex["labels"]) if label != -100), len(ex["input_ids"])
                # The README's claim, written out: 0 on the prompt, 2 on 20 answer tokens, then 1.
                want = [0.0] * start + [2.0] * min(20, n - start) + [1.0] * max(0, n - start - 20)
                assert ex["loss_weights"] == want
            logits = parts.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            losses = token_losses(logits, batch["labels"])
            weighted += float((losses * batch["loss_weights"][:, 1:]).sum())
            weight_sum += float(batch["loss_weights"][:, 1:].sum())
            plain += float(losses.sum())
            tokens += float((batch["labels"][:, 1:] != -100).sum())

    train(parts, Hooks(log=MetricsLog(parts.out / "metrics.jsonl")))
    logged = [r for r in read_metrics(parts.out / "metrics.jsonl") if "loss" in r]
    assert len(logged) == 1 and math.isfinite(logged[0]["loss"])
    assert logged[0]["loss"] == pytest.approx(weighted / weight_sum, rel=1e-6)
    # The weights mattered: the plain mean is ~1e-4 away (the random model's token losses are all
    # ~11, so weighting moves the mean little), 50x the tolerance above.
    assert abs(weighted / weight_sum - plain / tokens) > 5e-5 * plain / tokens

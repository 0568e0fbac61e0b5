"""Merging the trained adapter into a 16-bit base (medqa_loop.export, ``medqa export``): a plain
transformers model, same logits."""

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import BASE_CODE_RAN

from medqa_loop.batching import collate
from medqa_loop.checkpoint.adapter import load_adapted_model, resolve_adapter
from medqa_loop.cli import main as cli_main
from medqa_loop.data import encode_pairs, load_pairs, split_pairs
from medqa_loop.masking import resolve_mask
from medqa_loop.model import load_base, load_tokenizer

CPU = torch.device("cpu")


def export(argv: list[str]) -> int:
    """``medqa export ...`` in-process: its exit code (the CLI always ends with SystemExit)."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(["export", *argv])
    return exit_.value.code


@pytest.fixture(scope="module")
def reference(trained_run):
    """A validation batch and the training model's (int8 base + adapter, fp32) logits on it."""
    cfg = trained_run
    tok = load_tokenizer(cfg.model)
    _, val = split_pairs(load_pairs(cfg.data), cfg.data.val_fraction, cfg.seed)
    batch = collate(encode_pairs(val, tok, cfg.data, resolve_mask(cfg.data.mask)).examples[:4], tok.pad_token_id)
    src = resolve_adapter(Path(cfg.output_dir) / "final")
    return src, batch, logits(load_adapted_model(src, src.run.model, CPU), batch)


def logits(model, batch) -> torch.Tensor:
    """fp32 logits at the real (non-pad) positions."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out.float()[batch["attention_mask"].bool()]


# Max |Δlogit| of the merged model vs base + adapter unmerged in the same dtype (the tiny model's
# logits have std ~1.1, |max| ~6). Merging rounds W + B·A once in the export dtype: exact to fp32
# rounding in float32; observed 0.016 (float16) and 0.12 (bfloat16, 8-bit mantissa).
SAME_DTYPE_TOL = {"float32": 1e-4, "float16": 0.05, "bfloat16": 0.3}
# Against the int8 model training ran (LLM.int8 base, fp32 LoRA), every export differs by the
# base's int8 quantization error: observed max 0.26, greedy token agreement ~95%.
INT8_TOL, INT8_ARGMAX_AGREEMENT = 0.5, 0.9


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_exported_model_is_plain_transformers_with_the_adapters_logits(dtype, reference, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralForCausalLM

    src, batch, int8_logits = reference
    out = tmp_path / "merged"
    assert export(["--adapter", str(src.path), "--out", str(out), "--dtype", dtype]) == 0
    assert f"saved to {out}" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged) is MistralForCausalLM and merged.dtype == getattr(torch, dtype)
    assert not any("lora" in name for name in merged.state_dict())
    assert getattr(merged.config, "quantization_config", None) is None and merged.config.use_cache
    saved_tok = AutoTokenizer.from_pretrained(out)
    assert saved_tok("What is sepsis?").input_ids == load_tokenizer(src.run.model)("What is sepsis?").input_ids

    got = logits(merged, batch)
    unquantized = dataclasses.replace(src.run.model, load_in_8bit=False, dtype=dtype)
    unmerged = logits(load_adapted_model(src, unquantized, CPU), batch)
    base_only = logits(load_base(unquantized, src.base, CPU), batch)
    assert (got - unmerged).abs().max() < SAME_DTYPE_TOL[dtype]
    # The adapter is really in there: without it the logits move by far more than the tolerance.
    assert (base_only - unmerged).abs().max() > 1.0
    assert (got - int8_logits).abs().max() < INT8_TOL
    assert (got.argmax(-1) == int8_logits.argmax(-1)).float().mean() > INT8_ARGMAX_AGREEMENT


def test_an_adapters_config_runs_none_of_the_code_it_names(adapter_naming_code, import_probe, tmp_path, capsys):
    out = tmp_path / "merged"
    code = export(["--adapter", str(adapter_naming_code), "--out", str(out), "--dtype", "float32"])
    assert code == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file()
    assert not import_probe.exists() and not (adapter_naming_code.parent / BASE_CODE_RAN).exists()


def test_export_refuses_to_clobber(reference, tmp_path, capsys):
    src = reference[0]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    for out, flags, message in [
        (busy, [], "exists and is not empty; pass --overwrite"),
        (src.path.parent, ["--overwrite"], "would overwrite the adapter"),  # the run directory
    ]:
        code = export(["--adapter", str(src.path), "--out", str(out), *flags])
        assert code == 2 and message in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "mine" and (src.path / "adapter_config.json").is_file()
    code = export(["--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 2 and "medqa export: error: adapter directory not found" in capsys.readouterr().err

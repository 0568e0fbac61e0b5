"""What the fast path says it runs, and its refusal to run slowly in silence on CUDA."""

import sys

import pytest

from medqa_loop.kernels import ops
from medqa_loop.kernels.patch import FastPathError, check_fast_path, describe, fast_path_report


def test_the_report_counts_every_swapped_module_of_the_tiny_model(lora_parts):
    cfg, parts = lora_parts  # LLM.int8 matmul (model.int8_matmul=bnb): its LoRA linears stay PEFT's
    report = fast_path_report(parts.model, cfg, "cpu")
    layers = parts.model.config.num_hidden_layers
    assert report["lora_linears"] == 7 * layers and report["fused_lora_linears"] == 0
    assert report["fused_rmsnorms"] == 2 * layers + 1 and report["fused_mlps"] == report["fused_rotary"] == layers
    assert report["dequantized_linears"] == 0 and report["int8_matmul"].startswith("bnb")
    assert report["kernels"] == "eager reference" and report["attention"] == "varlen (one SDPA per pair)"


def test_the_default_path_is_reported_at_start_and_on_the_first_metrics_line(tiny_cfg):
    from medqa_loop.metrics import read_metrics
    from medqa_loop.train import run

    cfg = tiny_cfg("train.max_steps=1", "train.sanity_eval_batches=0")
    run(cfg)
    first = read_metrics(f"{cfg.output_dir}/metrics.jsonl")[0]
    assert first["step"] == 0 and first["fused_lora_linears"] == first["lora_linears"] == first["dequantized_linears"] == 14
    assert first["fused_rotary"] == 2 and first["kernels"] == "eager reference"
    assert "14 of 14 LoRA linears" in describe(first)


def report_with(**changes):
    report = {
        "attention": "varlen", "int8_matmul": "dequant", "fused_ops": True, "fused_lora_linears": 224,
        "fused_rmsnorms": 65, "fused_mlps": 32, "fused_rotary": 32, "dequantized_linears": 224,
        "lora_linears": 224, "kernels": "triton",
    }
    return {**report, **changes}


def test_on_cuda_a_swap_that_finds_nothing_is_an_error_that_says_how_to_fall_back(tiny_cfg):
    cfg = tiny_cfg()
    check_fast_path(report_with(), cfg, on_cuda=True)  # all there: fine
    with pytest.raises(FastPathError, match=r"no RMSNorms were swapped.*model.fused_ops=false"):
        check_fast_path(report_with(fused_rmsnorms=0), cfg, on_cuda=True)
    with pytest.raises(FastPathError, match="model.int8_matmul=bnb"):
        check_fast_path(report_with(dequantized_linears=0), cfg, on_cuda=True)
    check_fast_path(report_with(fused_rmsnorms=0, kernels="eager reference"), cfg, on_cuda=False)  # the CPU: as it is
    check_fast_path(report_with(fused_mlps=0), tiny_cfg("model.fused_ops=false"), on_cuda=True)  # not asked for


def test_a_missing_triton_module_is_an_error_on_cuda(tiny_cfg, monkeypatch):
    """Faked: the kernel module does not import. ops then falls back to the reference with a
    warning, and on CUDA the check refuses to go on."""
    import medqa_loop.kernels

    monkeypatch.setitem(sys.modules, "medqa_loop.kernels.triton_ops", None)  # import raises ImportError
    monkeypatch.delattr(medqa_loop.kernels, "triton_ops", raising=False)  # imported already (on a GPU)
    ops._triton.cache_clear()
    try:
        with pytest.warns(UserWarning, match="Triton is unavailable"):
            assert not ops.triton_available()
        with pytest.raises(FastPathError, match=r"Triton does not import.*model.fused_ops=false"):
            check_fast_path(report_with(kernels="triton" if ops.triton_available() else "eager reference"),
                            tiny_cfg(), on_cuda=True)
    finally:
        ops._triton.cache_clear()

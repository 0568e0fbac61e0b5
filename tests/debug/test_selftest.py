"""The gradient-accumulation self-test (medqa_loop.debug.selftest, ``medqa selftest``) on the tiny
8-bit model, as CI runs it."""

import pytest

from conftest import TINY
from medqa_loop.cli import main
from medqa_loop.debug import selftest
from medqa_loop.loop import EPS


@pytest.mark.slow
def test_cli_passes_on_the_tiny_model_without_8bit(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["selftest", "--config", TINY, "--set", "model.load_in_8bit=false"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    assert "4 micro-batches vs 1 batch of the same 8 pairs" in out and out.rstrip().endswith("PASS")
    assert "(tolerance 1e-05: fp32 compute" in out


@pytest.mark.slow
def test_default_8bit_config_in_training_agrees_to_fp32_rounding(lora_parts):
    """At the default threshold 6, CPU training takes bitsandbytes' dequantize-then-fp32 path:
    no activation quantization, so the fp32 tolerance applies, and the report says so."""
    cfg, parts = lora_parts
    result = selftest.check(parts, cfg)
    assert result.passed and result.rel_diff < 1e-5 and result.tolerance == selftest.FP32[0]
    assert result.outliers == {"window": {}, "batch": {}}
    assert "did not take its LLM.int8 outlier path" in selftest.report(result, cfg)


@pytest.mark.slow
def test_llm_int8_path_differs_by_its_outlier_split_and_is_reported(lora_parts):
    """Eval mode on the CPU is LLM.int8's path: per-batch outlier columns make one batch and its
    micro-batches differ by ~1%, within the tolerance chosen for that path, and each layer's
    outlier columns are reported."""
    cfg, parts = lora_parts
    result = selftest.check(parts, cfg, eval_mode=True)
    assert (result.tolerance, result.reason) == selftest.INT8_SPLIT
    assert 1e-3 < result.rel_diff < result.tolerance
    assert max(result.outliers["batch"].values()) > 0
    assert "layers.1.mlp.down_proj" in selftest.report(result, cfg)


@pytest.mark.slow
def test_self_test_fails_a_naive_accumulation(lora_parts, monkeypatch):
    """The check can fail: a loop that averages per-micro-batch means is reported as FAIL."""
    from medqa_loop.loop import backward_window

    def mean_of_means(accelerator, model, batches, normaliser, on_micro_batch=None):
        for b in batches:
            own = selftest.window_counts(accelerator, [b])[0].clamp(min=EPS) * len(batches)
            backward_window(accelerator, model, [b], own)

    cfg, parts = lora_parts
    monkeypatch.setattr(selftest, "backward_window", mean_of_means)
    result = selftest.check(parts, cfg)
    assert not result.passed and result.rel_diff > 10 * result.tolerance
    assert selftest.report(result, cfg).endswith("FAIL: the accumulated gradient is not that of one batch")


@pytest.mark.slow
def test_run_selftest_returns_the_verdict_and_the_report_and_fail_exits_1(capsys, monkeypatch):
    """run_selftest builds the run in a scratch directory with dropout off; ``medqa selftest``
    prints its report and exits 1 on FAIL."""
    passed, text = selftest.run_selftest(TINY, ["model.load_in_8bit=false", "data.max_rows=40"])
    assert passed and text.rstrip().endswith("PASS") and "(tolerance 1e-05: fp32 compute" in text
    capsys.readouterr()  # what building the run printed

    monkeypatch.setattr(selftest, "run_selftest", lambda config, overrides, eval_mode: (False, "FAIL: made up"))
    with pytest.raises(SystemExit) as exit_:
        main(["selftest", "--config", TINY])
    assert exit_.value.code == 1 and capsys.readouterr().out.strip() == "FAIL: made up"


def test_tolerance_follows_the_numerics_of_the_config():
    from medqa_loop.config import load_config

    assert selftest.tolerance(load_config(TINY, ["model.load_in_8bit=false"]), False) == selftest.FP32
    assert selftest.tolerance(load_config(TINY, ["model.load_in_8bit=false", "model.dtype=bfloat16"]), False) == selftest.HALF
    assert selftest.tolerance(load_config(TINY), True) == selftest.INT8_SPLIT
    assert selftest.tolerance(load_config(TINY, ["model.llm_int8_threshold=0"]), False) == selftest.INT8_NO_SPLIT
    assert selftest.tolerance(load_config(TINY), False) == selftest.FP32  # CPU training: no outlier split ran

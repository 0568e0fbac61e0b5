"""The memory plan: the fitted model against the figures it was fitted on, the choice, the
largest micro-batch the data makes, and the plan applied to the model."""

import pytest
from transformers import MistralConfig

from medqa_loop import memory as M
from medqa_loop.batching import accumulation_windows, epoch_order, window_batches
from medqa_loop.config import LORA_TARGETS
from medqa_loop.model import decoder_layers

SEVEN_B = M.memory_model(MistralConfig(), 16, LORA_TARGETS, True)


def test_the_fit_reproduces_every_measured_peak():
    for layers, tokens, peak in M.FIGURES:
        assert SEVEN_B.estimate_gb(tokens, layers) == pytest.approx(peak, abs=0.5), (layers, tokens)
    # the base in int8 plus the LoRA matrices with their gradients and moments: ~7.5 + 0.67 GB
    assert 8.0 < SEVEN_B.weights_gb < 8.4


def test_the_plan_checkpoints_the_fewest_layers_that_fit():
    tokens = 7914
    assert M.choose(SEVEN_B, tokens, free_gb=139.0).layers == 0  # an H200: no recompute at all
    layers_by_memory = [M.choose(SEVEN_B, tokens, free_gb=gb).layers for gb in (16, 24, 32, 80)]
    assert layers_by_memory == sorted(layers_by_memory, reverse=True) and 0 < layers_by_memory[0] <= 32
    for gb in (16, 24, 32):
        chosen = M.choose(SEVEN_B, tokens, free_gb=gb)
        assert chosen.estimate_gb <= 0.9 * gb < SEVEN_B.estimate_gb(tokens, chosen.layers - 1)
        assert f"{chosen.estimate_gb:.1f} GB" in chosen.reason and str(tokens) in chosen.reason


def test_a_run_that_cannot_fit_fails_with_the_numbers():
    need = f"{SEVEN_B.estimate_gb(7914, 32):.1f}"  # 11.4: every layer checkpointed
    with pytest.raises(M.MemoryPlanError, match=rf"{need} GB .*10\.0 GB are free.*data.pack_tokens"):
        M.choose(SEVEN_B, 7914, free_gb=10.0)
    # under model.memory_limit_gb the message names the limit, not only the free memory
    with pytest.raises(M.MemoryPlanError, match=rf"{need} GB .*10\.0 GB are allowed by model.memory_limit_gb \(139\.0 GB free\)"):
        M.choose(SEVEN_B, 7914, free_gb=139.0, limit_gb=10.0)


@pytest.mark.parametrize("batching", ["pack", "pad"])
def test_largest_micro_batch_is_the_largest_the_loop_runs(tiny_cfg, tokenizer, batching):
    from medqa_loop.data import encode_pairs, load_pairs, split_pairs
    from medqa_loop.masking import resolve_mask
    from functools import partial
    from medqa_loop.batching import collate

    cfg = tiny_cfg(f"data.batching={batching}", "data.pack_tokens=600")
    train, _ = split_pairs(load_pairs(cfg.data), cfg.data.val_fraction, cfg.seed)
    examples = encode_pairs(train, tokenizer, cfg.data, resolve_mask(cfg.data.mask)).examples
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id, packed=batching == "pack")
    seen = 0
    for epoch in range(cfg.train.epochs):
        order = epoch_order(len(examples), cfg.seed, epoch)
        for window in accumulation_windows(order, cfg.train.micro_batch_size, cfg.train.grad_accum_steps):
            for b in window_batches(window, examples, cfg, collate_fn, "cpu"):
                seen = max(seen, b["input_ids"].numel())
    assert M.row_stats(examples, cfg, 600)[0] == seen > 0


def test_on_the_cpu_auto_checkpoints_every_layer_and_a_number_is_obeyed(tiny_cfg):
    from medqa_loop.train import prepare_run

    config = MistralConfig(num_hidden_layers=2)
    auto = M.plan(tiny_cfg(), config, [], "cpu")
    assert (auto.layers, auto.rows, auto.graphs) == (2, M.DEFAULT_ROWS, False)  # auto on the CPU: all, a window a row
    assert M.plan(tiny_cfg("model.gradient_checkpointing=false"), config, [], "cpu").layers == 0
    assert M.plan(tiny_cfg("model.gradient_checkpointing=5"), config, [], "cpu").layers == 2  # at most all
    assert M.plan(tiny_cfg("data.pack_tokens=600"), config, [], "cpu").rows == 600
    run = prepare_run(tiny_cfg("model.gradient_checkpointing=1"))
    assert [layer.gradient_checkpointing for layer in decoder_layers(run.model.get_base_model())] == [True, False]
    # the run's config is the resolved one, and that is what its directory keeps
    assert run.cfg.data.pack_tokens == M.DEFAULT_ROWS
    assert "pack_tokens: 16384" in (run.out / "config.yaml").read_text()


@pytest.mark.parametrize("setting", ["bogus", -1, 1.5])
def test_a_bad_setting_is_a_config_error(tiny_cfg, setting):
    from medqa_loop.config import ConfigError

    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        tiny_cfg(f"model.gradient_checkpointing={setting}")


def test_a_memory_limit_plans_for_less_than_the_gpu_has_free(tiny_cfg, monkeypatch):
    """model.memory_limit_gb caps what the plan plans for: on a GPU with 139 GB free, a 16 GB
    limit checkpoints the layers a 16 GB GPU would, and the start-up line says why."""
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (139e9, 141e9))
    examples = [{"input_ids": [1] * 400, "labels": [1] * 400}] * 64
    rows = "data.pack_tokens=16384"
    free = M.plan(tiny_cfg(rows), MistralConfig(), examples, "cuda")
    limited = M.plan(tiny_cfg(rows, "model.memory_limit_gb=16"), MistralConfig(), examples, "cuda")
    tokens = M.row_stats(examples, tiny_cfg(rows), 16384)[0]
    assert tokens >= 3200 and free.layers == 0  # whole windows packed into one row
    assert limited.layers == M.choose(SEVEN_B, tokens, free_gb=16).layers > 0
    assert limited.record["memory_estimate_gb"] <= 0.9 * 16 and limited.record["memory_limit_gb"] == 16
    assert "16.0 GB by model.memory_limit_gb (139.0 GB free)" in limited.line


def synthetic_like(n: int = 3468, seed: int = 0) -> list[dict]:
    """Pairs with the synthetic stand-in's lengths: 200 to 1,000 tokens, ~460 on average."""
    import random

    rng = random.Random(seed)
    return [{"input_ids": [1] * int(200 + 800 * rng.random() ** 2.2)} for _ in range(n)]


GRAPHS_ON = ("model.dtype=bfloat16", "model.attn_implementation=varlen", "model.fused_ops=true",
             "train.micro_batch_size=1", "train.grad_accum_steps=16", "data.max_length=1024")


def test_auto_rows_are_the_plan_expected_fastest(tiny_cfg, monkeypatch):
    """data.pack_tokens=auto on a GPU: with memory to spare a whole window a row, nothing
    checkpointed; within 16 GB rows of 2,048 tokens as CUDA graphs, where a window a row would
    recompute most layers; eagerly (no graphs) small rows cost their launches, so larger rows."""
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (139e9, 141e9))
    examples, seven_b = synthetic_like(), MistralConfig()
    roomy = M.plan(tiny_cfg(*GRAPHS_ON), seven_b, examples, "cuda")
    assert (roomy.rows, roomy.layers, roomy.graphs) == (16384, 0, False)
    small = M.plan(tiny_cfg(*GRAPHS_ON, "model.memory_limit_gb=16"), seven_b, examples, "cuda")
    assert (small.rows, small.graphs) == (2048, True)
    whole = M.plan(tiny_cfg(*GRAPHS_ON, "model.memory_limit_gb=16", "data.pack_tokens=16384"), seven_b, examples, "cuda")
    assert whole.layers > small.layers + 20 and whole.record["window_s_estimate"] > small.record["window_s_estimate"]
    assert small.record["memory_estimate_gb"] <= 0.9 * 16 and small.record["rows"] == 2048
    assert "rows of up to 2048 tokens as CUDA graphs (data.pack_tokens=auto" in small.line and "16384: " in small.line
    between = [M.plan(tiny_cfg(*GRAPHS_ON, f"model.memory_limit_gb={gb}"), seven_b, examples, "cuda") for gb in (24, 40)]
    assert [(p.rows, p.layers, p.graphs) for p in between] == [(4096, 0, True), (8192, 0, False)]
    eager = M.plan(tiny_cfg(*GRAPHS_ON, "model.memory_limit_gb=16", "model.cuda_graphs=false"), seven_b, examples, "cuda")
    assert eager.rows > 4096 and not eager.graphs
    # a number is the rows, whatever the plan would choose
    fixed = M.plan(tiny_cfg(*GRAPHS_ON, "model.memory_limit_gb=16", "data.pack_tokens=4096"), seven_b, examples, "cuda")
    assert fixed.rows == 4096 and fixed.graphs


def test_the_speed_model_ranks_the_measured_plans_in_their_measured_order():
    """The H200 figures it was fitted on (BENCHMARKS.md): samples/s of 16 pairs a window, ~7.4k tokens."""
    measured = [  # (micro-batches a window, layers checkpointed, graphs, samples/s measured)
        (4.3, 0, True, 29.7), (4.3, 16, True, 25.2), (4.3, 32, True, 22.0), (2.2, 0, True, 32.4),
        (4.3, 0, False, 20.1), (1.0, 0, False, 34.5), (1.0, 30, False, 25.3),
    ]
    estimated = [16 / M.SPEED.window_s(7430, n, k, 32, g) for n, k, g, _ in measured]
    for (*_, sps), est in zip(measured, estimated):
        assert est == pytest.approx(sps, rel=0.12)
    for (*_, a), est_a in zip(measured, estimated):  # the order of any two that differ by more than the noise
        for (*_, b), est_b in zip(measured, estimated):
            assert not (a > 1.05 * b) or est_a > est_b, (a, b)


def test_no_row_size_fitting_is_an_error_with_the_smallest_rows_numbers(tiny_cfg, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (139e9, 141e9))
    with pytest.raises(M.MemoryPlanError, match=r"micro-batches of up to 2048 tokens.*tried rows of 2048 to 16384 tokens"):
        M.plan(tiny_cfg(*GRAPHS_ON, "model.memory_limit_gb=9"), MistralConfig(), synthetic_like(), "cuda")


@pytest.mark.parametrize("setting", ["lots", 0, True])
def test_a_bad_row_size_is_a_config_error(tiny_cfg, setting):
    from medqa_loop.config import ConfigError

    with pytest.raises(ConfigError, match="data.pack_tokens"):
        tiny_cfg(f"data.pack_tokens={setting}")


@pytest.mark.parametrize("setting", [0, -2, "lots", True])
def test_a_bad_memory_limit_is_a_config_error(tiny_cfg, setting):
    from medqa_loop.config import ConfigError

    with pytest.raises(ConfigError, match="model.memory_limit_gb"):
        tiny_cfg(f"model.memory_limit_gb={setting}")

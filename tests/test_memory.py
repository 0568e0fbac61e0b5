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
    assert M.largest_micro_batch(examples, cfg) == seen > 0


def test_on_the_cpu_auto_checkpoints_every_layer_and_a_number_is_obeyed(tiny_cfg):
    from medqa_loop.train import prepare_run

    config = MistralConfig(num_hidden_layers=2)
    assert M.plan(tiny_cfg(), config, [], "cpu")[0] == 2  # auto on the CPU
    assert M.plan(tiny_cfg("model.gradient_checkpointing=false"), config, [], "cpu")[0] == 0
    assert M.plan(tiny_cfg("model.gradient_checkpointing=5"), config, [], "cpu")[0] == 2  # at most all
    run = prepare_run(tiny_cfg("model.gradient_checkpointing=1"))
    assert [layer.gradient_checkpointing for layer in decoder_layers(run.model.get_base_model())] == [True, False]


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
    free = M.plan(tiny_cfg(), MistralConfig(), examples, "cuda")
    limited = M.plan(tiny_cfg("model.memory_limit_gb=16"), MistralConfig(), examples, "cuda")
    tokens = M.largest_micro_batch(examples, tiny_cfg())
    assert tokens >= 3200 and free[0] == 0  # whole windows packed into one row
    assert limited[0] == M.choose(SEVEN_B, tokens, free_gb=16).layers > 0
    assert limited[1]["memory_estimate_gb"] <= 0.9 * 16 and limited[1]["memory_limit_gb"] == 16
    assert "16.0 GB by model.memory_limit_gb (139.0 GB free)" in limited[2]


@pytest.mark.parametrize("setting", [0, -2, "lots", True])
def test_a_bad_memory_limit_is_a_config_error(tiny_cfg, setting):
    from medqa_loop.config import ConfigError

    with pytest.raises(ConfigError, match="model.memory_limit_gb"):
        tiny_cfg(f"model.memory_limit_gb={setting}")

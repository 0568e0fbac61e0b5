"""The loop on the tiny random-init Mistral, 8-bit through bitsandbytes on the CPU: real code paths."""

import math
import os

import pytest
import torch

import medqa_loop.loop as loop
from medqa_loop.evaluation import evaluate
from medqa_loop.kernels.patch import use_fused_ops
from medqa_loop.loop import Hooks, backward_window, train, window_counts
from medqa_loop.metrics import MetricsLog, read_metrics
from medqa_loop.model import is_int8_linear, load_base, model_logits
from medqa_loop.optim import clip_gradients
from medqa_loop.train import prepare_run, run


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def window_grad(parts, groups):
    """Gradient of one window whose micro-batches are the given groups of examples."""
    parts.model.zero_grad(set_to_none=True)
    batches = [parts.collate_fn([parts.train_examples[i] for i in g]) for g in groups]
    backward_window(parts.accelerator, parts.model, batches, window_counts(parts.accelerator, batches)[0])
    return grads(parts.model)


def rel_diff(a, b):
    num = sum((a[k] - b[k]).pow(2).sum() for k in a)
    return math.sqrt(num / sum(v.pow(2).sum() for v in b.values()))


def test_base_is_int8_bitsandbytes_and_only_lora_trains(tiny_cfg):
    parts = prepare_run(tiny_cfg())
    m = parts.model
    targets = [mod for name, mod in m.named_modules() if name.endswith(("q_proj", "down_proj")) and hasattr(mod, "base_layer")]
    assert len(targets) == 4  # 2 layers x (q_proj, down_proj)
    assert all(is_int8_linear(t.base_layer) for t in targets)
    assert not is_int8_linear(m.get_output_embeddings()) and m.get_output_embeddings().weight.dtype == torch.float32
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 7  # A and B, 2 layers, 7 projections


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, tol",
    [
        # The arithmetic itself: exact to fp32 rounding, unquantized and with the default int8
        # path (weights dequantized per matmul: no batch-dependent rounding).
        (["model.load_in_8bit=false"], 1e-5),
        ([], 1e-5),
        # Through bitsandbytes int8 (activations quantized per token, so batch shape and padding
        # barely matter). At the default outlier threshold LLM.int8 picks its fp16 outlier
        # columns per *batch*, so one batch and 16 micro-batches differ by ~1% there: a property
        # of bitsandbytes, not of the accumulation.
        (["model.int8_matmul=bnb", "model.llm_int8_threshold=0.0"], 3e-3),
    ],
)
def test_grad_accumulation_equals_one_big_batch(tiny_cfg, overrides, tol):
    """GA 16 x batch 1 == 1 x batch 16: the window loss is a token-level mean over the window."""
    parts = prepare_run(tiny_cfg("lora.dropout=0.0", *overrides))
    with torch.no_grad():  # LoRA B starts at 0; give it values so every gradient is non-trivial
        for n, p in parts.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    rows = list(range(16))
    accumulated = window_grad(parts, [[i] for i in rows])
    one_batch = window_grad(parts, [rows])
    assert rel_diff(accumulated, one_batch) < tol
    # The test can fail: a mean of micro-batch means (the naive loop) is ~15% off.
    parts.model.zero_grad(set_to_none=True)
    for i in rows:
        b = parts.collate_fn([parts.train_examples[i]])
        backward_window(parts.accelerator, parts.model, [b], window_counts(parts.accelerator, [b])[0] * 16)
    assert rel_diff(grads(parts.model), one_batch) > 0.05


def test_clipping_bounds_the_norm_and_logs_the_preclip_value(tiny_cfg):
    parts = prepare_run(tiny_cfg("train.max_grad_norm=0.01"))
    window_grad(parts, [[0, 1], [2, 3]])
    params = [p for p in parts.model.parameters() if p.requires_grad]
    before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    returned = clip_gradients(parts.accelerator, params, 0.01)  # what the loop's optimizer_step clips with
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert before > 0.01 and float(returned) == pytest.approx(float(before))
    assert float(after) == pytest.approx(0.01, rel=1e-4)


@pytest.mark.slow
def test_loss_goes_down_and_checkpoint_reloads_to_the_same_logits(tiny_cfg, monkeypatch):
    """One epoch of the real loop; the epoch adapter the loop saved reloads through plain PEFT."""
    from peft import PeftModel

    cfg = tiny_cfg("train.epochs=1", "train.sanity_eval_batches=6", "train.eval_every=5")
    parts = prepare_run(cfg)
    saved, save_adapter = [], loop.save_adapter

    def recording_save(accelerator, model, out_dir, tokenizer=None, writer=None):  # the loop saves its adapters itself
        saved.append(save_adapter(accelerator, model, out_dir, tokenizer, writer))
        return saved[-1]

    monkeypatch.setattr(loop, "save_adapter", recording_save)
    last = train(parts, Hooks(log=MetricsLog(parts.out / "metrics.jsonl")))
    evals = [r for r in read_metrics(parts.out / "metrics.jsonl") if "eval_loss" in r]
    steps = [r for r in read_metrics(parts.out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in evals] == [0, 5, 10, 12]  # sanity, every 5, epoch end
    assert len(steps) == 12 == last["step"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5  # whole val split both times
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert 0.0 <= evals[0]["eval_token_acc"] < evals[-1]["eval_token_acc"] <= 1.0  # it learnt tokens
    assert saved == [parts.out / "epoch-1", parts.out / "final"]
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in saved[0].iterdir()}

    # The base as a user loads it (same int8 compute path), the adapter through plain PEFT.
    base = load_base(cfg.model, str(parts.out / "base"), torch.device("cpu"))
    reloaded = PeftModel.from_pretrained(base, saved[0]).eval()
    parts.model.eval()
    batch = parts.collate_fn(parts.val_examples[:3])
    with torch.no_grad():
        want = model_logits(parts.model, batch)
        stock = model_logits(reloaded, batch)  # PEFT's forward: x W^T, then + the LoRA part
        use_fused_ops(reloaded)
        got = model_logits(reloaded, batch)  # the training path: the LoRA part, then + x W^T
    assert torch.equal(got, want)  # the same weights came back, bit for bit
    torch.testing.assert_close(stock, want, rtol=1e-5, atol=1e-5)  # the same maths, summed in another order
    # In fixed batches of 4, in order: the loop's packed rows gave the same numbers.
    in_fours = [list(range(i, min(i + 4, len(parts.val_examples)))) for i in range(0, len(parts.val_examples), 4)]
    result = evaluate(parts.accelerator, reloaded, parts.val_examples, parts.collate_fn, in_fours)
    assert result.loss == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert result.token_acc == pytest.approx(evals[-1]["eval_token_acc"], rel=1e-6)


@pytest.mark.slow
def test_max_steps_stops_mid_epoch_and_saves_final(tiny_cfg):
    last = run(tiny_cfg("train.max_steps=3", "train.eval_every=2"))
    out = tiny_cfg().output_dir
    records = read_metrics(f"{out}/metrics.jsonl")
    assert last["step"] == 3
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2]
    for r in records:
        if "loss" in r:
            assert {"step", "epoch", "loss", "lr", "grad_norm", "target_tokens"} <= r.keys()
            assert r["target_tokens"] > 0 and r["epoch"] < 1
    # best/: the adapter of the lowest eval loss (step 2's, the only full evaluation)
    assert sorted(os.listdir(out)) == ["base", "best", "config.yaml", "final", "metrics.jsonl", "samples.jsonl", "state"]

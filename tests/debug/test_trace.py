"""Gradient debugging (medqa_loop.debug.trace, .int8) on the tiny 8-bit model: grad_trace.jsonl,
attribution, the NaN/inf guard (stop and skip), pause hooks, snapshots, 8-bit outlier counts, the
schedule warning the loop prints. Replaying steps: test_replay.py; the plot: test_plot.py."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY
from medqa_loop.batching import accumulation_windows, epoch_order
from medqa_loop.config import ConfigError, load_config
from medqa_loop.data import load_pairs, split_pairs
from medqa_loop.debug.int8 import Int8Outliers
from medqa_loop.debug.replay import bitwise_equal, replay
from medqa_loop.debug.trace import GradientDebugger, NonFinite, build_debugger, format_table, load_pause_hooks
from medqa_loop.loop import NonFiniteError
from medqa_loop.loop import backward_window, window_counts
from medqa_loop.model import model_loss_sum
from medqa_loop.losses import target_weight
from medqa_loop.metrics import read_metrics
from medqa_loop.model import module_name
from medqa_loop.train import run

MODULE = re.compile(r"layers\.[01]\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.lora_[AB]")


def window_rows(cfg, step: int) -> list[list[int]]:
    """Dataset rows of each micro-batch of optimizer step ``step`` (one process, epoch 0)."""
    train_pairs, _ = split_pairs(load_pairs(cfg.data), cfg.data.val_fraction, cfg.seed)
    t = cfg.train
    window = accumulation_windows(epoch_order(len(train_pairs), cfg.seed, 0), t.micro_batch_size, t.grad_accum_steps)[step - 1]
    return [[train_pairs.rows[i] for i in mb] for mb in window]


def steps_of(out):
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def adapter_weights(path):
    return load_file(path / "adapter_model.safetensors")


def test_grad_trace_has_one_line_per_step_with_the_issue_keys(traced_run):
    cfg, out, _, _ = traced_run
    trace = read_metrics(out / "grad_trace.jsonl")
    metrics = steps_of(out)
    assert [t["step"] for t in trace] == [1, 2]
    for t in trace:
        m = metrics[t["step"]]
        assert {"step", "loss", "target_tokens", "lr", "grad_norm", "clip_coef", "modules"} <= t.keys()
        assert (t["loss"], t["target_tokens"], t["lr"], t["grad_norm"]) == (m["loss"], m["target_tokens"], m["lr"], m["grad_norm"])
        assert len(t["modules"]) == 28 and all(MODULE.fullmatch(name) for name in t["modules"])
        assert set(t["modules"]["layers.0.mlp.up_proj.lora_A"]) == {"grad_norm", "weight_norm", "update_ratio"}
        # The per-module norms are the pieces of the global pre-clip norm, and clipping really cut it.
        parts = math.sqrt(sum(v["grad_norm"] ** 2 for v in t["modules"].values()))
        assert parts == pytest.approx(t["grad_norm"], rel=1e-5)
        assert t["clip_coef"] == pytest.approx(0.1 / (t["grad_norm"] + 1e-6)) and t["clip_coef"] < 1


def test_weight_norm_and_update_ratio_match_the_saved_adapters(traced_run):
    """Snapshots before steps 1 and 2 bracket step 1's update: ratio = |W2 - W1| / |W1|."""
    _, out, _, _ = traced_run
    first, second = read_metrics(out / "grad_trace.jsonl")
    w1, w2 = adapter_weights(out / "debug/step-1/adapter"), adapter_weights(out / "debug/step-2/adapter")
    by_module = {module_name(k): k for k in w1}
    for name, stats in first["modules"].items():
        before, after = w1[by_module[name]], w2[by_module[name]]
        assert stats["weight_norm"] == pytest.approx(float(before.norm()), rel=1e-6)
        assert second["modules"][name]["weight_norm"] == pytest.approx(float(after.norm()), rel=1e-6)
        if name.endswith("lora_B"):  # B starts at 0: no ratio at step 1, a real one at step 2
            assert stats["weight_norm"] == 0 and stats["update_ratio"] is None
            assert second["modules"][name]["update_ratio"] > 0
        else:
            assert stats["update_ratio"] == pytest.approx(float((after - before).norm() / before.norm()), rel=1e-5)


def test_attribution_names_the_window_rows_and_adds_up(traced_run):
    cfg, out, _, _ = traced_run
    for t in read_metrics(out / "grad_trace.jsonl"):
        micro = t["micro_batches"]
        assert [mb["rows"] for mb in micro] == window_rows(cfg, t["step"])
        assert sum(mb["target_tokens"] for mb in micro) == t["target_tokens"]
        # completion_only: weights are 1, so the window loss is the token-weighted mean of theirs.
        mean = sum(mb["loss"] * mb["target_tokens"] for mb in micro) / t["target_tokens"]
        assert mean == pytest.approx(t["loss"], rel=1e-6)
        # Contributions add up to the gradient: their norms bound it (triangle inequality).
        assert sum(mb["grad_norm"] for mb in micro) >= t["grad_norm"] * (1 - 1e-6)


def test_attribution_is_each_micro_batch_gradient(lora_parts, tmp_path):
    """Each reported contribution equals the gradient of that micro-batch alone (same normaliser)."""
    cfg, parts = lora_parts
    acc, model = parts.accelerator, parts.model
    batches = [parts.collate_fn(parts.train_examples[i : i + 2]) for i in (0, 2, 4)]
    normaliser = window_counts(acc, batches)[0]
    debugger = GradientDebugger(load_config(TINY, ["debug.enabled=true"]), acc, model, parts.optimizer, tmp_path)
    try:
        model.zero_grad(set_to_none=True)
        loss_sum = backward_window(acc, model, batches, normaliser, debugger.watch(1))
        loss = float(loss_sum / normaliser)
        debugger.before_clip(1, model, batches, loss)
        debugger.after_step(1, {"loss": loss, "lr": 0.0, "grad_norm": 0.0, "target_tokens": 0})
    finally:
        debugger.close()
    reported = debugger.last_trace["micro_batches"]
    for mb, batch in zip(reported, batches):
        model.zero_grad(set_to_none=True)
        backward_window(acc, model, [batch], normaliser)
        alone = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
        assert mb["grad_norm"] == pytest.approx(float(alone), rel=1e-5)
        assert mb["rows"] == batch["rows"].tolist()
        with torch.no_grad():
            assert mb["loss"] == pytest.approx(float(model_loss_sum(model, batch) / target_weight(batch)), rel=1e-6)
    model.zero_grad(set_to_none=True)


def test_pause_hook_gets_step_model_and_window_after_backward_before_clipping(traced_run):
    cfg, out, _, calls = traced_run
    trace = {t["step"]: t for t in read_metrics(out / "grad_trace.jsonl")}
    assert [c["step"] for c in calls] == [2]  # only at debug.pause_at
    assert calls[0]["rows"] == window_rows(cfg, 2)
    # The norm the hook saw is the pre-clip one (clipping then scaled it by clip_coef < 1).
    assert calls[0]["grad_norm"] == pytest.approx(trace[2]["grad_norm"], rel=1e-6)


def test_schedule_warning_printed_before_training(traced_run):
    _, _, stdout, _ = traced_run
    assert "warning: train.warmup_steps=5 is not shorter than the run's 2 optimizer steps" in stdout


def test_guard_names_the_first_lora_gradient_to_go_non_finite(lora_parts, tmp_path):
    """A NaN injected into the gradient flowing into layer 0's o_proj, in micro-batch 1 only:
    the loss stays finite, layer 1 and layer 0's MLP stay finite, and the debugger names
    layers.0.self_attn.o_proj.lora_B (backward order) and saves a bundle."""
    cfg, parts = lora_parts
    acc, model = parts.accelerator, parts.model
    batches = [parts.collate_fn(parts.train_examples[0:2]), parts.collate_fn(parts.train_examples[2:3])]
    target = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.o_proj"))

    def inject(module, args, output):
        if output.shape[0] == 1 and output.requires_grad:  # micro-batch 1 holds one pair
            output.register_hook(lambda g: g * float("nan"))

    handle = target.register_forward_hook(inject)
    debugger = GradientDebugger(load_config(TINY, ["debug.enabled=true"]), acc, model, parts.optimizer, tmp_path)
    try:
        model.zero_grad(set_to_none=True)
        normaliser = window_counts(acc, batches)[0]
        rng = torch.get_rng_state()  # what the window's dropout would draw from
        loss = float(backward_window(acc, model, batches, normaliser, debugger.watch(7)) / normaliser)
        assert math.isfinite(loss)
        found = debugger.before_clip(7, model, batches, loss)
    finally:
        handle.remove()
        debugger.close()
    assert isinstance(found, NonFinite)
    message = found.message
    rows = batches[1]["rows"].tolist()
    assert f"(backward): layers.0.self_attn.o_proj.lora_B in micro-batch 1, rows {rows}" in message
    assert "(forward)" not in message and str(tmp_path / "debug" / "step-7") in message

    bundle = tmp_path / "debug" / "step-7"
    window = json.loads((bundle / "window.json").read_text())
    assert window["nonfinite"]["backward"] == {"module": "layers.0.self_attn.o_proj.lora_B", "micro_batch": 1, "rows": rows}
    for saved, batch in zip(window["micro_batches"], batches):
        assert saved["rows"] == batch["rows"].tolist()
        assert saved["input_ids"] == [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    grads = load_file(bundle / "grads.safetensors")
    assert not torch.isfinite(grads["layers.0.self_attn.o_proj.lora_B"]).all()
    assert all(torch.isfinite(g).all() for name, g in grads.items() if name.startswith(("layers.1", "layers.0.mlp")))
    state = torch.load(bundle / "state.pt", weights_only=True)
    assert state["step"] == 7 and torch.equal(state["rng"]["cpu"], rng)
    assert (bundle / "adapter" / "adapter_model.safetensors").is_file()
    model.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_non_finite_weight_stops_the_run_with_a_bundle_that_replays(tmp_path):
    """A hook poisons a LoRA weight after step 1's backward; step 2's forward goes NaN at that
    module. The run stops before step 2's optimizer step, naming it, and the bundle replays the
    same NaN gradients bit for bit."""
    out = tmp_path / "run"
    cfg = load_config(TINY, [
        f"output_dir={out}", "data.batching=pad", "train.max_steps=3", "train.grad_accum_steps=2", "train.sanity_eval_batches=0",
        "debug.enabled=true", "debug.every=10", "debug.pause_at=[1]", "debug.hooks=[user_plugins:poison_weight]",
    ])
    with pytest.raises(NonFiniteError) as err:
        run(cfg)
    message = str(err.value)
    assert "non-finite step 2" in message and "(forward): layers.0.self_attn.o_proj in micro-batch 0" in message
    assert f"{out / 'debug' / 'step-2'}" in message and "--step 2" in message
    assert str(out / "state" / "step-1") in message  # the last good step, resumable
    assert list(steps_of(out)) == [1] and not (out / "final").exists()
    state = torch.load(out / "debug/step-2/state.pt", weights_only=True)
    assert all(int(s["step"]) == 1 for s in state["optimizer"]["state"].values())  # step 2 never applied

    r = replay(out, 2)
    assert r.bitwise_equal is True and math.isnan(r.trace["loss"])
    assert not math.isfinite(r.trace["modules"]["layers.0.self_attn.o_proj.lora_A"]["grad_norm"])


@pytest.mark.slow
def test_skip_policy_drops_the_update_and_counts_it(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(TINY, [
        f"output_dir={out}", "data.batching=pad", "train.max_steps=2", "train.grad_accum_steps=2", "train.sanity_eval_batches=0",
        "debug.enabled=true", "train.nan_policy=skip", "debug.snapshot_steps=[1, 2]",
        "debug.pause_at=[1]", "debug.hooks=[user_plugins:poison_grad]",
    ])
    last = run(cfg)
    metrics = steps_of(out)
    assert last["step"] == 2 and metrics[1]["skipped_nonfinite"] == 1 and math.isnan(metrics[1]["grad_norm"])
    assert "skipped_nonfinite" not in metrics[2] and math.isfinite(metrics[2]["grad_norm"])
    trace = {t["step"]: t for t in read_metrics(out / "grad_trace.jsonl")}
    assert trace[1]["skipped"] and trace[1]["clip_coef"] == 0.0 and "skipped" not in trace[2]
    # Step 1 changed nothing (no update, no weight decay, no optimizer state); step 2 trained.
    w1, w2 = adapter_weights(out / "debug/step-1/adapter"), adapter_weights(out / "debug/step-2/adapter")
    assert bitwise_equal(w1, w2)
    # AdamW skipped step 1 whole (found_inf): its moments are still zero and its step count 0
    for moments in torch.load(out / "debug/step-2/state.pt", weights_only=True)["optimizer"]["state"].values():
        assert int(moments["step"]) == 0 and not moments["exp_avg"].any() and not moments["exp_avg_sq"].any()
    assert not bitwise_equal(w2, adapter_weights(out / "final"))
    # The bundle of the skipped step says the gradient went bad after backward (the hook).
    info = json.loads((out / "debug/step-1/window.json").read_text())["nonfinite"]
    assert info["backward"] == {"module": "layers.0.mlp.up_proj.lora_B", "micro_batch": None, "rows": None}


def test_a_non_finite_step_is_named_changes_no_gradient_and_writes_one_bundle(lora_parts, tmp_path):
    """before_clip names where a non-finite step went non-finite and changes no gradient (the
    loop's update drops the step); the first such step writes a bundle, later ones don't; a
    finite step returns None; after_step writes a skipped step's line with coefficient 0."""
    cfg, parts = lora_parts
    acc, model = parts.accelerator, parts.model
    batches = [parts.collate_fn(parts.train_examples[0:2])]
    debugger = GradientDebugger(load_config(TINY, ["debug.enabled=true"]), acc, model, parts.optimizer, tmp_path)
    poisoned = "layers.1.mlp.down_proj.lora_A"
    try:
        found = []
        for step in (3, 4, 5):
            model.zero_grad(set_to_none=True)
            normaliser = window_counts(acc, batches)[0]
            loss = float(backward_window(acc, model, batches, normaliser, debugger.watch(step)) / normaliser)
            if step < 5:
                debugger.params[poisoned].grad[0, 0] = float("nan")
            grads = {n: p.grad.clone() for n, p in debugger.params.items()}
            found.append(debugger.before_clip(step, model, batches, loss))
            # before_clip dropped nothing: every gradient is still there, bit for bit, the NaN too
            assert all(p.grad is not None for p in debugger.params.values())
            assert bitwise_equal({n: p.grad for n, p in debugger.params.items()}, grads)
            assert math.isnan(debugger.params[poisoned].grad[0, 0]) == (step < 5)
            assert debugger.after_step(step, {"loss": loss, "lr": 0.0, "grad_norm": 0.0, "target_tokens": 0},
                                       skipped=step < 5) is None
            assert debugger.last_trace["step"] == step
            assert debugger.last_trace.get("skipped", False) == (step < 5)
            assert (debugger.last_trace["clip_coef"] == 0.0) == (step < 5)
    finally:
        debugger.close()
        model.zero_grad(set_to_none=True)
    first, second, finite = found
    assert isinstance(first, NonFinite) and isinstance(second, NonFinite) and finite is None
    assert f"(backward): {poisoned}" in first.message and str(tmp_path / "debug" / "step-3") in first.message
    assert f"(backward): {poisoned}" in second.message and "debug" not in second.message
    assert [p.name for p in (tmp_path / "debug").iterdir()] == ["step-3"]  # one bundle only
    assert [t["step"] for t in read_metrics(tmp_path / "grad_trace.jsonl")] == [3, 4, 5]


def test_build_debugger_is_none_unless_debug_is_enabled(lora_parts, tmp_path):
    cfg, parts = lora_parts
    args = (parts.accelerator, parts.model, parts.optimizer, tmp_path)
    assert build_debugger(load_config(TINY), *args) is None
    debugger = build_debugger(load_config(TINY, ["debug.enabled=true"]), *args)
    try:
        assert isinstance(debugger, GradientDebugger) and len(debugger.params) == 28
    finally:
        debugger.close()


def test_format_table_prints_a_trace_line(traced_run):
    _, out, _, _ = traced_run
    line = read_metrics(out / "grad_trace.jsonl")[1]
    table = format_table(line).splitlines()
    assert table[0].startswith(f"step 2: loss {line['loss']:.6f}, target tokens {line['target_tokens']}")
    assert f"clip_coef {line['clip_coef']:.4f}" in table[0]
    assert len(table) == 2 + len(line["modules"]) + len(line["micro_batches"])
    for name, row in zip(line["modules"], table[2:]):
        assert row.split() == [name, f"{line['modules'][name]['grad_norm']:.4e}", f"{line['modules'][name]['weight_norm']:.4e}",
                               f"{line['modules'][name]['update_ratio']:.4e}"]
    assert table[-1].startswith(f"micro-batch {len(line['micro_batches']) - 1}: rows {line['micro_batches'][-1]['rows']}")


def test_int8_outlier_columns_are_those_llm_int8_splits_off(lora_parts):
    """Eval mode on the CPU runs bitsandbytes' LLM.int8 path: the recorded columns are exactly the
    input columns with |x| >= threshold in fp16. CPU training takes no such path: nothing recorded."""
    from medqa_loop.model import is_int8_linear

    cfg, parts = lora_parts
    model = parts.model
    batch = parts.collate_fn(parts.train_examples[:4])
    expected, handles = {}, []
    for name, module in model.named_modules():
        if is_int8_linear(module):
            def count(mod, args, name=module_name(name)):
                x = args[0].reshape(-1, args[0].shape[-1]).half()
                expected[name] = int((x.abs() >= cfg.model.llm_int8_threshold).any(dim=0).sum())
            handles.append(module.register_forward_pre_hook(count))
    outliers = Int8Outliers(model)
    try:
        with torch.no_grad():
            model.eval()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            seen, wanted = outliers.counts(), dict(expected)
            outliers.reset()
            model.train()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        model.train()
        outliers.remove()
        for h in handles:
            h.remove()
    assert len(seen) == 14 and seen == wanted and max(seen.values()) > 0
    assert outliers.counts() == {}


@pytest.mark.parametrize(
    "override, names",
    [
        ("debug.every=0", ["debug.every"]),
        ("train.nan_policy=ignore", ["train.nan_policy", "stop, skip"]),
        ("debug.pause_at=[0]", ["debug.pause_at", "from 1"]),
        ("debug.hooks=[print]", ["debug.hooks[0]", "package.module:function"]),
        ("debug.hooks=[user_plugins:record, user_plugins:a.b]", ["debug.hooks[1]", "package.module:function"]),
    ],
)
def test_bad_debug_config_names_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["debug.enabled=true", override])
    for name in names:
        assert name in str(err.value)


def test_hooks_are_imported_only_by_a_debugger_that_pauses(import_probe):
    hooked = ["debug.enabled=true", "debug.hooks=[import_probe:hook]"]
    assert load_pause_hooks(load_config(TINY, hooked).debug) == []  # debugging, but no pause
    pausing = load_config(TINY, [*hooked, "debug.pause_at=[1]"])
    assert not import_probe.exists()  # neither config nor a debugger that never pauses imported it
    (hook,) = load_pause_hooks(pausing.debug)
    assert import_probe.exists() and hook.__module__ == "import_probe" and hook.__name__ == "hook"


@pytest.mark.parametrize(
    "spec, names",
    [
        ("user_plugins:even_rows_only", [
            "'user_plugins:even_rows_only' takes even_rows_only(ex",
            "called as even_rows_only(step, model, batches)", "too many positional arguments",
        ]),
        ("user_plugins:CALLS", ["'user_plugins:CALLS' is not callable (a list)"]),
        ("user_plugins:nope", ["cannot import 'user_plugins:nope'", "has no 'nope'"]),
        ("no_such_module:f", ["cannot import 'no_such_module:f'", "ModuleNotFoundError"]),
        ("broken_plugin:hook", ["cannot import 'broken_plugin:hook'", "RuntimeError: broken_plugin fails"]),
    ],
)
def test_a_hook_that_cannot_be_called_as_a_hook_is_refused_before_the_base_loads(spec, names, tiny_cfg, no_base):
    """The second hook is bad: the error names its key and spec before the run starts."""
    cfg = tiny_cfg("debug.enabled=true", "debug.pause_at=[1]", f"debug.hooks=[user_plugins:record, {spec}]")
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert str(err.value).startswith("config key 'debug.hooks[1]': ")
    for name in names:
        assert name in str(err.value)
    if "cannot import" in names[0]:
        assert err.value.__cause__ is not None  # the user's own error, for its traceback


def test_debug_options_need_debug_enabled():
    with pytest.raises(ConfigError, match="debug.snapshot_steps.*debug.enabled is false"):
        load_config(TINY, ["debug.snapshot_steps=[3]"])

"""The update (medqa_loop.optim): lr schedule, AdamW's groups, the clip rule and the optimizer
step the loop, replay and the benchmarks share, and the schedule warnings."""

import math

import pytest
import torch

from medqa_loop.optim import (
    build_optimizer, clip_coef, clip_limit, lr_at, optimizer_step, schedule_warnings, set_lr,
)


def test_linear_warmup_then_linear_decay():
    base, warmup, total = 1e-4, 100, 651
    assert lr_at(0, base, warmup, total) == pytest.approx(base / 100)  # first update is not lr 0
    assert lr_at(49, base, warmup, total) == pytest.approx(base * 0.5)
    assert lr_at(99, base, warmup, total) == pytest.approx(base)
    assert lr_at(100, base, warmup, total) == pytest.approx(base)
    mid = 100 + (total - 100) // 2
    assert lr_at(mid, base, warmup, total) == pytest.approx(base * (total - mid) / (total - 100))
    assert 0 < lr_at(total - 1, base, warmup, total) < base / 500
    assert lr_at(total, base, warmup, total) == 0.0
    lrs = [lr_at(s, base, warmup, total) for s in range(total)]
    assert lrs[:100] == sorted(lrs[:100]) and lrs[100:] == sorted(lrs[100:], reverse=True)


def test_warmup_longer_than_run_never_exceeds_base():
    assert [lr_at(s, 1.0, 10, 4) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_adamw_decays_matrices_only_and_skips_frozen():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))
    model[2].requires_grad_(False)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    decayed = [p for g in opt.param_groups if g["weight_decay"] == 0.01 for p in g["params"]]
    plain = [p for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]]
    assert decayed == [model[0].weight]
    assert plain == [model[0].bias, model[1].weight, model[1].bias]  # the frozen layer is out
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(torch.nn.Linear(2, 2).requires_grad_(False), 1e-3, 0.0)


def test_clip_limit_and_coef_read_zero_as_no_clipping():
    assert clip_limit(0) == math.inf and clip_limit(0.0) == math.inf
    assert clip_limit(0.3) == 0.3
    assert clip_coef(10.0, 0.0) == 1.0  # max_grad_norm 0: never scaled, however large the norm
    assert clip_coef(10.0, 1.0) == pytest.approx(1.0 / (10.0 + 1e-6))  # torch's formula
    assert clip_coef(0.5, 1.0) == 1.0


def sgd_with_gradient(grad_norm: float):
    """A 2x3 weight under plain SGD at lr 1 (the update is then minus the clipped gradient) with a
    gradient of the given norm; fused, which takes found_inf as the loop's fused AdamW does."""
    w = torch.nn.Parameter(torch.ones(2, 3))
    g = torch.arange(1.0, 7.0).view(2, 3)
    w.grad = g * (grad_norm / g.norm())
    return w, w.grad.clone(), torch.optim.SGD([w], lr=1.0, fused=True)


@pytest.mark.parametrize("max_grad_norm, applied", [(0.5, 0.5), (0.0, 4.0), (10.0, 4.0)])
def test_optimizer_step_clips_steps_and_drops_the_gradients(max_grad_norm, applied):
    """max_grad_norm 0.5 clips the norm-4 gradient to 0.5; 0 (no clipping) and a limit above the
    norm apply it whole. Either way the pre-clip norm is returned and the gradients are dropped."""
    from accelerate import Accelerator

    w, grad, opt = sgd_with_gradient(4.0)
    before = w.detach().clone()
    returned, finite = optimizer_step(Accelerator(), opt, [w], max_grad_norm, torch.tensor(1.0))
    assert float(returned) == pytest.approx(4.0, rel=1e-6) and bool(finite)  # the pre-clip norm
    update = before - w.detach()
    assert float(update.norm()) == pytest.approx(applied, rel=1e-5)
    assert torch.allclose(update, grad * (applied / 4.0), rtol=1e-5)  # the direction is the gradient's
    assert w.grad is None  # zero_grad(set_to_none=True)


def test_set_lr_sets_every_group():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    assert len(opt.param_groups) == 2
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_schedule_warnings_thresholds():
    from medqa_loop.config import TrainConfig

    assert schedule_warnings(TrainConfig(), 651) == []  # the recipe: 100 warmup, eval every 50
    assert any("never reaches" in w for w in schedule_warnings(TrainConfig(), 100))
    assert any("31%" in w for w in schedule_warnings(TrainConfig(warmup_steps=200), 651))
    evals = schedule_warnings(TrainConfig(warmup_steps=0, eval_every=50), 60)
    assert len(evals) == 1 and "evaluates 1 time(s) in the run's 60 optimizer steps" in evals[0]


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_a_non_finite_step_applies_no_update_at_all(bad):
    """A NaN loss or an inf gradient: AdamW leaves every weight, moment and step count as they
    were (no decay either), with no wait for the device in optimizer_step; the next finite step
    updates as a fresh optimizer would."""
    from accelerate import Accelerator

    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, lr=0.1, weight_decay=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("inf") if bad == "gradient" else 1.0)
    loss = torch.tensor(float("nan") if bad == "loss" else 1.0)
    grad_norm, finite = optimizer_step(Accelerator(), opt, params, 0.3, loss)
    assert not bool(finite) and all(torch.equal(b, p) for b, p in zip(before, params))
    assert all(int(s["step"]) == 0 and not s["exp_avg"].any() for s in opt.state.values())

    fresh_model = torch.nn.Linear(3, 2)
    fresh_model.load_state_dict(model.state_dict())
    fresh = build_optimizer(fresh_model, lr=0.1, weight_decay=0.1)
    for p, q in zip(params, fresh_model.parameters()):
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    optimizer_step(Accelerator(), opt, params, 0.3, torch.tensor(1.0))
    optimizer_step(Accelerator(), fresh, list(fresh_model.parameters()), 0.3, torch.tensor(1.0))
    assert all(torch.equal(p, q) for p, q in zip(params, fresh_model.parameters()))

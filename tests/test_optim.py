import pytest
import torch

from medqa_loop.optim import build_optimizer, lr_at


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

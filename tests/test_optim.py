"""Learning-rate schedule, linear scaling rule, and LARS."""

import itertools

import pytest
import torch
from torch import nn

from ssl_platform.train.optim import LARS, build_optimizer, param_groups, scaled_lr, warmup_cosine


def test_warmup_then_cosine_to_zero():
    lrs = [warmup_cosine(s, max_steps=100, warmup_steps=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # monotone decay after warmup
    assert lrs[-1] < 0.01
    # warmup longer than the run is capped at half of it
    assert warmup_cosine(4, max_steps=10, warmup_steps=50) == pytest.approx(1.0)


def test_linear_scaling_rule():
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)
    assert scaled_lr(0.3, 256) == pytest.approx(0.3)


def test_biases_and_norm_weights_are_excluded_from_decay():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert {p.ndim for p in decay["params"]} == {2} and len(decay["params"]) == 2
    assert {p.ndim for p in no_decay["params"]} == {1} and no_decay["weight_decay"] == 0.0
    assert no_decay["lars_exclude"]


@pytest.mark.parametrize("name", ["lars", "adamw", "sgd"])
def test_optimizers_fit_a_regression(name):
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.5
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = build_optimizer(model, name, lr={"lars": 0.3, "adamw": 1e-2, "sgd": 1e-2}[name], weight_decay=0.0)
    first = None
    for _ in range(200):
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_lars_step_is_trust_ratio_scaled():
    w = nn.Parameter(torch.ones(4, 4))
    opt = LARS([{"params": [w], "weight_decay": 0.0, "lars_exclude": False}], lr=1.0, momentum=0.0, eta=0.01)
    w.grad = torch.full((4, 4), 100.0)
    opt.step()
    # step = lr * eta * ||w|| / ||g|| * g = 0.01 * 4 / 400 * 100 = 0.01 per element
    assert torch.allclose(w, torch.full((4, 4), 0.99))

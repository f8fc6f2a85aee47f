"""Learning-rate schedule, linear scaling rule, and LARS."""

import itertools

import pytest
import torch
from torch import nn

from ssl_platform.config import ConfigError, load_config
from ssl_platform.train.optim import LARS, build_optimizer, param_groups, warmup_cosine


def test_warmup_then_cosine_to_zero():
    lrs = [warmup_cosine(s, max_steps=100, warmup_steps=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # monotone decay after warmup
    assert lrs[-1] < 0.01
    # warmup longer than the run is capped at half of it
    assert warmup_cosine(4, max_steps=10, warmup_steps=50) == pytest.approx(1.0)


def test_linear_scaling_rule():
    for batch, rate in [(4096, 4.8), (256, 0.3)]:  # SimCLR's LARS: 0.3 x batch / 256
        cfg = load_config("simclr-digits", ["train.lr=0.3", f"train.batch_size={batch}"])
        assert cfg.train.effective_lr()[0] == pytest.approx(rate)


@pytest.mark.parametrize("optimizer, scaling, expected", [
    ("lars", "auto", 0.3 * 64 / 256), ("sgd", "auto", 0.3 * 64 / 256),  # the SimCLR/BYOL recipes' rule
    ("adamw", "auto", 0.3),  # AdamW recipes quote the rate they train at
    ("adamw", "linear", 0.3 * 64 / 256), ("lars", "none", 0.3), ("sgd", "none", 0.3)])
def test_the_rate_a_run_trains_at_follows_lr_scaling(optimizer, scaling, expected):
    cfg = load_config("simclr-digits", [f"train.optimizer={optimizer}", f"train.lr_scaling={scaling}", "train.lr=0.3",
                                        "train.batch_size=64"])
    rate, why = cfg.train.effective_lr()
    assert rate == pytest.approx(expected)
    assert f"train.lr_scaling={scaling}" in why and f"{rate:.4g}" in why


def test_the_run_header_states_the_rate_and_the_rule():
    """The header line `sslp run` prints: an AdamW preset trains at train.lr itself, a LARS one at
    the linearly scaled rate (the loop builds its optimizer with the same effective_lr)."""
    cfg = load_config("gpt-python-docs", ["train.lr=0.002", "train.batch_size=32"])
    assert cfg.train.optimizer == "adamw" and cfg.train.lr_scaling == "auto"
    assert cfg.train.effective_lr()[1] == "0.002 (not scaled with the batch: train.lr_scaling=auto, adamw)"
    cfg = load_config("simclr-digits", ["train.batch_size=64"])
    assert cfg.train.effective_lr()[1] == "0.3 x 64/256 = 0.075 (linear scaling: train.lr_scaling=auto, lars)"


def test_adamw_takes_train_adam_beta2():
    model = nn.Linear(4, 2)
    assert build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.0).defaults["betas"] == (0.9, 0.999)
    cfg = load_config("bert-python-docs")
    assert cfg.train.adam_beta2 == 0.98  # the BERT/RoBERTa recipe the preset follows
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.0, adam_beta2=cfg.train.adam_beta2)
    assert opt.defaults["betas"] == (0.9, 0.98)
    with pytest.raises(ConfigError, match="adam_beta2"):
        load_config("bert-python-docs", ["train.adam_beta2=1.0"])


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

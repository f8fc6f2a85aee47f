"""Image encoders and the two-view methods: SimCLR, BYOL, Barlow Twins, VICReg."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from checks import assert_step_end_changes_nothing
from torch import nn

from ssl_models.encoders import IMAGE_ENCODERS, ResNetSmall, TorchvisionResNet, build_image_encoder
from ssl_models.methods.barlow_twins import BarlowTwins
from ssl_models.methods.byol import BYOL, cosine_momentum
from ssl_models.methods.simclr import SimCLR
from ssl_models.methods.vicreg import VICReg


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("name,batch,dim", [("resnet18", 3, 512), ("resnet50", 2, 2048)])
def test_torchvision_resnet_small_stem_on_32px(name, batch, dim):
    torch.manual_seed(0)
    encoder = build_image_encoder(name, in_channels=1, small_stem=True)
    assert isinstance(encoder.resnet.maxpool, nn.Identity)
    assert encoder.resnet.conv1.kernel_size == (3, 3) and encoder.resnet.conv1.stride == (1, 1)
    assert isinstance(encoder.resnet.fc, nn.Identity)
    out = encoder(torch.randn(batch, 1, 32, 32))
    assert out.shape == (batch, encoder.feature_dim) == (batch, dim)


def test_torchvision_resnet_imagenet_stem_keeps_torchvision_layout():
    rgb = build_image_encoder("resnet18", in_channels=3)
    assert rgb.resnet.conv1.kernel_size == (7, 7) and isinstance(rgb.resnet.maxpool, nn.MaxPool2d)
    gray = build_image_encoder("resnet18", in_channels=1)
    assert gray.resnet.conv1.in_channels == 1 and gray.resnet.conv1.stride == (2, 2)
    assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 512)


def test_image_encoder_registry():
    assert set(IMAGE_ENCODERS) == {"resnet_small", "resnet18", "resnet50"}
    small = build_image_encoder("resnet_small", 3, widths=[8, 16], blocks_per_stage=2)
    assert isinstance(small, ResNetSmall) and small.feature_dim == 16
    assert isinstance(build_image_encoder("resnet18", 3), TorchvisionResNet)
    with pytest.raises(ValueError, match="resnet_small, resnet18, resnet50"):
        build_image_encoder("vit_tiny", 3)


def test_build_image_encoder_rejects_or_drops_foreign_options():
    with pytest.raises(ValueError, match="small_stem"):
        build_image_encoder("resnet_small", 3, small_stem=True)
    with pytest.raises(ValueError, match="widths"):
        build_image_encoder("resnet18", 3, widths=(8, 16))
    # strict=False: the methods pass every encoder's options and each takes its own.
    encoder = build_image_encoder("resnet18", 3, strict=False, widths=(8, 16), small_stem=True)
    assert isinstance(encoder.resnet.maxpool, nn.Identity) and encoder.feature_dim == 512


# ----------------------------------------------------------------------------- the four methods

ENCODER = dict(in_channels=1, encoder_widths=[8, 16])  # a list, as YAML gives it
METHODS = {
    "simclr": lambda **kw: SimCLR(**ENCODER, projector_width=32, projector_dim=16, **kw),
    "byol": lambda **kw: BYOL(**ENCODER, projector_width=32, projector_dim=16, predictor_width=32, **kw),
    "barlow_twins": lambda **kw: BarlowTwins(**ENCODER, projector_width=32, projector_dim=16, **kw),
    "vicreg": lambda **kw: VICReg(**ENCODER, expander_width=32, expander_dim=16, **kw),
}


def _two_views(batch: int = 8, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=g)
    return {"view1": x + 0.3 * torch.randn(x.shape, generator=g),
            "view2": x + 0.3 * torch.randn(x.shape, generator=g)}


def _trainable(method: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in method.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_forward_backward_gives_finite_gradients_everywhere(name):
    torch.manual_seed(0)
    method = METHODS[name]()
    out = method(_two_views())
    assert out["loss"].shape == () and out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    for key, value in out.items():
        assert value.shape == () and torch.isfinite(value), key
        assert key == "loss" or not value.requires_grad, key
    out["loss"].backward()
    for n, p in _trainable(method):
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert any(p.grad.abs().sum() > 0 for n, p in _trainable(method) if n.startswith("encoder."))
    assert_step_end_changes_nothing(method, step=0, max_steps=10)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_decreases_on_a_fixed_batch(name):
    torch.manual_seed(0)
    method = METHODS[name]()
    batch = _two_views()
    optimizer = torch.optim.Adam([p for _, p in _trainable(method)], lr=3e-3)
    steps, losses = 30, []
    for step in range(steps):
        loss = method(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.on_train_step_end(step, steps)
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_autocast_keeps_the_loss_in_float32(name):
    torch.manual_seed(0)
    method = METHODS[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(_two_views())
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in _trainable(method))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_embed_returns_encoder_features(name):
    method = METHODS[name]().eval()
    with torch.no_grad():
        features = method.embed({"image": torch.randn(5, 1, 20, 20)})
    assert features.shape == (5, method.feature_dim) == (5, 16)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_torchvision_encoder_option(name):
    method = METHODS[name](encoder="resnet18", small_stem=True)
    assert isinstance(method.encoder, TorchvisionResNet) and method.feature_dim == 512
    assert isinstance(method.encoder.resnet.maxpool, nn.Identity)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bad_batches_are_rejected_with_a_hint(name):
    method = METHODS[name]()
    views = _two_views()
    with pytest.raises(ValueError, match="view2"):
        method({"view1": views["view1"]})
    with pytest.raises(ValueError, match="in_channels"):
        method({"view1": views["view1"].expand(-1, 3, -1, -1), "view2": views["view2"].expand(-1, 3, -1, -1)})
    with pytest.raises(ValueError, match="same shape"):
        method({"view1": views["view1"], "view2": views["view2"][:, :, :12, :12]})
    with pytest.raises(ValueError, match="'image'"):
        method.embed(views)
    with pytest.raises(ValueError, match="unknown image encoder"):
        METHODS[name](encoder="resnet_tiny")


# ----------------------------------------------------------------------------- BYOL's target


def test_momentum_schedule_endpoints_and_shape():
    max_steps = 100
    taus = [cosine_momentum(step, max_steps) for step in range(max_steps)]
    assert taus[0] == 0.996  # first step taken (index 0)
    assert taus[-1] == 1.0  # last step taken (index max_steps - 1)
    assert taus[max_steps // 2] == pytest.approx(1 - 0.004 * (math.cos(math.pi * 50 / 99) + 1) / 2)
    assert all(a < b for a, b in itertools.pairwise(taus))
    assert cosine_momentum(0, 1) == 1.0
    with pytest.raises(ValueError, match="step < max_steps"):
        cosine_momentum(max_steps, max_steps)


def test_byol_target_gets_no_gradient_and_moves_by_exactly_the_ema_rule():
    torch.manual_seed(0)
    method = METHODS["byol"]()
    online = {n: p for n, p in method.named_parameters() if n.startswith(("encoder.", "projector."))}
    target = {n: p for n, p in method.named_parameters() if n.startswith("target_")}
    assert len(target) == len(online) > 0 and not any(p.requires_grad for p in target.values())
    for n, p in online.items():  # starts as an exact copy of the online network
        assert torch.equal(target["target_" + n], p)
    assert {id(p) for p in method.trainable_parameters()}.isdisjoint(id(p) for p in target.values())

    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.5)
    step, max_steps = 3, 10
    before = {n: p.detach().clone() for n, p in target.items()}
    loss = method(_two_views())["loss"]
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in target.values())
    optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in target.items())  # the optimizer never touches it

    method.on_train_step_end(step, max_steps)
    tau = 1 - (1 - 0.996) * (math.cos(math.pi * step / (max_steps - 1)) + 1) / 2
    moved = 0
    for n, p in online.items():
        t_new = target["target_" + n]
        torch.testing.assert_close(t_new, tau * before["target_" + n] + (1 - tau) * p.detach(), rtol=1e-6, atol=1e-7)
        moved += not torch.equal(t_new, before["target_" + n])
    assert moved > 0  # the online network moved, so the target did too

    before = {n: p.detach().clone() for n, p in target.items()}
    method.on_train_step_end(max_steps - 1, max_steps)  # tau = 1 at the last step: frozen
    assert all(torch.equal(p, before[n]) for n, p in target.items())


def test_byol_checkpoint_carries_the_target():
    torch.manual_seed(0)
    method = METHODS["byol"]()
    with torch.no_grad():
        for p in method.target_projector.parameters():
            p.add_(1.0)  # make the target differ from a fresh copy of the online network
    state = method.state_dict()
    assert any(k.startswith("target_encoder.") for k in state)
    restored = METHODS["byol"]()
    restored.load_state_dict(state)
    for (n, a), (_, b) in zip(method.named_parameters(), restored.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert not any(p.requires_grad for p in restored.target_projector.parameters())

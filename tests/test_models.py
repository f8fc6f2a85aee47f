"""ssl_models registry, SimCLR, encoder and projector shapes, and the no-Ray rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checks import assert_step_end_changes_nothing

import ssl_models
from ssl_models.encoders import ResNetSmall
from ssl_models.heads import ProjectionHead
from ssl_models.methods.simclr import SimCLR

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(encoder_widths=[8, 16], projector_width=32, projector_dim=16)  # list, as YAML gives it


def test_build_method_builds_simclr():
    method = ssl_models.build_method("simclr", in_channels=1, **SMALL)
    assert isinstance(method, SimCLR)
    assert ssl_models.METHODS["simclr"] is SimCLR


def test_registry_has_every_method_with_the_common_interface():
    assert sorted(ssl_models.METHODS) == [
        "barlow_twins", "bert", "byol", "clip", "cpc", "dino", "gpt", "rotnet", "siglip", "simclr", "vicreg"]
    for name, cls in ssl_models.METHODS.items():
        assert issubclass(cls, torch.nn.Module), name
        assert callable(getattr(cls, "on_train_step_end", None)), name
        assert callable(getattr(cls, "embed", None)), f"{name} has no embed(batch) for downstream evaluation"


def test_build_method_unknown_name_lists_known_methods():
    with pytest.raises(ValueError, match="simclr"):
        ssl_models.build_method("no-such-method")


def test_simclr_forward_backward():
    torch.manual_seed(0)
    method = SimCLR(**SMALL)
    batch = {"view1": torch.randn(4, 1, 32, 32), "view2": torch.randn(4, 1, 32, 32)}
    out = method(batch)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert not out["pos_cosine"].requires_grad and -1 <= out["pos_cosine"].item() <= 1
    out["loss"].backward()
    grads = [p.grad for p in method.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert_step_end_changes_nothing(method, step=1, max_steps=10)


def test_simclr_embed_returns_encoder_features():
    method = SimCLR(in_channels=3, **SMALL).eval()
    with torch.no_grad():
        features = method.embed({"image": torch.randn(5, 3, 28, 28)})
    assert features.shape == (5, method.feature_dim) == (5, 16)


def test_resnet_small_default_shape():
    encoder = ResNetSmall()
    assert encoder(torch.randn(2, 1, 32, 32)).shape == (2, encoder.feature_dim) == (2, 128)


@pytest.mark.parametrize("name", ["resnet_small", "resnet18"])
def test_stage_features_go_from_the_stem_to_the_encoders_output(name):
    from ssl_models.encoders import build_image_encoder

    encoder = build_image_encoder(name, 3, strict=False, widths=(8, 16, 32), small_stem=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        stages = encoder.stage_features(x)
        output = encoder(x)
    expected = ["stem", "stage1", "stage2", "stage3"] if name == "resnet_small" else \
        ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert list(stages) == expected
    assert [f.shape[0] for f in stages.values()] == [2] * len(expected)
    torch.testing.assert_close(list(stages.values())[-1], output)  # the deepest stage is the encoder's output


def test_projection_head_layers():
    head = ProjectionHead(16, 32, 8, num_layers=3)
    assert head(torch.randn(4, 16)).shape == (4, 8)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == 3


def test_ssl_models_never_imports_ray():
    # ssl_models imports every method (and through CLIP, open_clip) at import time.
    code = ("import sys, ssl_models, ssl_models.losses, ssl_models.methods, ssl_models.audio, ssl_models.transformer; "
            "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)


@pytest.mark.parametrize("stride", [1, 2])
def test_basic_block_is_torchvisions_in_names_and_output(stride):
    """ResNetSmall's own block (so a worker need not import torchvision) is torchvision's:
    the same state-dict keys and, with the same weights, the same output."""
    from torchvision.models.resnet import BasicBlock as TorchvisionBlock

    from ssl_models.encoders import BasicBlock

    def downsample():
        return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1, stride=stride, bias=False), torch.nn.BatchNorm2d(8))

    ours, theirs = BasicBlock(4, 8, stride, downsample()), TorchvisionBlock(4, 8, stride, downsample())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 8, 8)
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_importing_the_models_loads_neither_torchvision_nor_dynamo():
    """Every Ray Train worker, controller and CLI process imports ssl_models; torchvision (which
    pulls in torch._dynamo, ~1.5 s of CPU) is loaded only when a torchvision ResNet is built."""
    code = ("import sys, ssl_models, ssl_platform.train.trainer; "
            "print(sorted(m for m in ('torchvision', 'torch._dynamo', 'torch.distributed.fsdp') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout

"""RotNet: the four rotations and their labels, the classifier learning them, embed, and sslp seeing it."""

from __future__ import annotations

import pytest
import torch
from checks import assert_step_end_changes_nothing, train_on_one_batch

import ssl_models
from ssl_models.methods.rotnet import RotNet, rotate_four_ways

TINY = dict(in_channels=1, encoder_widths=[8, 16], classifier_width=32)  # a list, as YAML gives it
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: 2 cores shared with other jobs


def glyphs(batch: int = 8, size: int = 12, seed: int = 0) -> torch.Tensor:
    """(batch, 1, size, size) images with no rotational symmetry: a random pattern plus a bright
    bar along the top and down the left edge, so every turn of one looks different."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand(batch, 1, size, size, generator=g)
    x[:, :, 0, :] += 1.0
    x[:, :, : size // 2, 0] += 1.0
    return x


def test_rotations_are_rot90_k_times_with_label_k():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    rotated, labels = rotate_four_ways(images)
    assert rotated.shape == (8, 3, 4, 4) and labels.shape == (8,) and labels.dtype == torch.int64
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for row in range(8):
        k, i = divmod(row, 2)
        assert labels[row] == k
        assert torch.equal(rotated[row], torch.rot90(images[i], k, dims=(1, 2)))
    # Written out for one 2x2 image: a quarter turn counter-clockwise each time.
    one = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    turns = [r[0].tolist() for r in rotate_four_ways(one)[0]]
    assert turns == [[[1, 2], [3, 4]], [[2, 4], [1, 3]], [[4, 3], [2, 1]], [[3, 1], [4, 2]]]
    # The four rotations of an image are distinct, and a fourth turn is the image again.
    assert len({tuple(t.flatten().tolist()) for t in rotated[0::2]}) == 4
    assert torch.equal(torch.rot90(rotated[6], 1, dims=(1, 2)), images[0])


def test_rotations_need_square_images():
    with pytest.raises(ValueError, match="square"):
        rotate_four_ways(torch.zeros(2, 1, 8, 6))
    with pytest.raises(ValueError, match="square"):
        RotNet(**TINY)({"view1": torch.zeros(2, 1, 8, 6)})


def test_forward_backward_metrics_and_embed():
    torch.manual_seed(0)
    method = RotNet(**TINY)
    out = method({"view1": glyphs()})
    assert set(out) == {"loss", "rotation_acc"}
    assert out["loss"].shape == () and out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert out["rotation_acc"].shape == () and not out["rotation_acc"].requires_grad
    assert 0 <= out["rotation_acc"].item() <= 1
    out["loss"].backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in method.encoder.parameters())
    assert_step_end_changes_nothing(method, step=0, max_steps=10)
    method.eval()
    with torch.no_grad():
        features = method.embed({"image": torch.randn(5, 1, 14, 10)})  # embed takes any image shape
    assert features.shape == (5, method.feature_dim) == (5, 16)
    with pytest.raises(ValueError, match="in_channels"):
        method({"view1": torch.zeros(2, 3, 8, 8)})


def test_linear_classifier_and_bf16_autocast():
    method = RotNet(**TINY, classifier_layers=1)
    assert isinstance(method.classifier.layers[0], torch.nn.Linear) and len(method.classifier.layers) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method({"view1": glyphs(4)})
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_sgd_teaches_the_classifier_to_tell_the_rotations_apart():
    torch.manual_seed(0)
    method = RotNet(**TINY)
    batch = {"view1": glyphs(8)}
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    losses = train_on_one_batch(method, batch, optimizer, steps=25)
    assert losses[0] == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=0.5)  # near chance at first
    assert losses[-1] < 0.25 * losses[0], losses
    method.eval()  # BatchNorm's running statistics: what evaluation would see
    with torch.no_grad():
        rotated, labels = rotate_four_ways(glyphs(8, seed=1))  # other images of the same kind
        predicted = method.classifier(method.encoder(rotated)).argmax(dim=1)
    assert (predicted == labels).float().mean() >= 0.9


def test_sslp_sees_rotnet_from_its_spec_alone(capsys):
    from ssl_platform import cli, methods
    from ssl_platform.config import load_config
    from ssl_platform.views import image_views

    assert ssl_models.METHODS["rotnet"] is RotNet
    assert isinstance(ssl_models.build_method("rotnet", **TINY), RotNet)
    spec = methods.method_spec("rotnet")
    assert spec is RotNet.spec and spec.display_name == "RotNet" and spec.batch_keys == ("view1",)
    cfg = methods.validate(load_config("rotnet-digits"))
    assert cfg.method.name == "rotnet"
    (view,) = image_views(cfg, spec.views)  # one view, square, at the preset's size and no flip
    assert view.size == cfg.data.image_size and view.flip_prob == 0.0
    assert cli.main(["run", "rotnet-digits", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "model.classifier_width" in out and "model.classifier_layers" in out

"""SigLIPLoss and the SigLIP method: naive reference, open_clip's SigLipLoss, SGD, two gloo ranks,
the method on CLIP's towers, and sslp seeing it."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from checks import assert_step_end_changes_nothing, losses_on_a_fixed_batch
from gloo import run_on_ranks
from open_clip.loss import SigLipLoss
from test_clip import CAPTIONS, TINY, assert_matches_whole_batch, small_batch, unit
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ssl_models
from ssl_models import distributed
from ssl_models.losses import SigLIPLoss
from ssl_models.methods.clip import tokenize
from ssl_models.methods.siglip import SigLIP


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores shared with other jobs; these models are tiny anyway
    yield
    torch.set_num_threads(threads)


def naive_siglip_loss(images: torch.Tensor, texts: torch.Tensor, scale: float, bias: float) -> float:
    """The paper's loss written out (Zhai et al. 2023, algorithm 1): every pair (i, j) a binary
    problem with label +1 when i == j and -1 otherwise, -log sigmoid(label * logit) summed over
    all pairs, divided by the batch size."""
    n = len(images)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * float(images[i] @ texts[j]) + bias
            total += math.log1p(math.exp(-z * logit))  # -log sigmoid(z * logit)
    return total / n


# ----------------------------------------------------------------------------- SigLIPLoss, one process

@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("scale, bias", [(1.0, 0.0), (10.0, -10.0), (100.0, 3.0)])
def test_siglip_loss_matches_naive_reference(batch, scale, bias):
    images, texts = unit(batch, 16, seed=batch), unit(batch, 16, seed=batch + 1)
    scale_bias = torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
    loss = SigLIPLoss()(images, texts, *scale_bias)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(naive_siglip_loss(images, texts, scale, bias), abs=1e-9)


@pytest.mark.parametrize("batch", [2, 7, 32])
@pytest.mark.parametrize("scale, bias", [(1.0, 0.0), (10.0, -10.0), (100.0, 3.0)])
def test_siglip_loss_equals_open_clip_single_process(batch, scale, bias):
    inputs = [unit(batch, 16, seed=batch), unit(batch, 16, seed=batch + 1),
              torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)]
    ours = [x.clone().requires_grad_() for x in inputs]
    theirs = [x.clone().requires_grad_() for x in inputs]
    loss, reference = SigLIPLoss()(*ours), SigLipLoss()(*theirs)  # forward(img, txt, logit_scale, logit_bias)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-12)
    loss.backward()
    reference.backward()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_siglip_loss_gather_flag_is_a_no_op_without_process_group():
    images, texts = unit(6, 4, seed=0), unit(6, 4, seed=1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    assert distributed.world_size() == 1
    assert torch.equal(SigLIPLoss(gather_distributed=True)(images, texts, scale, bias),
                       SigLIPLoss(gather_distributed=False)(images, texts, scale, bias))


def test_siglip_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="both be"):
        SigLIPLoss()(torch.randn(4, 8), torch.randn(5, 8), torch.tensor(1.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        SigLIPLoss()(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(1.0), torch.zeros(4))


def test_siglip_loss_decreases_under_sgd():
    torch.manual_seed(0)
    x = torch.randn(32, 10)
    image_view, text_view = x @ torch.randn(10, 12), x @ torch.randn(10, 6) + 0.1 * torch.randn(32, 6)
    image_tower, text_tower = nn.Linear(12, 8), nn.Linear(6, 8)
    log_scale, bias = nn.Parameter(torch.tensor(math.log(10.0))), nn.Parameter(torch.tensor(-10.0))
    optimizer = torch.optim.SGD([*image_tower.parameters(), *text_tower.parameters(), log_scale, bias], lr=0.5)
    losses = []
    for _ in range(50):
        loss = SigLIPLoss()(F.normalize(image_tower(image_view), dim=1), F.normalize(text_tower(text_view), dim=1),
                            log_scale.exp(), bias)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- two gloo processes

WORLD, PAIRS = 2, 8  # global batch of PAIRS pairs; rank r takes pairs [r*B, (r+1)*B)


class TinyTowers(nn.Module):
    """Two MLP towers, a logit scale and a bias, float64, no BatchNorm (its statistics would
    depend on how the batch is split)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 6))
        self.text = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))  # not -10: every pair's gradient is then well above 0
        self.double()

    def forward(self, images, texts):
        return (F.normalize(self.image(images), dim=1), F.normalize(self.text(texts), dim=1),
                self.logit_scale.exp(), self.logit_bias)


def _tower_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(PAIRS, 10, generator=g, dtype=torch.float64)
    return x, torch.cat([x, x[:, :2]], 1) + 0.3 * torch.randn(PAIRS, 12, generator=g, dtype=torch.float64)


def _method_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"image": torch.randn(PAIRS, 3, 8, 8, generator=g, dtype=torch.float64),
            "text": tokenize(CAPTIONS[:PAIRS], TINY["context_length"])}


def _tiny_method(gather: bool) -> SigLIP:
    torch.manual_seed(0)
    return SigLIP(**TINY, gather_distributed=gather).double()


def _backward(model: nn.Module, loss: torch.Tensor) -> dict:
    loss.backward()
    named = model.module.named_parameters() if isinstance(model, DistributedDataParallel) else model.named_parameters()
    return {"loss": loss.detach(), "grads": {name: p.grad.clone() for name, p in named}}


def _worker(rank: int) -> dict:
    warnings.simplefilter("ignore")  # torch.distributed.nn's deprecation notices, from open_clip
    b = PAIRS // WORLD
    rows = slice(rank * b, (rank + 1) * b)
    images, texts = (x[rows] for x in _tower_batch())
    model = DistributedDataParallel(TinyTowers())
    results = {"ours": _backward(model, SigLIPLoss(gather_distributed=True)(*model(images, texts)))}
    for impl in ("bidir", "gather"):  # open_clip's texts passed round the ranks, or all-gathered
        model = DistributedDataParallel(TinyTowers())
        results[impl] = _backward(model, SigLipLoss(rank=rank, world_size=WORLD, dist_impl=impl)(*model(images, texts)))
    method = DistributedDataParallel(_tiny_method(gather=True))
    results["method"] = _backward(method, method({k: v[rows] for k, v in _method_batch().items()})["loss"])
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_worker, tmp_path_factory.mktemp("gloo_siglip"), world=WORLD)


@pytest.fixture(scope="module")
def whole_batch() -> dict:
    model = TinyTowers()
    return _backward(model, SigLIPLoss()(*model(*_tower_batch())))


def test_two_ranks_give_the_single_process_loss_and_gradients(ranks, whole_batch):
    # Mean of the rank losses = the whole-batch loss; after DDP's average every rank holds the
    # whole-batch gradient of the towers, the scale and the bias (float64, to 1e-10).
    assert whole_batch["grads"]["logit_bias"].abs() > 1e-3 and whole_batch["grads"]["logit_scale"].abs() > 1e-3
    assert_matches_whole_batch([r["ours"] for r in ranks], whole_batch)


def test_two_ranks_equal_open_clip_siglip_loss_on_two_ranks(ranks, whole_batch):
    # open_clip's distributed SigLipLoss (each rank: its images against every rank's texts) gives
    # the same per-rank loss as ours, and the same exact gradients.
    for impl in ("bidir", "gather"):
        for r in ranks:
            torch.testing.assert_close(r["ours"]["loss"], r[impl]["loss"], rtol=0, atol=1e-12)
        assert_matches_whole_batch([r[impl] for r in ranks], whole_batch)


def test_method_on_two_ranks_gives_the_single_process_loss_and_gradients(ranks):
    method = _tiny_method(gather=True)  # no process group here: the flag changes nothing
    whole = _backward(method, method(_method_batch())["loss"])
    assert_matches_whole_batch([r["method"] for r in ranks], whole, atol=1e-8)


# ----------------------------------------------------------------------------- the SigLIP method

def test_siglip_forward_backward_on_clip_towers():
    torch.manual_seed(0)
    method = SigLIP(**TINY)
    assert method.logit_scale.item() == pytest.approx(math.log(10)) and method.logit_bias.item() == -10.0
    out = method(small_batch())
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert out["logit_scale"].item() == pytest.approx(10.0) and out["logit_bias"].item() == -10.0
    assert not out["logit_scale"].requires_grad and not out["logit_bias"].requires_grad
    assert 0 <= out["image_text_acc"].item() <= 1
    out["loss"].backward()
    grads = {name: p.grad for name, p in method.named_parameters() if p.requires_grad}
    assert not [name for name, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert method.logit_scale.grad.abs() > 0 and method.logit_bias.grad.abs() > 0
    assert_step_end_changes_nothing(method, step=1, max_steps=10)
    # The towers are CLIP's: the same open_clip modules, parameters and state-dict keys.
    clip = ssl_models.CLIP(**TINY)
    assert type(method.towers) is type(clip.towers)
    assert method.towers.state_dict().keys() == clip.towers.state_dict().keys()


def test_siglip_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    method = SigLIP(**TINY)
    batch = small_batch(batch=8)
    losses = losses_on_a_fixed_batch(method, batch)
    assert losses[-1] < 0.25 * losses[0], losses
    assert method(batch)["image_text_acc"].item() >= 0.75


def test_siglip_under_bf16_autocast_computes_the_loss_in_float32():
    torch.manual_seed(0)
    method, batch = SigLIP(**TINY), small_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(batch)
        image, text = method.encode_image(batch["image"]), method.encode_text(batch["text"])
    assert out["loss"].dtype == image.dtype == text.dtype == torch.float32
    assert out["loss"].item() == SigLIPLoss()(image, text, method.logit_scale.exp(), method.logit_bias).item()


def test_siglip_clamps_the_scale_and_rejects_bad_input():
    method, batch = SigLIP(**TINY), small_batch()
    with torch.no_grad():
        method.logit_scale.fill_(math.log(1000.0))
    assert method(batch)["logit_scale"].item() == pytest.approx(100.0)
    with pytest.raises(ValueError, match="init_scale"):
        SigLIP(**TINY, init_scale=0.5)
    with pytest.raises(ValueError, match="SigLIP needs batch keys"):
        method({"image": batch["image"]})
    with pytest.raises(ValueError, match="in_channels"):
        SigLIP(**{**TINY, "in_channels": 2})


# ----------------------------------------------------------------------------- what sslp sees

def test_sslp_sees_siglip_from_its_spec_alone(capsys):
    from ssl_platform import cli, methods
    from ssl_platform.config import load_config

    spec = methods.method_spec("siglip")
    assert spec is SigLIP.spec and spec.display_name == "SigLIP" and spec.data_kind == "image-caption"
    cfg = methods.validate(load_config("siglip-digit-captions"))
    assert cfg.method.name == "siglip"
    assert cli.main(["run", "siglip-digit-captions", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "method.init_bias" in out and "method.init_scale" in out and "model.text_width" in out

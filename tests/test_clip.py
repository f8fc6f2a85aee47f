"""CLIPLoss and the CLIP method: naive reference, open_clip's ClipLoss, two gloo ranks, towers."""

from __future__ import annotations

import math
import socket
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from checks import assert_step_end_changes_nothing, losses_on_a_fixed_batch
from gloo import run_on_ranks
from open_clip.loss import ClipLoss
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models import distributed
from ssl_models.losses.clip import CLIPLoss
from ssl_models.methods.clip import CLIP, VOCAB_SIZE, tokenize

SOT, EOT = 49406, 49407
# A tiny method: a 2x2-patch ViT on 8x8 images, 8-token captions. float64-safe, no BatchNorm.
TINY = dict(image_size=8, patch_size=4, embed_dim=8, vision_width=16, vision_layers=1, vision_heads=2,
            context_length=8, text_width=16, text_layers=1, text_heads=2)
CAPTIONS = ["a red square", "a blue circle", "two green lines", "a black dot",
            "an empty frame", "a yellow star", "three white stripes", "a purple cross"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores shared with other jobs; these models are tiny anyway
    yield
    torch.set_num_threads(threads)


def unit(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


def naive_clip_loss(images: torch.Tensor, texts: torch.Tensor, scale: float) -> float:
    """CLIP's symmetric InfoNCE written out: for each pair i, -log softmax of its own partner,
    once over all texts for image i and once over all images for text i, averaged."""
    n = len(images)
    total = 0.0
    for i in range(n):
        i2t = [scale * float(images[i] @ texts[j]) for j in range(n)]
        t2i = [scale * float(texts[i] @ images[j]) for j in range(n)]
        total += -(i2t[i] - math.log(sum(math.exp(v) for v in i2t)))
        total += -(t2i[i] - math.log(sum(math.exp(v) for v in t2i)))
    return total / (2 * n)


# ----------------------------------------------------------------------------- CLIPLoss, one process

@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("dim", [4, 32])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_matches_naive_reference(batch, dim, scale):
    images, texts = unit(batch, dim, seed=batch * 100 + dim), unit(batch, dim, seed=batch * 100 + dim + 1)
    loss = CLIPLoss()(images, texts, torch.tensor(scale, dtype=torch.float64))
    assert loss.shape == ()
    assert loss.item() == pytest.approx(naive_clip_loss(images, texts, scale), abs=1e-9)


@pytest.mark.parametrize("batch", [2, 7, 32])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_equals_open_clip_single_process(batch, scale):
    inputs = [unit(batch, 16, seed=batch, dtype=torch.float32), unit(batch, 16, seed=batch + 1, dtype=torch.float32),
              torch.tensor(scale)]
    ours = [x.clone().requires_grad_() for x in inputs]
    theirs = [x.clone().requires_grad_() for x in inputs]
    loss, reference = CLIPLoss()(*ours), ClipLoss()(*theirs)
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    loss.backward()
    reference.backward()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


def test_clip_loss_gather_flag_is_a_no_op_without_process_group():
    images, texts, scale = unit(6, 4, seed=0), unit(6, 4, seed=1), torch.tensor(10.0, dtype=torch.float64)
    assert distributed.world_size() == 1
    assert torch.equal(CLIPLoss(gather_distributed=True)(images, texts, scale), CLIPLoss()(images, texts, scale))


def test_clip_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="both be"):
        CLIPLoss()(torch.randn(4, 8), torch.randn(5, 8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="scalar"):
        CLIPLoss()(torch.randn(4, 8), torch.randn(4, 8), torch.ones(4))


def test_clip_loss_decreases_under_sgd():
    torch.manual_seed(0)
    x = torch.randn(32, 10)
    image_view, text_view = x @ torch.randn(10, 12), x @ torch.randn(10, 6) + 0.1 * torch.randn(32, 6)
    image_tower, text_tower = nn.Linear(12, 8), nn.Linear(6, 8)
    optimizer = torch.optim.SGD([*image_tower.parameters(), *text_tower.parameters()], lr=0.5)
    losses = []
    for _ in range(50):
        loss = CLIPLoss()(F.normalize(image_tower(image_view), dim=1), F.normalize(text_tower(text_view), dim=1),
                          torch.tensor(10.0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------- two gloo processes

WORLD, PAIRS = 2, 8  # global batch of PAIRS pairs; rank r takes pairs [r*B, (r+1)*B)


class TinyTowers(nn.Module):
    """Two MLP towers and a logit scale, float64, no BatchNorm (its statistics would depend on
    how the batch is split)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 6))
        self.text = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.double()

    def forward(self, images, texts):
        return F.normalize(self.image(images), dim=1), F.normalize(self.text(texts), dim=1), self.logit_scale.exp()


def _tower_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(PAIRS, 10, generator=g, dtype=torch.float64)
    return x, torch.cat([x, x[:, :2]], 1) + 0.3 * torch.randn(PAIRS, 12, generator=g, dtype=torch.float64)


def _method_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"image": torch.randn(PAIRS, 3, 8, 8, generator=g, dtype=torch.float64),
            "text": tokenize(CAPTIONS[:PAIRS], TINY["context_length"])}


def _tiny_method(gather: bool) -> CLIP:
    torch.manual_seed(0)
    return CLIP(**TINY, gather_distributed=gather).double()


def _backward(model: nn.Module, loss: torch.Tensor) -> dict:
    loss.backward()
    named = model.module.named_parameters() if isinstance(model, DistributedDataParallel) else model.named_parameters()
    return {"loss": loss.detach(), "grads": {name: p.grad.clone() for name, p in named}}


def _tower_loss(model: nn.Module, loss_fn: nn.Module, images, texts) -> dict:
    return _backward(model, loss_fn(*model(images, texts)))


# open_clip's ClipLoss variants, by (local_loss, gather_with_grad).
OPEN_CLIP_VARIANTS = [(True, True), (False, True), (False, False), (True, False)]


def _worker(rank: int) -> dict:
    warnings.simplefilter("ignore")  # torch.distributed.nn.all_gather's deprecation notice, from open_clip
    b = PAIRS // WORLD
    rows = slice(rank * b, (rank + 1) * b)
    images, texts = (x[rows] for x in _tower_batch())
    results = {"ours": _tower_loss(DistributedDataParallel(TinyTowers()), CLIPLoss(gather_distributed=True),
                                   images, texts)}
    for local, grad in OPEN_CLIP_VARIANTS:
        loss_fn = ClipLoss(local_loss=local, gather_with_grad=grad, rank=rank, world_size=WORLD)
        results[local, grad] = _tower_loss(DistributedDataParallel(TinyTowers()), loss_fn, images, texts)
    with torch.no_grad():  # ours and open_clip's recipe on the very same features of this rank
        features = TinyTowers()(images, texts)
        results["same_features"] = (CLIPLoss(gather_distributed=True)(*features),
                                    ClipLoss(local_loss=True, gather_with_grad=True, rank=rank,
                                             world_size=WORLD)(*features))
    method = DistributedDataParallel(_tiny_method(gather=True))
    results["method"] = _backward(method, method({k: v[rows] for k, v in _method_batch().items()})["loss"])
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_worker, tmp_path_factory.mktemp("gloo_clip"), world=WORLD)


@pytest.fixture(scope="module")
def whole_batch() -> dict:
    model = TinyTowers()
    return _tower_loss(model, CLIPLoss(), *_tower_batch())


def assert_matches_whole_batch(per_rank: list[dict], whole: dict, atol: float = 1e-10) -> None:
    """Mean of the rank losses is the whole-batch loss; every rank holds the whole-batch gradient."""
    torch.testing.assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), whole["loss"], rtol=0, atol=atol)
    for res in per_rank:
        assert res["grads"].keys() == whole["grads"].keys()
        for name, want in whole["grads"].items():
            torch.testing.assert_close(res["grads"][name], want, rtol=0, atol=atol, msg=name)


def test_two_ranks_give_the_single_process_loss_and_gradients(ranks, whole_batch):
    assert_matches_whole_batch([r["ours"] for r in ranks], whole_batch)


def test_two_ranks_equal_open_clip_local_loss_with_gather_with_grad(ranks):
    for r in ranks:
        ours, theirs = r["same_features"]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
        torch.testing.assert_close(r["ours"]["loss"], r[True, True]["loss"], rtol=0, atol=1e-12)


def test_open_clip_gather_with_grad_is_exact_on_gloo(ranks, whole_batch):
    """torch.distributed.nn.all_gather's backward (an all-to-all plus a sum on gloo) also sums
    over ranks, so open_clip's recommended local_loss + gather_with_grad gives the exact
    gradient, as does the global loss with gather_with_grad (every rank computes the whole
    W*B x W*B loss and gets W times its share back; DDP's average divides it out)."""
    assert_matches_whole_batch([r[True, True] for r in ranks], whole_batch)
    for r in ranks:  # the global loss is the whole-batch loss on every rank
        torch.testing.assert_close(r[False, True]["loss"], whole_batch["loss"], rtol=0, atol=1e-10)
    assert_matches_whole_batch([r[False, True] for r in ranks], whole_batch)


def test_open_clip_without_gather_with_grad_gives_wrong_gradients(ranks, whole_batch):
    """Negative controls, same forward, different backward. Global loss with a plain gather
    (local features re-inserted): the towers get 1/W of the gradient while the replicated
    logit scale gets all of it. Local loss with a plain gather: the gathered candidates are
    detached, the local ones too, so a feature only gets the gradient of its role as anchor."""
    towers = {name: g for name, g in whole_batch["grads"].items() if name != "logit_scale"}
    for r in ranks:
        global_plain = r[False, False]["grads"]
        torch.testing.assert_close(r[False, False]["loss"], whole_batch["loss"], rtol=0, atol=1e-10)
        for name, want in towers.items():
            torch.testing.assert_close(global_plain[name], want / WORLD, rtol=0, atol=1e-10)
        torch.testing.assert_close(global_plain["logit_scale"], whole_batch["grads"]["logit_scale"], rtol=0, atol=1e-10)

        local_plain = r[True, False]["grads"]
        error = max((local_plain[name] - want).abs().max().item() for name, want in towers.items())
        assert error > 0.1 * max(want.abs().max().item() for want in towers.values())
    mean_loss = torch.stack([r[True, False]["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, whole_batch["loss"], rtol=0, atol=1e-10)


def test_method_on_two_ranks_gives_the_single_process_loss_and_gradients(ranks):
    method = _tiny_method(gather=True)  # no process group here: the flag changes nothing
    whole = _backward(method, method(_method_batch())["loss"])
    assert_matches_whole_batch([r["method"] for r in ranks], whole, atol=1e-8)


# ----------------------------------------------------------------------------- the CLIP method

def small_batch(batch: int = 4, channels: int = 3, size: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"image": torch.randn(batch, channels, size, size, generator=g), "text": tokenize(CAPTIONS[:batch], 8)}


def assert_every_parameter_gets_a_finite_gradient(method: nn.Module) -> None:
    grads = {name: p.grad for name, p in method.named_parameters() if p.requires_grad}
    assert not [name for name, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert method.logit_scale.grad.abs() > 0


@pytest.mark.parametrize("tower, size, extra", [("vit", 8, {}), ("resnet", 32, dict(vision_width=8))])
def test_clip_forward_backward(tower, size, extra):
    torch.manual_seed(0)
    method = CLIP(**{**TINY, "image_size": size, **extra}, image_tower=tower)
    out = method(small_batch(size=size))
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert not out["logit_scale"].requires_grad and out["logit_scale"].item() == pytest.approx(1 / 0.07)
    assert 0 <= out["image_text_acc"].item() <= 1
    out["loss"].backward()
    assert_every_parameter_gets_a_finite_gradient(method)
    assert_step_end_changes_nothing(method, step=1, max_steps=10)


def test_clip_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    method = CLIP(**TINY)
    batch = small_batch(batch=8)
    losses = losses_on_a_fixed_batch(method, batch)
    assert losses[-1] < 0.25 * losses[0], losses
    assert method(batch)["image_text_acc"].item() >= 0.75


def test_clip_under_bf16_autocast_computes_the_loss_in_float32():
    torch.manual_seed(0)
    method, batch = CLIP(**TINY), small_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(batch)
        image, text = method.encode_image(batch["image"]), method.encode_text(batch["text"])
    assert out["loss"].dtype == image.dtype == text.dtype == torch.float32
    # Same value as the loss on those features outside autocast: the logits were not bf16.
    assert out["loss"].item() == CLIPLoss()(image, text, method.logit_scale.exp()).item()
    out["loss"].backward()
    assert_every_parameter_gets_a_finite_gradient(method)


def test_logit_scale_is_clamped_in_forward_and_stays_trainable():
    method, batch = CLIP(**TINY), small_batch()
    assert method.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        method.logit_scale.fill_(math.log(1000.0))
    out = method(batch)
    assert out["logit_scale"].item() == pytest.approx(100.0)
    assert method.logit_scale.item() == pytest.approx(math.log(100.0))
    out["loss"].backward()
    assert method.logit_scale.grad.abs() > 0  # at the bound, not beyond it: the gradient still flows
    with torch.no_grad():
        method.logit_scale.fill_(-1.0)
    assert method(batch)["logit_scale"].item() == pytest.approx(1.0)  # lower bound: temperature <= 1


def test_encoders_return_unit_embeddings_and_grayscale_repeats_channels():
    torch.manual_seed(0)
    method = CLIP(**TINY, in_channels=1).eval()
    gray = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        image = method.encode_image(gray)
        text = method.encode_text(method.tokenize(CAPTIONS[:3]))
        rgb = F.normalize(method.towers.encode_image(gray.repeat(1, 3, 1, 1)), dim=-1)
    assert image.shape == (5, 8) and text.shape == (3, 8)
    torch.testing.assert_close(image.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(text.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(image, rgb)
    torch.testing.assert_close(method.embed({"image": gray}), image)


@pytest.mark.parametrize("batch, match", [
    ({"image": torch.randn(2, 3, 8, 8)}, "missing"),
    ({"image": torch.randn(2, 1, 8, 8), "text": tokenize(["a", "b"], 8)}, "in_channels"),
    ({"image": torch.randn(2, 3, 8, 8), "text": tokenize(["a", "b"], 16)}, "context_length=8"),
    ({"image": torch.randn(2, 3, 8, 8), "text": torch.zeros(2, 8)}, "integer token ids"),
    ({"image": torch.randn(3, 3, 8, 8), "text": tokenize(["a", "b"], 8)}, "one caption per image"),
])
def test_clip_rejects_bad_batches(batch, match):
    with pytest.raises(ValueError, match=match):
        CLIP(**TINY)(batch)


def test_clip_rejects_bad_config():
    for bad, match in [(dict(image_tower="convnext"), "image_tower"), (dict(in_channels=2), "in_channels"),
                       (dict(image_size=10), "multiple of 4"), (dict(vision_heads=3), "multiples of the heads"),
                       (dict(temperature=0.001), "temperature")]:
        with pytest.raises(ValueError, match=match):
            CLIP(**{**TINY, **bad})


def test_tokenizer_works_offline_and_round_trips(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    fresh = open_clip.SimpleTokenizer()  # loads the BPE vocabulary bundled in the package
    assert fresh.vocab_size == VOCAB_SIZE and (fresh.sot_token_id, fresh.eot_token_id) == (SOT, EOT)

    tokens = tokenize(["A photo of a cat.", "dog"], context_length=12)
    assert tokens.shape == (2, 12) and tokens.dtype == torch.int64
    assert torch.equal(tokens, fresh(["A photo of a cat.", "dog"], context_length=12))
    first = tokens[0].tolist()
    end = first.index(EOT)
    assert first[0] == SOT and all(t == 0 for t in first[end + 1:])
    assert fresh.decode(first[1:end]).strip() == "a photo of a cat ."
    assert tokenize("dog", 12).shape == (1, 12)
    long = tokenize(" ".join(["word"] * 50), context_length=6)[0].tolist()
    assert long[0] == SOT and long[-1] == EOT  # truncated, still pooled at its end token

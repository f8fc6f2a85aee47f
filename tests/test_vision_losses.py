"""BYOLLoss, BarlowTwinsLoss, VICRegLoss: naive references, SGD, autocast, and two gloo processes."""

from __future__ import annotations

import math

import pytest
import torch
from gloo import run_on_ranks, tiny_projector, two_view_batch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models.losses.barlow_twins import BarlowTwinsLoss
from ssl_models.losses.byol import BYOLLoss
from ssl_models.losses.vicreg import VICRegLoss


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; these tensors are tiny
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- naive references
# Written plainly, one number at a time, from the papers' formulas.


def _column(z: torch.Tensor, j: int) -> list[float]:
    return [float(v) for v in z[:, j]]


def naive_byol(p: torch.Tensor, z: torch.Tensor) -> float:
    total = 0.0
    for pi, zi in zip(p.tolist(), z.tolist(), strict=True):
        dot = sum(a * b for a, b in zip(pi, zi, strict=True))
        norms = math.sqrt(sum(a * a for a in pi)) * math.sqrt(sum(b * b for b in zi))
        total += 2 - 2 * dot / norms
    return total / len(p)


def naive_barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambda_: float) -> float:
    n, d = z1.shape

    def standardized(col: list[float]) -> list[float]:
        mean = sum(col) / n
        var = sum((v - mean) ** 2 for v in col) / n  # biased, as BatchNorm1d(affine=False)
        return [(v - mean) / math.sqrt(var + 1e-5) for v in col]

    a = [standardized(_column(z1, j)) for j in range(d)]
    b = [standardized(_column(z2, j)) for j in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss += (1 - c_ij) ** 2 if i == j else lambda_ * c_ij ** 2
    return loss


def naive_vicreg(z1: torch.Tensor, z2: torch.Tensor, sim: float, std: float, cov: float) -> float:
    n, d = z1.shape
    invariance = sum((float(z1[k, j]) - float(z2[k, j])) ** 2 for k in range(n) for j in range(d)) / (n * d)

    def variance_and_covariance(z: torch.Tensor) -> tuple[float, float]:
        cols = [_column(z, j) for j in range(d)]
        means = [sum(c) / n for c in cols]
        cov_ij = [[sum((cols[i][k] - means[i]) * (cols[j][k] - means[j]) for k in range(n)) / (n - 1)
                   for j in range(d)] for i in range(d)]
        hinge = sum(max(0.0, 1 - math.sqrt(cov_ij[j][j] + 1e-4)) for j in range(d)) / d
        off = sum(cov_ij[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return hinge, off

    (v1, c1), (v2, c2) = variance_and_covariance(z1), variance_and_covariance(z2)
    return sim * invariance + std * (v1 + v2) / 2 + cov * (c1 + c2)


def _pair(batch: int, dim: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 1000 + dim)
    z1 = torch.randn(batch, dim, generator=g, dtype=torch.float64) * scale
    z2 = z1 + torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return z1, z2


@pytest.mark.parametrize("batch,dim", [(1, 3), (5, 8), (16, 32)])
def test_byol_matches_naive_reference(batch, dim):
    p, z = _pair(batch, dim, scale=3)
    loss = BYOLLoss()(p, z)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(naive_byol(p, z), abs=1e-12)


@pytest.mark.parametrize("batch,dim", [(2, 3), (7, 8), (16, 12)])
@pytest.mark.parametrize("lambda_", [5e-3, 0.5])
def test_barlow_twins_matches_naive_reference(batch, dim, lambda_):
    z1, z2 = _pair(batch, dim, scale=2)
    loss = BarlowTwinsLoss(lambda_)(z1, z2)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(naive_barlow_twins(z1, z2, lambda_), rel=1e-10)


@pytest.mark.parametrize("batch,dim", [(2, 3), (7, 8), (16, 12)])
@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (1.0, 0.0, 3.0)])
@pytest.mark.parametrize("scale", [0.1, 3.0])  # below and above the variance hinge
def test_vicreg_matches_naive_reference(batch, dim, coeffs, scale):
    z1, z2 = _pair(batch, dim, scale=scale)
    loss = VICRegLoss(*coeffs)(z1, z2)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(naive_vicreg(z1, z2, *coeffs), rel=1e-10)


def test_vicreg_terms_add_up_to_the_loss():
    z1, z2 = _pair(6, 5)
    loss_fn = VICRegLoss(2.0, 3.0, 4.0)
    t = loss_fn.terms(z1, z2)
    assert set(t) == {"invariance", "variance", "covariance"}
    torch.testing.assert_close(loss_fn(z1, z2), 2 * t["invariance"] + 3 * t["variance"] + 4 * t["covariance"])
    assert t["variance"].item() == pytest.approx(naive_vicreg(z1, z2, 0.0, 1.0, 0.0), rel=1e-10)


def test_barlow_twins_identical_decorrelated_views_give_zero_loss():
    # Columns orthogonal to each other and to the all-ones vector (so zero-mean): the
    # cross-correlation is the identity up to the eps in the standardisation.
    basis = torch.cat([torch.ones(16, 1), torch.randn(16, 4)], dim=1).double()
    q, _ = torch.linalg.qr(basis)
    z = 100 * q[:, 1:]  # (16, 4); large, so eps is negligible next to the variance
    assert BarlowTwinsLoss()(z, z).item() < 1e-8
    assert BarlowTwinsLoss()(z, z.flip(dims=[1])).item() > 1  # same features, permuted: far from identity


LOSSES = {
    "byol": BYOLLoss,
    "barlow_twins": BarlowTwinsLoss,
    "vicreg": VICRegLoss,
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_decreases_under_sgd(name):
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    view1, view2 = x + 0.5 * torch.randn_like(x), x + 0.5 * torch.randn_like(x)
    projector = nn.Linear(16, 8)
    optimizer = torch.optim.SGD(projector.parameters(), lr=0.02 if name == "vicreg" else 0.5)
    loss_fn = LOSSES[name]()
    losses = []
    for _ in range(40):
        loss = loss_fn(projector(view1), projector(view2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_is_float32_under_bf16_autocast(name):
    """Autocast would run the (D, D) products in bf16; the losses switch it off inside."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(16, 32), torch.randn(16, 32)
    loss_fn = LOSSES[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_fn(z1, z2)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, loss_fn(z1, z2))
    # bf16 inputs are raised to float32, not computed in bf16.
    low = loss_fn(z1.bfloat16(), z2.bfloat16())
    assert low.dtype == torch.float32
    assert torch.equal(low, loss_fn(z1.bfloat16().float(), z2.bfloat16().float()))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_rejects_mismatched_shapes(name):
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        LOSSES[name]()(torch.randn(4, 8), torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        LOSSES[name]()(torch.randn(4, 8, 2), torch.randn(4, 8, 2))


@pytest.mark.parametrize("loss_cls", [BarlowTwinsLoss, VICRegLoss])
def test_batch_statistics_losses_need_two_samples(loss_cls):
    with pytest.raises(ValueError, match="at least 2 samples"):
        loss_cls()(torch.randn(1, 8), torch.randn(1, 8))


@pytest.mark.parametrize("loss_cls", [BarlowTwinsLoss, VICRegLoss])
def test_gather_flag_is_a_no_op_without_process_group(loss_cls):
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.equal(loss_cls(gather_distributed=True)(z1, z2), loss_cls()(z1, z2))


# ----------------------------------------------------------------------------- two gloo processes

WORLD = 2
PAIRS = 8  # global batch; each rank takes PAIRS // WORLD
GATHERED = {"barlow_twins": lambda gather: BarlowTwinsLoss(gather_distributed=gather),
            "vicreg": lambda gather: VICRegLoss(gather_distributed=gather)}


def _loss_and_grads(name: str, model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, gather: bool) -> dict:
    z1, z2 = model(torch.cat([x1, x2])).chunk(2)  # one forward, as the methods do
    loss = GATHERED[name](gather)(z1, z2)
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.parameters()]}


def _worker(rank: int) -> dict:
    x1, x2 = two_view_batch(PAIRS)
    b = PAIRS // WORLD
    rows = slice(rank * b, (rank + 1) * b)  # rank r takes pairs [r*B, (r+1)*B)
    return {(name, gather): _loss_and_grads(name, DistributedDataParallel(tiny_projector()), x1[rows], x2[rows], gather)
            for name in GATHERED for gather in (True, False)}


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_worker, tmp_path_factory.mktemp("gloo_vision"), world=WORLD)


@pytest.mark.parametrize("name", sorted(GATHERED))
def test_two_ranks_give_the_single_process_loss_and_gradients(two_rank_results, name):
    whole = _loss_and_grads(name, tiny_projector(), *two_view_batch(PAIRS), gather=False)
    ranks = [res[(name, True)] for res in two_rank_results]
    for res in ranks:  # every rank computes the whole batch's loss ...
        torch.testing.assert_close(res["loss"], whole["loss"], rtol=0, atol=1e-10)
        for got, want in zip(res["grads"], whole["grads"], strict=True):  # ... and DDP's average is exact
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(GATHERED))
def test_two_ranks_without_gather_differ_from_the_single_process(two_rank_results, name):
    """Negative control: per-rank batch statistics are not the whole batch's."""
    whole = _loss_and_grads(name, tiny_projector(), *two_view_batch(PAIRS), gather=False)
    mean_loss = torch.stack([res[(name, False)]["loss"] for res in two_rank_results]).mean()
    assert abs(mean_loss.item() - whole["loss"].item()) > 1e-3 * abs(whole["loss"].item())

"""NTXentLoss and ssl_models.distributed: naive reference, SGD, and a two-process gloo gather."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_ranks, tiny_projector, two_view_batch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models import distributed
from ssl_models.losses import NTXentLoss

TEMPERATURE = 0.1


def naive_ntxent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """The SimCLR formula written out: -log(exp(s_ap / t) / sum_{k != a} exp(s_ak / t)), mean over 2N anchors."""
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    two_n, n = len(z), len(z) // 2
    total = 0.0
    for a in range(two_n):
        positive = (a + n) % two_n
        numerator = math.exp(float(z[a] @ z[positive]) / temperature)
        denominator = sum(math.exp(float(z[a] @ z[k]) / temperature) for k in range(two_n) if k != a)
        total += -math.log(numerator / denominator)
    return total / two_n


@pytest.mark.parametrize("batch", [2, 5, 16])
@pytest.mark.parametrize("dim", [3, 32])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5])
def test_ntxent_matches_naive_reference(batch, dim, temperature):
    g = torch.Generator().manual_seed(batch * 1000 + dim)
    z1 = torch.randn(batch, dim, generator=g, dtype=torch.float64) * 3  # unnormalised on purpose
    z2 = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    loss = NTXentLoss(temperature)(z1, z2)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(naive_ntxent(z1, z2, temperature), abs=1e-9)


def test_ntxent_gather_flag_is_a_no_op_without_process_group():
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.equal(NTXentLoss(gather_distributed=True)(z1, z2), NTXentLoss()(z1, z2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ntxent_self_mask_is_finite_in_low_precision(dtype):
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    a, b = z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()
    loss = NTXentLoss(TEMPERATURE)(a, b)
    loss.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert loss.item() == pytest.approx(NTXentLoss(TEMPERATURE)(z1, z2).item(), rel=2e-2)


def test_ntxent_decreases_under_sgd():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    view1, view2 = x + 0.8 * torch.randn_like(x), x + 0.8 * torch.randn_like(x)
    projector = nn.Linear(16, 8)
    optimizer = torch.optim.SGD(projector.parameters(), lr=0.5)
    loss_fn = NTXentLoss(TEMPERATURE)
    losses = []
    for _ in range(50):
        loss = loss_fn(projector(view1), projector(view2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_distributed_helpers_without_process_group():
    assert distributed.rank() == 0
    assert distributed.world_size() == 1
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x


# ----------------------------------------------------------------------------- two gloo processes

WORLD = 2
PAIRS = 8  # global batch; each rank takes PAIRS // WORLD


def _loss_and_grads(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, gather: bool) -> dict:
    z = model(torch.cat([x1, x2]))  # (2B, 6): one forward, as SimCLR does
    b = len(x1)
    loss = NTXentLoss(TEMPERATURE, gather_distributed=gather)(z[:b], z[b:])
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.parameters()]}


def _plain_gather(x: torch.Tensor) -> torch.Tensor:
    """open_clip-style gather without the sum-backward: only this rank's own loss reaches ``x``."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _worker(rank: int) -> dict:
    gathered = distributed.gather_with_grad(torch.full((2, 1), float(rank)))
    results = {
        "rank": distributed.rank(),
        "world_size": distributed.world_size(),
        "gathered": gathered.flatten().tolist(),
    }
    x1, x2 = two_view_batch(PAIRS)
    b = PAIRS // WORLD
    rows = slice(rank * b, (rank + 1) * b)  # rank r takes pairs [r*B, (r+1)*B)
    results["sum_backward"] = _loss_and_grads(DistributedDataParallel(tiny_projector()), x1[rows], x2[rows], True)
    with mock.patch.object(distributed, "gather_with_grad", _plain_gather):
        results["plain_gather"] = _loss_and_grads(DistributedDataParallel(tiny_projector()), x1[rows], x2[rows], True)
    return results


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_worker, tmp_path_factory.mktemp("gloo"), world=WORLD)


@pytest.fixture(scope="module")
def whole_batch() -> dict:
    return _loss_and_grads(tiny_projector(), *two_view_batch(PAIRS), gather=False)


def test_gather_with_grad_concatenates_in_rank_order(two_rank_results):
    for r, res in enumerate(two_rank_results):
        assert (res["rank"], res["world_size"]) == (r, WORLD)
        assert res["gathered"] == [0.0, 0.0, 1.0, 1.0]


def test_two_ranks_give_the_single_process_loss_and_gradients(two_rank_results, whole_batch):
    ranks = [res["sum_backward"] for res in two_rank_results]
    mean_loss = torch.stack([res["loss"] for res in ranks]).mean()
    torch.testing.assert_close(mean_loss, whole_batch["loss"], rtol=0, atol=1e-10)
    for res in ranks:  # DDP leaves the same averaged gradient on every rank
        for got, want in zip(res["grads"], whole_batch["grads"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_gather_without_sum_backward_gives_wrong_gradients(two_rank_results, whole_batch):
    """Negative control: the forward is the same, but the cross-rank gradient terms are lost."""
    ranks = [res["plain_gather"] for res in two_rank_results]
    mean_loss = torch.stack([res["loss"] for res in ranks]).mean()
    torch.testing.assert_close(mean_loss, whole_batch["loss"], rtol=0, atol=1e-10)
    pairs = zip(ranks[0]["grads"], whole_batch["grads"], strict=True)
    error = max((got - want).abs().max().item() for got, want in pairs)
    scale = max(want.abs().max().item() for want in whole_batch["grads"])
    assert error > 1e-2 * scale

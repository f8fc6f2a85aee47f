"""One training step does not depend on how many workers compute it (issue 17).

With global BatchNorm (``scaling.sync_batchnorm``, ``ssl_models.distributed.GlobalBatchNorm``)
and gathered negatives and statistics, every method with batch-coupled layers gives, on 2 gloo
ranks that each hold half the batch under DDP, the loss, the gradient of every parameter and the
BatchNorm running statistics of one process on the whole batch (float64, 1e-8). Per-worker
BatchNorm, the control, does not.
"""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from gloo import run_on_ranks
from test_clip import CAPTIONS
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models.distributed import GlobalBatchNorm, convert_global_batchnorm, has_batchnorm
from ssl_models.methods.barlow_twins import BarlowTwins
from ssl_models.methods.byol import BYOL
from ssl_models.methods.clip import CLIP, tokenize
from ssl_models.methods.dino import DINO
from ssl_models.methods.rotnet import RotNet
from ssl_models.methods.simclr import SimCLR
from ssl_models.methods.vicreg import VICReg

BATCH, WORLD = 8, 2
ENCODER = dict(in_channels=1, encoder_widths=[4, 8])
BUILD = {
    "simclr": lambda: SimCLR(**ENCODER, projector_width=16, projector_dim=8, gather_distributed=True),
    "byol": lambda: BYOL(**ENCODER, projector_width=16, projector_dim=8, predictor_width=16),
    "barlow_twins": lambda: BarlowTwins(**ENCODER, projector_width=16, projector_dim=8, gather_distributed=True),
    "vicreg": lambda: VICReg(**ENCODER, expander_width=16, expander_dim=8, gather_distributed=True),
    "rotnet": lambda: RotNet(**ENCODER, classifier_width=16),
    "dino": lambda: DINO(**ENCODER, head_width=16, head_batchnorm=True, bottleneck_dim=8, out_dim=16),
    "clip": lambda: CLIP(image_tower="resnet", in_channels=1, image_size=32, embed_dim=8, vision_width=8,
                         context_length=8, text_width=16, text_layers=1, text_heads=2, gather_distributed=True),
}


def _method(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILD[name]().double()


def _batch(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name == "clip":  # CLIP's ResNet tower (its BatchNorm layers) takes multiples of 32 pixels
        return {"image": torch.randn(BATCH, 1, 32, 32, generator=g, dtype=torch.float64),
                "text": tokenize(CAPTIONS[:BATCH], 8)}
    x = torch.randn(BATCH, 1, 16, 16, generator=g, dtype=torch.float64)
    if name == "rotnet":  # one view, rotated four ways inside
        return {"view1": x}
    if name == "dino":  # multi-crop: 2 global views and 4 local ones at half the side
        return {f"view{i + 1}": x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64) if i < 2
                else torch.randn(BATCH, 1, 8, 8, generator=g, dtype=torch.float64) for i in range(6)}
    return {"view1": x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64),
            "view2": x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)}


def _step(method: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    model = method.module if isinstance(method, DistributedDataParallel) else method
    loss = method(batch)["loss"]
    loss.backward()  # under DDP the gradient arrives averaged over the ranks, as in training
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads,
            "buffers": {n: b.clone() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))}}


def _worker(names: list[str], rank: int) -> dict:
    warnings.simplefilter("ignore")
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    out = {}
    for name in names:
        local = {k: v[rows] for k, v in _batch(name).items()}
        out[name] = _step(DistributedDataParallel(convert_global_batchnorm(_method(name))), local)
        out[name + "/per-worker"] = _step(DistributedDataParallel(_method(name)), local)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(partial(_worker, sorted(BUILD)), tmp_path_factory.mktemp("gloo_bn"), world=WORLD)


@pytest.mark.parametrize("name", sorted(BUILD))
def test_a_step_on_two_workers_is_the_step_on_one(ranks, name):
    torch.set_num_threads(1)
    assert has_batchnorm(_method(name))  # each of these normalises over the batch somewhere
    whole = _step(_method(name), _batch(name))
    loss = torch.stack([r[name]["loss"] for r in ranks]).mean()  # DDP optimises the mean of the rank losses
    torch.testing.assert_close(loss, whole["loss"], rtol=1e-8, atol=1e-8)
    for res in ranks:
        assert res[name]["grads"].keys() == whole["grads"].keys()
        for key, want in whole["grads"].items():
            torch.testing.assert_close(res[name]["grads"][key], want, rtol=1e-8, atol=1e-8, msg=key)
        for key, want in whole["buffers"].items():  # the running statistics, for evaluation
            torch.testing.assert_close(res[name]["buffers"][key], want, rtol=1e-8, atol=1e-8, msg=key)
    # The control: each worker's own statistics give another step.
    diff = max((ranks[0][name + "/per-worker"]["grads"][k] - g).abs().max().item() for k, g in whole["grads"].items())
    assert diff > 1e-4


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3),
                         nn.BatchNorm1d(3))


def test_global_batchnorm_is_plain_batchnorm_in_one_process_and_keeps_the_state_dict():
    plain, converted = _convnet(), convert_global_batchnorm(_convnet())
    assert sum(isinstance(m, GlobalBatchNorm) for m in converted.modules()) == 2
    assert converted.state_dict().keys() == plain.state_dict().keys()  # checkpoints load either way
    x = torch.randn(6, 1, 8, 8)
    torch.testing.assert_close(converted(x), plain(x))  # no process group: BatchNorm itself
    torch.testing.assert_close(converted[1].running_var, plain[1].running_var)
    converted.load_state_dict(plain.state_dict())


def _clip_vit() -> nn.Module:
    torch.manual_seed(0)
    return CLIP(in_channels=1, image_size=16, patch_size=8, embed_dim=8, vision_width=16, vision_layers=1,
                vision_heads=2, context_length=8, text_width=16, text_layers=1, text_heads=2,
                gather_distributed=True).double()


def _clip_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {"image": torch.randn(BATCH, 1, 16, 16, generator=g, dtype=torch.float64),
            "text": tokenize(CAPTIONS[:BATCH], 8)}


def _fsdp_worker(rank: int) -> dict:
    """CLIP sharded as the loop shards it (scaling.strategy=fsdp): the scalar logit_scale stays
    whole on every rank and the loop averages its gradient."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ssl_platform.train.loop import shard_model, sync_scalar_gradients

    warnings.simplefilter("ignore")
    method = shard_model(_clip_vit(), init_device_mesh("cpu", (WORLD,)))
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    loss = method({k: v[rows] for k, v in _clip_batch().items()})["loss"]
    loss.backward()
    sync_scalar_gradients(method, WORLD)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in method.named_parameters()}
    total = loss.detach().clone()
    dist.all_reduce(total)
    return {"loss": total / WORLD, "grads": grads}


def test_clip_trains_under_fsdp_with_the_single_process_step(tmp_path):
    """fully_shard refuses 0-dim parameters: the loop leaves them unsharded and syncs them."""
    torch.set_num_threads(1)
    ranks = run_on_ranks(_fsdp_worker, tmp_path)
    whole = _step(_clip_vit(), _clip_batch())
    for res in ranks:
        torch.testing.assert_close(res["loss"], whole["loss"], rtol=1e-8, atol=1e-8)
        assert res["grads"].keys() == whole["grads"].keys() and "towers.logit_scale" in whole["grads"]
        for key, want in whole["grads"].items():
            torch.testing.assert_close(res["grads"][key], want, rtol=1e-8, atol=1e-8, msg=key)

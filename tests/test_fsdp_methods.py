"""Every method trains under ``scaling.strategy=fsdp`` (issue 17 item 4).

On 2 gloo ranks, each holding half the batch, a method sharded as the loop shards it
(``shard_model``: FSDP2 on every ``nn.ModuleList`` block and the root, 0-dim parameters whole and
synced by ``sync_scalar_gradients``) gives the loss and the gradient of every parameter that DDP
gives on the same batch (float64, 1e-8). BatchNorm is global in both, as the loop makes it.
"""

from __future__ import annotations

import warnings

import pytest
import test_grad_accum_exact as exact
import test_worker_count_invariance as invariance
import torch
from gloo import run_on_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ssl_models
from ssl_models.distributed import convert_global_batchnorm
from ssl_platform.train.loop import shard_model, sync_scalar_gradients

VOCAB, LEN = 40, 8
TEXT = dict(vocab_size=VOCAB, max_len=LEN, dim=16, depth=2, heads=2, dropout=0.0)
BUILD = {**{n: invariance.BUILD[n] for n in invariance.BUILD if n != "clip"},
         "clip": exact.BUILD["clip"], "siglip": exact.BUILD["siglip"], "cpc": exact.BUILD["cpc"],
         "bert": lambda: ssl_models.BERT(**TEXT), "gpt": lambda: ssl_models.GPT(**TEXT)}


def _method(name: str) -> nn.Module:
    torch.manual_seed(0)
    return convert_global_batchnorm(BUILD[name]().double())


def _batch(name: str) -> dict[str, torch.Tensor]:
    if name in ("bert", "gpt"):
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, VOCAB, (invariance.BATCH, LEN), generator=g)
        if name == "gpt":
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        labels = torch.full_like(ids, -100)
        labels[:, 1::3] = ids[:, 1::3]  # every third token masked, as many on each rank
        return {"input_ids": ids, "mlm_labels": labels, "token_type_ids": (torch.arange(LEN) >= LEN // 2).long()
                .expand_as(ids), "attention_mask": torch.ones_like(ids),
                "nsp_labels": torch.arange(invariance.BATCH) % 2}
    if name in exact.BUILD:
        return exact._batch(name)
    return invariance._batch(name)


def _step(model: nn.Module, method: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    loss = model(batch)["loss"]
    loss.backward()
    sync_scalar_gradients(method, 2)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in method.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads}


def _worker(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    out = {}
    for name in sorted(BUILD):
        half = {k: v.chunk(2)[rank] for k, v in _batch(name).items()}
        ddp = _method(name)
        fsdp = _method(name)
        out[name] = {"ddp": _step(DistributedDataParallel(ddp), ddp, half),
                     "fsdp": _step(shard_model(fsdp, init_device_mesh("cpu", (2,))), fsdp, half)}
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_worker, tmp_path_factory.mktemp("gloo_fsdp"))


def test_every_method_is_covered():
    assert set(BUILD) == set(ssl_models.METHODS)


@pytest.mark.parametrize("name", sorted(ssl_models.METHODS))
def test_fsdp_gives_ddps_loss_and_gradients(ranks, name):
    for rank in ranks:
        ddp, fsdp = rank[name]["ddp"], rank[name]["fsdp"]
        torch.testing.assert_close(fsdp["loss"], ddp["loss"], rtol=1e-8, atol=1e-8)
        assert fsdp["grads"].keys() == ddp["grads"].keys() and ddp["grads"]
        for key, want in ddp["grads"].items():
            torch.testing.assert_close(fsdp["grads"][key], want, rtol=1e-8, atol=1e-8, msg=f"{name}: {key}")

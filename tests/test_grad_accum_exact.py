"""Exact gradient accumulation (``train.grad_accum_mode=exact``, GradCache; issue 17 item 2).

With k = 4 micro-batches, ``accumulate_exact`` gives every parameter the gradient of one big batch
(float64, 1e-8) for every method that declares ``spec.accumulation == "gradcache"``: CLIP and SigLIP
(no batch-dependent layer), SimCLR, Barlow Twins and VICReg (BatchNorm held in eval mode: in
training mode it normalises each micro-batch with its own statistics, which is what the run's
first line says), and CPC. Dropout draws the same masks in the re-run (the RNG state is replayed).
Independent accumulation, the control, differs for the coupled losses.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from gloo import run_on_ranks
from test_clip import CAPTIONS
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ssl_models
from ssl_models.methods.barlow_twins import BarlowTwins
from ssl_models.methods.clip import CLIP, tokenize
from ssl_models.methods.cpc import CPC
from ssl_models.methods.siglip import SigLIP
from ssl_models.methods.simclr import SimCLR
from ssl_models.methods.vicreg import VICReg
from ssl_platform.config import ConfigError, load_config
from ssl_platform.train.grad_cache import accumulate_exact, concat_features
from ssl_platform.train.loop import (
    accumulate_gradients,
    accumulation_words,
    gradient_sync,
    shard_model,
    sync_scalar_gradients,
)

BATCH, K = 8, 4
ENCODER = dict(in_channels=1, encoder_widths=[4, 8])
TOWERS = dict(in_channels=1, image_size=16, embed_dim=8, vision_width=16, vision_layers=1, vision_heads=2,
              patch_size=8, context_length=8, text_width=16, text_layers=1, text_heads=2)
BUILD = {
    "clip": lambda **kw: CLIP(**TOWERS, **kw),
    "siglip": lambda **kw: SigLIP(**TOWERS, **kw),
    "simclr": lambda **kw: SimCLR(**ENCODER, projector_width=16, projector_dim=8, **kw),
    "barlow_twins": lambda **kw: BarlowTwins(**ENCODER, projector_width=16, projector_dim=8, **kw),
    "vicreg": lambda **kw: VICReg(**ENCODER, expander_width=16, expander_dim=8, **kw),
    "cpc": lambda **kw: CPC(channels=8, context_dim=8, num_steps=3, num_heads=2, context="transformer", **kw),
}
GRADCACHE = sorted(n for n, c in ssl_models.METHODS.items() if c.spec.accumulation == "gradcache")


def _method(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    method = BUILD[name](**kwargs).double().train()
    for m in method.modules():  # BatchNorm on the running statistics: the same in every micro-batch
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return method


def _batch(name: str, batch: int = BATCH) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name in ("clip", "siglip"):
        return {"image": torch.randn(batch, 1, 16, 16, generator=g, dtype=torch.float64),
                "text": tokenize(CAPTIONS[:batch], 8)}
    if name == "cpc":
        return {"audio": torch.randn(batch, 1600, generator=g, dtype=torch.float64),
                "lengths": torch.tensor([1600, 1400, 1600, 1200, 1600, 1600, 1500, 1600][:batch])}
    x = torch.randn(batch, 1, 16, 16, generator=g, dtype=torch.float64)
    return {"view1": x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64),
            "view2": x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)}


def _split(batch: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    return [{key: value.chunk(k)[i] for key, value in batch.items()} for i in range(k)]


def _grads(method: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def _big_batch(name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    method = _method(name)
    loss = method(_batch(name))["loss"]
    loss.backward()
    return loss.detach(), _grads(method)


@pytest.mark.parametrize("name", GRADCACHE)
def test_exact_accumulation_equals_one_big_batch(name):
    loss, grads = _big_batch(name)
    method = _method(name)
    out = accumulate_exact(method, method, _split(_batch(name), K))
    exact = _grads(method)
    assert exact.keys() == grads.keys()
    torch.testing.assert_close(out["loss"], loss, rtol=0, atol=1e-10)  # reported in float64 (at least float32)
    for n in grads:
        torch.testing.assert_close(exact[n], grads[n], rtol=0, atol=1e-8, msg=f"{name}: {n}")

    # The control: each micro-batch with its own negatives / statistics is another objective.
    independent = _method(name)
    accumulate_gradients(independent, _split(_batch(name), K))
    assert max((independent.get_parameter(n).grad - grads[n]).abs().max() for n in grads) > 1e-6


def test_every_coupled_method_is_covered():
    assert set(GRADCACHE) == set(BUILD)


MEAN = sorted(n for n, c in ssl_models.METHODS.items() if c.spec.accumulation == "mean")


@pytest.mark.parametrize("name", MEAN)
def test_a_per_sample_loss_accumulates_exactly_without_gradcache(name):
    """``spec.accumulation == "mean"``: plain accumulation of the 1/k-scaled losses is the big
    batch's gradient (BatchNorm in eval mode; GPT's micro-batches hold equally many tokens)."""
    import test_fsdp_methods as fsdp

    def build() -> nn.Module:
        torch.manual_seed(0)
        method = fsdp.BUILD[name]().double().train()
        for m in method.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return method

    batch = fsdp._batch(name)
    whole = build()
    whole(batch)["loss"].backward()
    method = build()
    accumulate_gradients(method, _split(batch, K))
    grads = _grads(whole)
    assert _grads(method).keys() == grads.keys()
    for n, want in grads.items():
        torch.testing.assert_close(method.get_parameter(n).grad, want, rtol=0, atol=1e-8, msg=f"{name}: {n}")


@pytest.mark.parametrize("name", GRADCACHE)
def test_objective_uses_no_parameter(name):
    """The protocol's contract: every parameter the loss depends on enters through ``features``
    (so the re-run's backward, inside DDP's and FSDP's hooks, is where its gradient comes from)."""
    method = _method(name)
    with torch.no_grad():
        features = method.features(_batch(name))
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in features.items()}
    method.objective(leaves)["loss"].backward()
    assert not _grads(method)
    assert any(v.grad is not None for v in leaves.values())


def test_dropout_is_replayed():
    """CPC's transformer context with dropout: exact accumulation equals the loss over the
    micro-batches' features computed with a graph from the same RNG state (the memory-hungry way)."""
    batch = _split(_batch("cpc"), K)
    reference = _method("cpc", dropout=0.3)
    torch.manual_seed(5)
    reference.objective(concat_features([reference.features(b) for b in batch]))["loss"].backward()
    method = _method("cpc", dropout=0.3)
    torch.manual_seed(5)
    accumulate_exact(method, method, batch)
    expected, got = _grads(reference), _grads(method)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-8, msg=n)
    after = torch.rand(3)  # the RNG moved on as one pass over the micro-batches moves it
    torch.manual_seed(5)
    for b in batch:
        reference.features(b)
    torch.testing.assert_close(torch.rand(3), after)


def test_batchnorm_running_statistics_move_once_per_micro_batch():
    """Step 1 (features without a graph) leaves the running statistics alone; the re-run moves
    them as independent accumulation does."""
    batch = _split(_batch("simclr"), K)
    torch.manual_seed(0)
    exact = BUILD["simclr"]().double()
    torch.manual_seed(0)
    independent = BUILD["simclr"]().double()
    accumulate_exact(exact, exact, batch)
    accumulate_gradients(independent, batch)
    for (n, b), (_, c) in zip(exact.named_buffers(), independent.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=0, atol=1e-12, msg=n)


def test_run_header_says_what_is_exact():
    spec = ssl_models.METHODS
    assert accumulation_words("exact", 1, spec["simclr"].spec, True) == ""
    assert "GradCache; BatchNorm statistics per micro-batch" in accumulation_words("exact", 4, spec["simclr"].spec,
                                                                                   True)
    assert accumulation_words("exact", 4, spec["clip"].spec, False) == " (exact accumulation: GradCache)"
    assert "per-sample loss" in accumulation_words("exact", 4, spec["rotnet"].spec, True)
    assert "BERT has no exact accumulation" in accumulation_words("exact", 4, spec["bert"].spec, False)
    assert "grad_accum_mode=independent" in accumulation_words("independent", 4, spec["clip"].spec, False)


def test_config_checks_the_mode_and_the_split():
    assert load_config("simclr-digits").train.grad_accum_mode == "exact"
    with pytest.raises(ConfigError, match=r"train\.grad_accum_mode='cached': expected one of exact, independent"):
        load_config("simclr-digits", ["train.grad_accum_mode=cached"])
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps=3 equal micro"):
        load_config("simclr-digits", ["train.batch_size=64", "scaling.num_workers=2", "train.grad_accum_steps=3"])


# ----------------------------------------------------------------------------- 2 gloo ranks

def _worker(rank: int) -> dict:
    """Rank ``rank``'s half of the batch as k = 2 micro-batches, exact accumulation, under DDP and
    under FSDP as the loop shards it (the scalar logit_scale whole on every rank, synced after)."""
    from torch.distributed.device_mesh import init_device_mesh

    warnings.simplefilter("ignore")
    half = _split(_batch("clip"), 2)[rank]
    out = {}
    for strategy in ("ddp", "fsdp"):
        method = _method("clip", gather_distributed=True)
        model = (DistributedDataParallel(method) if strategy == "ddp"
                 else shard_model(method, init_device_mesh("cpu", (2,))))
        step = accumulate_exact(model, method, _split(half, 2), gradient_sync=gradient_sync)
        sync_scalar_gradients(method, 2)
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for n, p in method.named_parameters() if p.grad is not None}
        out[strategy] = {"loss": step["loss"], "grads": grads}
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_exact_accumulation_on_two_ranks_equals_one_process(strategy, two_ranks):
    method = _method("clip", gather_distributed=True)
    loss = method(_batch("clip"))["loss"]
    loss.backward()
    grads = _grads(method)
    results = [r[strategy] for r in two_ranks]
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, loss, rtol=0, atol=1e-10)
    for r in results:
        assert r["grads"].keys() == grads.keys()
        for n in grads:
            torch.testing.assert_close(r["grads"][n], grads[n], rtol=0, atol=1e-8, msg=f"{strategy}: {n}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(_worker, tmp_path_factory.mktemp("gloo_gradcache"))


def test_bench_memory_measures_a_step_and_refuses_other_kinds():
    """``sslp bench train --memory``'s one measurement, in this process, on a tiny SimCLR (the
    command runs each in a fresh process); a text preset is refused."""
    from ssl_platform.bench_memory import format_memory_bench, measure

    tiny = ["data.image_size=16", "model.encoder_widths=[4,8]", "model.projector_width=16", "model.projector_dim=8",
            "train.batch_size=16"]
    row = measure("simclr-digits", 4, "exact", 1, tiny)
    assert row["exact"] and row["batch_size"] == 16 and row["step_s"] > 0 and row["peak_step_bytes"] >= 0
    assert not measure("simclr-digits", 4, "independent", 1, tiny)["exact"]
    with pytest.raises(SystemExit, match="image and image-caption presets"):
        measure("gpt-python-docs", 2, "exact", 1, [])
    text = format_memory_bench([{"preset": "p", "batch_size": 16, "accum": 8, "mode": "exact", "exact": True,
                                 "param_mb": 1.0, "peak_mb_k1": 80.0, "peak_mb_k": 20.0, "step_s_k1": 0.1,
                                 "step_s_k": 0.125, "throughput_ratio": 0.8}])
    assert "memory 0.25x, throughput 0.80x" in text and "k=8 (exact, GradCache)" in text


def test_the_run_header_builds_nothing_to_say_it():
    """The driver's first line: the architecture on the meta device tells whether BatchNorm is there."""
    from ssl_platform.train.trainer import describe_accumulation

    assert describe_accumulation(load_config("simclr-digits")) == ""
    assert describe_accumulation(load_config("clip-digit-captions", ["train.grad_accum_steps=4"])) == (
        ", 4 micro-batches a step (exact accumulation: GradCache)")
    assert describe_accumulation(load_config("simclr-digits", ["train.grad_accum_steps=4"])).endswith(
        "(exact accumulation: GradCache; BatchNorm statistics per micro-batch)")

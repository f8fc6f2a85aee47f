"""The per-worker loop's pieces: gradient accumulation, precision, DDP/FSDP, clipping, compile,
checkpoints with RNG states; and one tiny Ray Train run that resumes BYOL's momentum schedule."""

import random
from functools import partial

import numpy as np
import pytest
import torch
from gloo import run_on_ranks
from torch import nn
from torch.distributed.tensor import DTensor

import ssl_models
from ssl_platform.train.checkpoint import (
    TrainState,
    all_rng_states,
    full_state_dicts,
    load_payload,
    restore_state,
    save_state,
)
from ssl_platform.train.loop import (
    accumulate_gradients,
    as_dtype,
    autocast_context,
    clip_gradients,
    groups_of,
    micro_batch_size,
    seed_everything,
    shard_model,
)
from ssl_platform.train.metrics import StepMeter, read_metrics
from ssl_platform.train.optim import build_optimizer

VOCAB, LEN = 40, 8


def tiny_gpt() -> nn.Module:
    """No batch statistics: a mean over tokens, so micro-batches and ranks add up exactly."""
    torch.manual_seed(0)
    return ssl_models.build_method("gpt", vocab_size=VOCAB, max_len=LEN, dim=16, depth=2, heads=2)


def text_batch(rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(0, VOCAB, (rows, LEN), generator=g),
            "attention_mask": torch.ones(rows, LEN, dtype=torch.long)}


def split(batch: dict, parts: int) -> list[dict]:
    chunks = zip(*(v.chunk(parts) for v in batch.values()), strict=True)  # (part 0 of every key), (part 1 ...), ...
    return [dict(zip(batch, values, strict=True)) for values in chunks]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- single process

def test_two_accumulated_micro_batches_give_the_gradient_of_the_whole_batch():
    batch = text_batch(8)
    whole, accumulated = tiny_gpt(), tiny_gpt()
    out_whole = accumulate_gradients(whole, [batch])
    out_acc = accumulate_gradients(accumulated, split(batch, 2))
    assert out_acc["loss"] == pytest.approx(out_whole["loss"].item(), rel=1e-5)
    g_whole, g_acc = grads(whole), grads(accumulated)
    assert g_whole.keys() == g_acc.keys() and len(g_whole) > 10
    for name in g_whole:
        torch.testing.assert_close(g_acc[name], g_whole[name], rtol=1e-4, atol=1e-6, msg=name)
    # A plain sum of the micro-batch losses would double the gradient: the 1/k scaling is there.
    doubled = tiny_gpt()
    for micro in split(batch, 2):
        doubled(micro)["loss"].backward()
    assert torch.allclose(grads(doubled)["transformer.tok_emb.weight"], 2 * g_whole["transformer.tok_emb.weight"],
                          rtol=1e-4, atol=1e-6)


def test_micro_batches_split_the_global_batch_or_say_what_to_change():
    assert micro_batch_size(256, world=2, accum_steps=4) == 32
    with pytest.raises(ValueError, match="use a multiple of 6"):
        micro_batch_size(64, world=2, accum_steps=3)


def test_groups_of_drops_an_incomplete_last_group():
    assert list(groups_of(range(7), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(groups_of(range(2), 1)) == [[0], [1]]


@pytest.mark.parametrize("precision, dtype",
                         [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_on_cpu(precision, dtype):
    x = torch.randn(4, 4)
    with autocast_context(precision, torch.device("cpu")):
        assert (x @ x).dtype == dtype


def test_fp64_runs_in_float64_and_the_logged_loss_keeps_its_digits():
    """``train.precision=fp64``: no autocast, the batch's floats cast (token ids kept), and the
    loss reaches the metrics row in float64, so runs can be compared to 1e-9 (README Resume)."""
    x = torch.randn(4, 4, dtype=torch.float64)
    with autocast_context("fp64", torch.device("cpu")):
        assert (x @ x).dtype == torch.float64
    views = as_dtype({"view1": torch.rand(2, 3), "label": torch.ones(2, dtype=torch.long)}, torch.float64)
    assert views["view1"].dtype == torch.float64 and views["label"].dtype == torch.long
    assert as_dtype(views, None) is views  # fp32, bf16, auto: the batch as it is
    out = accumulate_gradients(tiny_gpt().double(), [text_batch(4)])
    assert out["loss"].dtype == torch.float64
    meter = StepMeter()
    meter.add(out, samples=4, tokens=0)
    assert meter.pop(1, torch.device("cpu"))["loss"] == out["loss"].item()  # not rounded to float32


def test_bf16_autocast_keeps_the_loss_float32_and_the_gradient_close():
    batch = text_batch(4)
    fp32, bf16 = tiny_gpt(), tiny_gpt()
    out32 = accumulate_gradients(fp32, [batch])
    out16 = accumulate_gradients(bf16, [batch], autocast_context("bf16", torch.device("cpu")))
    assert out16["loss"].dtype == torch.float32
    assert out16["loss"].item() == pytest.approx(out32["loss"].item(), rel=2e-2)
    cos = nn.functional.cosine_similarity(grads(bf16)["transformer.tok_emb.weight"].flatten(),
                                          grads(fp32)["transformer.tok_emb.weight"].flatten(), dim=0)
    assert cos > 0.99


def test_clip_returns_the_norm_before_clipping_and_clips_to_max_norm():
    model = tiny_gpt()
    accumulate_gradients(model, [text_batch(4)])
    before = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads(model).values()]))
    norm = clip_gradients(model, max_norm=0.01)
    after = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads(model).values()]))
    assert norm.item() == pytest.approx(before.item(), rel=1e-5) and before > 0.01
    assert after.item() == pytest.approx(0.01, rel=1e-3)
    assert clip_gradients(model, max_norm=0.0).item() == pytest.approx(after.item(), rel=1e-5)  # 0: measure only


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, batch):
        return {"loss": self.layer(batch["x"]).tanh().pow(2).mean()}


def test_compiled_model_accumulates_the_same_gradients():
    torch.manual_seed(0)
    eager = _Tiny()
    compiled_inner = _Tiny()
    compiled_inner.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_inner)
    batches = [{"x": torch.randn(6, 4)} for _ in range(2)]
    out_e = accumulate_gradients(eager, batches)
    out_c = accumulate_gradients(compiled, batches)
    assert out_c["loss"].item() == pytest.approx(out_e["loss"].item(), rel=1e-5)
    torch.testing.assert_close(compiled_inner.layer.weight.grad, eager.layer.weight.grad)


def _scheduler(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))


def _train(model, optimizer, scheduler, batches):
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(model, [batch])
        optimizer.step()
        scheduler.step()


def test_checkpoint_restores_training_exactly_and_every_rng(tmp_path):
    batches = [text_batch(4) for _ in range(4)]
    model = tiny_gpt()
    optimizer = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1)
    scheduler = _scheduler(optimizer)
    _train(model, optimizer, scheduler, batches[:2])
    seed_everything(7)
    model_state, optimizer_state = full_state_dicts(model, optimizer)
    save_state(tmp_path, model_state=model_state, optimizer_state=optimizer_state, scheduler=scheduler,
               state=TrainState(step=2, epoch=1), rng=all_rng_states(), config={"name": "x"})
    draws = (torch.rand(3), random.random(), np.random.rand(3))  # noqa: NPY002 (the global RNG a checkpoint restores)
    _train(model, optimizer, scheduler, batches[2:])

    payload = load_payload(tmp_path)  # weights_only=True: numpy/python RNG states are tensors and ints
    assert set(payload["model"]) == set(model.state_dict())  # plain names: evaluation loads it as is
    resumed = tiny_gpt()
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # noqa: NPY002 (see above)
    opt2 = build_optimizer(resumed, "adamw", lr=1e-2, weight_decay=0.1)
    sched2 = _scheduler(opt2)
    state = restore_state(tmp_path, model=resumed, optimizer=opt2, scheduler=sched2)
    assert (state.step, state.epoch) == (2, 1)
    again = (torch.rand(3), random.random(), np.random.rand(3))  # noqa: NPY002 (see above)
    assert torch.equal(again[0], draws[0]) and again[1] == draws[1] and np.array_equal(again[2], draws[2])
    _train(resumed, opt2, sched2, batches[2:])
    for (name, p), q in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, msg=name)


# ----------------------------------------------------------------------------- two gloo ranks

GLOBAL_BATCH, ACCUM, CLIP, STEPS = 8, 2, 0.05, 2


def _reference() -> dict:
    """One process, the whole global batch, no accumulation: LARS (norms over whole tensors,
    which FSDP shards) and clipping."""
    model = tiny_gpt()
    optimizer = build_optimizer(model, "lars", lr=0.5, weight_decay=1e-4)
    norms = []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(model, [_step_batch(step)])
        norms.append(clip_gradients(model, CLIP))
        optimizer.step()
    return {"params": model.state_dict(), "norms": torch.stack(norms)}


def _step_batch(step: int) -> dict:
    return {k: v.roll(step, dims=0) for k, v in text_batch(GLOBAL_BATCH).items()}


def _rank_worker(strategy: str, rank: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    method = tiny_gpt()
    model = DistributedDataParallel(method) if strategy == "ddp" else shard_model(method, init_device_mesh("cpu", (2,)))
    optimizer = build_optimizer(method, "lars", lr=0.5, weight_decay=1e-4)
    norms, synced = [], []
    for step in range(STEPS):
        mine = split(_step_batch(step), 2)[rank]
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(model, split(mine, ACCUM))
        norms.append(clip_gradients(method, CLIP))
        g = method.lm_head.weight.grad
        g = g.full_tensor() if isinstance(g, DTensor) else g
        synced.append(torch.linalg.vector_norm(torch.cat([
            (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).flatten()
            for p in method.parameters() if p.grad is not None])))
        gathered = [torch.empty_like(g) for _ in range(2)]
        dist.all_gather(gathered, g.contiguous())
        assert torch.equal(gathered[0], gathered[1]), "gradients differ across ranks after the last backward"
        optimizer.step()
    model_state, optimizer_state = full_state_dicts(method, optimizer)
    return {"params": model_state, "norms": torch.stack(norms), "clipped_norms": torch.stack(synced),
            "optimizer_keys": sorted(optimizer_state.get("state", {}))}


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_with_accumulation_match_one_process_on_the_whole_batch(strategy, reference, tmp_path):
    results = run_on_ranks(partial(_rank_worker, strategy), tmp_path)
    rank0 = results[0]
    assert results[1]["params"] == {}  # the full state is gathered to rank 0 only
    # The norm is measured on the worker-averaged gradient (= the whole batch's) and clipped there.
    torch.testing.assert_close(rank0["norms"], reference["norms"], rtol=1e-4, atol=1e-6)
    assert (reference["norms"] > CLIP).all()
    torch.testing.assert_close(rank0["clipped_norms"], torch.full((STEPS,), CLIP), rtol=1e-3, atol=0)
    assert set(rank0["params"]) == set(reference["params"])
    for name, p in reference["params"].items():
        torch.testing.assert_close(rank0["params"][name], p, rtol=1e-4, atol=1e-6, msg=name)
    # Optimizer state keyed by parameter name, the same under both strategies (and one process).
    assert rank0["optimizer_keys"] == sorted(name for name, _ in tiny_gpt().named_parameters())


# ----------------------------------------------------------------------------- a tiny Ray Train run

def _fit_byol(run_dir, max_steps: int):
    """BYOL through the real train_func: FSDP, 2 micro-batches per step, bf16 autocast on CPU,
    momentum_base=0 so the EMA target is either copied (tau=0) or frozen (tau=1) at a step."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ssl_platform.config import load_config
    from ssl_platform.data.ordered import AsIs, ordered_corpus
    from ssl_platform.train.loop import train_func

    cfg = load_config("byol-digits-m", [
        "name=byol-resume", "data.corpus=digits", f"runs_dir={run_dir.parent}", f"train.max_steps={max_steps}",
        "train.batch_size=16",
        "train.log_every=1", "train.checkpoint_every=1", "train.warmup_steps=0", "train.grad_accum_steps=2",
        "train.precision=bf16", "scaling.strategy=fsdp", "method.momentum_base=0.0", "model.encoder_widths=[4,8]",
        "model.projector_width=16", "model.projector_dim=8", "model.predictor_width=16", "eval.enabled=false",
        "eval.online_every=0"])  # no held-out split is built here (fit does that)
    g = np.random.default_rng(0)
    views = {name: g.standard_normal((32, 1, 8, 8), dtype=np.float32) for name in ("view1", "view2")}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir), "derived": {"in_channels": 1},
                           "artifacts": {}, "ordered": ordered_corpus("random views", views, 0, AsIs)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=cfg.name, storage_path=str(run_dir.parent),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()


@pytest.fixture(scope="module")
def byol_runs(ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "byol-resume"
    first = _fit_byol(run_dir, max_steps=2)
    at_two = load_payload(first.checkpoint.path)
    second = _fit_byol(run_dir, max_steps=3)  # the same name: resumes from step 2
    return run_dir, at_two, second


def _targets_and_online(model_state: dict) -> tuple[dict, dict]:
    target = {k.removeprefix("target_"): v for k, v in model_state.items() if k.startswith("target_")}
    online = {k: v for k, v in model_state.items() if k in target}
    return target, online


@pytest.mark.ray
def test_resumed_byol_continues_the_momentum_schedule(byol_runs):
    _, at_two, second = byol_runs
    final = load_payload(second.checkpoint.path)
    assert (at_two["step"], final["step"]) == (2, 3)
    target_2, _ = _targets_and_online(at_two["model"])
    target_3, online_3 = _targets_and_online(final["model"])
    # Step 3 of 3 has 0-based index 2 = max_steps - 1: tau = 1, the target must not move. A loop
    # that restarted the index at 0 would give tau = momentum_base = 0, copying the online net.
    # Parameters only: the target's BatchNorm running statistics move in its forward pass.
    params = [k for k in target_3 if k.endswith(("weight", "bias"))]
    assert len(params) > 10 and all(torch.equal(target_3[k], target_2[k]) for k in params)
    assert not all(torch.equal(target_3[k], online_3[k]) for k in params)


@pytest.mark.ray
def test_fsdp_checkpoint_is_a_full_state_dict_for_a_plain_method(byol_runs):
    _, _, second = byol_runs
    payload = load_payload(second.checkpoint.path)
    method = ssl_models.build_method("byol", in_channels=1, encoder_widths=[4, 8], projector_width=16,
                                     projector_dim=8, predictor_width=16)
    method.load_state_dict(payload["model"])  # strict: every name, full shapes, plain tensors
    assert len(payload["rng"]) == 2 and all(set(r) == {"torch", "cuda", "python", "numpy"} for r in payload["rng"])
    assert not torch.equal(payload["rng"][0]["torch"], payload["rng"][1]["torch"])  # each rank its own stream


@pytest.mark.ray
def test_metrics_hold_each_step_once_and_the_last_report_the_summary(byol_runs):
    run_dir, _, second = byol_runs
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1 for r in rows)
    summary = second.metrics
    assert summary["step"] == 3 and summary["loss"] == pytest.approx(rows[-1]["loss"])
    assert summary["train_seconds"] > 0 and summary["samples_per_s"] > 0

"""The per-worker training function that Ray Train runs on every rank.

Read it top to bottom: build the method, wrap it for data parallelism, restore the newest
checkpoint if the run is being resumed, then stream batches until ``max_steps``, checkpointing
every ``checkpoint_every`` steps, and at once when the driver got SIGTERM (``train.preemption``).

- The data: this worker's ids of each epoch's order of the corpus (``data.ordered``), one stream
  on through the epochs up to ``max_steps`` (``data.ordered.epoch_stream``), read from where the
  checkpoint's position says (``train.resume``), so a resumed run sees exactly the records and
  views the uninterrupted one would have, and N workers together the records one would.

- ``scaling.strategy=ddp``: Ray's ``prepare_model`` (DistributedDataParallel, gloo on CPU, NCCL
  on GPU). ``fsdp``: torch's FSDP2 ``fully_shard`` on every block of the method's
  ``nn.ModuleList``s (transformer layers) and on the method itself, so parameters, gradients and
  optimizer state are sharded. Ray's own ``parallel_strategy="fsdp"`` wraps in the older FSDP1
  and refuses to run without a GPU; FSDP2 runs on gloo too, so the same code is tested here.
  Checkpoints hold the full, unsharded state either way (see ``train.checkpoint``).
- ``train.grad_accum_steps=k``: the global batch stays ``train.batch_size``; each worker reads
  micro-batches of ``batch_size / (workers * k)`` and takes one optimizer step per ``k`` of
  them, gradients synced across workers only in the last backward. Steps count optimizer
  steps. ``train.grad_accum_mode=exact`` (default) keeps the objective of one big batch: for a
  method whose loss couples the samples (``spec.accumulation == "gradcache"``: negatives, batch
  statistics) by GradCache (``train.grad_cache``); for a loss that is a mean of per-sample terms
  (``"mean"``) plain accumulation of the ``1/k``-scaled losses already is. ``independent``, and
  exact for a method that declares neither, accumulates the ``1/k``-scaled micro-batch losses:
  each micro-batch sees only its own negatives and batch statistics. BatchNorm normalises each
  micro-batch with its own statistics either way; the run's first line says what applies.
- Images arrive as uint8 (a quarter of float32's bytes through the object store) and are
  normalised on the device just before the forward (``data.augment.finish_views``), where
  ``data.augment_on=device`` also runs the views' colour, grayscale, blur and solarize ops.
- ``scaling.sync_batchnorm`` (default: on wherever there is BatchNorm): every BatchNorm layer
  normalises with the statistics of the global batch (``ssl_models.distributed.GlobalBatchNorm``),
  as the papers' multi-GPU runs do, so a step's update is the same on 1, 2 or N workers.
- ``train.precision``: bf16 autocast on GPU by default; the methods compute their losses in
  float32 regardless. ``fp64`` runs the model and its inputs in float64: float32's rounding,
  which training amplifies step after step (README Resume), then stays far below any tolerance,
  so runs that must agree (1 vs N workers, resumed or not) can be compared tightly.
- ``train.compile``: ``torch.compile`` of the wrapped model, the order PyTorch documents for
  DDP (its DDPOptimizer splits the graph at the gradient buckets so communication overlaps
  the backward) and the one Ray's guides use.
- ``eval.online_every=n``: the online evaluation (``train.online``) on the driver's held-out
  split at every n-th step, every checkpoint step and the last step. Each of those steps gets a
  metrics row and a ``ray.train.report`` (with a checkpoint only at checkpoint steps), so every
  result Ray Train and Tune see carries the ``val_*`` metrics. Its time is left out of the
  throughput and step-time figures.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssl_models.distributed import convert_global_batchnorm, has_batchnorm
from ssl_models.losses.precision import at_least_fp32
from ssl_models.spec import MethodSpec
from ssl_platform import methods
from ssl_platform.config import from_dict
from ssl_platform.data.augment import finish_views
from ssl_platform.data.ordered import epoch_stream, stream_epochs
from ssl_platform.data.pipeline import transform_records
from ssl_platform.train import console, local_mode
from ssl_platform.train.checkpoint import (
    TrainState,
    all_rng_states,
    full_state_dicts,
    is_fsdp,
    restore_state,
    save_state,
)
from ssl_platform.train.grad_cache import accumulate_exact
from ssl_platform.train.metrics import MetricsLogger, StepMeter, count_tokens, data_advice
from ssl_platform.train.online import OnlineEval
from ssl_platform.train.optim import build_optimizer, warmup_cosine
from ssl_platform.train.preemption import StopPoller
from ssl_platform.train.resume import place_in_epoch, resume_cost, resume_line
from ssl_platform.views import image_views

# Fault injection for tests: the worker of this rank exits abruptly when it reaches the step.
CRASH_AT_STEP_ENV = "SSLP_CRASH_AT_STEP"
# Timing for tests: every step also sleeps this many seconds (a run slow enough to lose a node mid-run).
STEP_DELAY_ENV = "SSLP_STEP_DELAY_S"


def train_func(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local = bool(loop_config.get("local"))  # local mode: this is the driver, the only rank
    device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu") if local else ray.train.torch.get_device()
    t = cfg.train
    local_batch = t.batch_size // world
    micro_batch = micro_batch_size(t.batch_size, world, t.grad_accum_steps)

    # 1. Model, optimizer and schedule. The same seed on every rank gives every replica the
    #    same initial weights (FSDP relies on it; DDP also broadcasts rank 0's).
    seed_everything(t.seed)
    method = (loop_config.get("build") or methods.build)(cfg, **loop_config["derived"])  # `sslp finetune`: a classifier
    dtype = torch.float64 if t.precision == "fp64" else None  # None: the inputs' own float32
    if dtype is not None:
        method = method.to(dtype)
    global_bn = cfg.scaling.sync_batchnorm is not False and world > 1 and has_batchnorm(method)
    if global_bn:  # BatchNorm over every worker's samples: the step no longer depends on the worker count
        method = convert_global_batchnorm(method)
    # DDP wrapper, or `method` sharded in place; in local mode `method` itself, on the device.
    model = method.to(device) if local else wrap_model(method, cfg.scaling.strategy, device, world)
    # Built after wrapping: FSDP replaces the parameters with sharded ones.
    optimizer = build_optimizer(method, t.optimizer, t.effective_lr()[0], t.weight_decay, t.adam_beta2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, t.max_steps, t.warmup_steps))
    if t.compile:
        model = torch.compile(model)
    autocast = autocast_context(t.precision, device)
    step_end = getattr(method, "on_train_step_end", None)
    spec = methods.method_spec(cfg.method.name)
    # GradCache needs the method's features/objective split (a finetune classifier has none).
    grad_cache = (t.grad_accum_mode == "exact" and t.grad_accum_steps > 1 and spec.accumulation == "gradcache"
                  and hasattr(method, "features"))
    # data.augment_on=device: the views' configs, for the ops finish_views runs here on the device
    views = image_views(cfg, spec.views) if spec.views and cfg.augment_placement() == "device" else ()
    seed_everything(t.seed + 1 + rank)  # each rank its own stream from here on (dropout)

    # 2. Resume: Ray hands back the newest checkpoint it registered for this run name, if any; the
    #    driver names a newer one that local mode stored (see train.local_mode).
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    stored = loop_config.get("resume_from")
    if stored and (checkpoint is None or Path(stored).name > Path(checkpoint.path).name):
        checkpoint = ray.train.Checkpoint(stored)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = restore_state(d, model=method, optimizer=optimizer, scheduler=scheduler, rank=rank)
    ordered = loop_config["ordered"]  # the corpus each worker reads its ids of the epoch's order from
    place_in_epoch(state, ordered.fingerprint(t.batch_size), resuming=checkpoint is not None, cfg=cfg)
    resumed = resume_cost(state, t.batch_size, loop_config["run_dir"]) if checkpoint else {}
    if resumed and rank == 0:
        console.say(resume_line(resumed))
    start_step = state.step
    if rank == 0:
        console.say(f"{'local mode' if local else f'{world} x {cfg.scaling.strategy}'}, "
                    f"{t.grad_accum_steps} x {micro_batch} samples per worker and step, "
                    f"{'bf16 autocast' if isinstance(autocast, torch.autocast) else 'fp64' if dtype else 'fp32'}"
                    f"{', global BatchNorm' if global_bn else ''}"
                    f"{', torch.compile' if t.compile else ''}")

    # 3. Stream this worker's micro-batches; every grad_accum_steps of them make one optimizer
    #    step. Rank 0's logger first drops metrics rows of steps after start_step.
    steps_in_epoch = ordered.steps_per_epoch(t.batch_size)
    logger = MetricsLogger(loop_config["run_dir"], cfg.name, t.max_steps, start_step, enabled=rank == 0,
                           data_advice=data_advice(cfg), workers=world)
    meter = StepMeter()
    online = OnlineEval(cfg, loop_config.get("online_split"), rank, device)  # rank 0 (all ranks under FSDP)
    crash_at = int(os.environ.get(CRASH_AT_STEP_ENV, "-1"))
    delay = float(os.environ.get(STEP_DELAY_ENV, "0"))
    stop, stopped = StopPoller(loop_config.get("stop_flag")), False  # SIGTERM to the driver (train.preemption)
    while state.step < t.max_steps:  # one stream on through the epochs up to max_steps
        # this worker's ids of the epoch's order, after those already consumed, and the epochs after it
        epochs = stream_epochs(t.max_steps - state.step, steps_in_epoch, state.epoch_step,
                               steps_in_epoch * local_batch)
        ds = epoch_stream(ordered, epoch=state.epoch, rank=rank, world=world, batch_size=t.batch_size,
                          skip=state.epoch_step * local_batch, chunk=transform_records(cfg), epochs=epochs)
        if ds is not None:
            ds.set_name(cfg.name)  # Ray Data's metrics tag it "<run>_<uuid>_<n>": the dashboard filters by run
        micro_batches = [] if ds is None else ds.iter_torch_batches(
            batch_size=micro_batch, drop_last=True, device=device, prefetch_batches=cfg.data.prefetch_batches)
        epoch_start = state.step
        stream = groups_of(meter.timed(micro_batches), t.grad_accum_steps)
        for batches in stream:
            batches = [as_dtype(finish_views(b, views), dtype) for b in batches]  # normalise uint8 images on the device
            optimizer.zero_grad(set_to_none=True)
            if grad_cache:  # the loss over all micro-batches' features, then each re-run with its feature gradient
                out = accumulate_exact(model, method, batches, autocast, gradient_sync)
            else:  # forward + backward of each micro-batch, synced on the last
                out = accumulate_gradients(model, batches, autocast)
            sync_scalar_gradients(method, world)  # FSDP: CLIP's logit_scale is not sharded
            out["grad_norm"] = clip_gradients(method, t.grad_clip)  # the worker-averaged gradient
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the rate this step used; the scheduler moves on to the next
            scheduler.step()
            if step_end is not None:  # an optional hook (ssl_models.protocol.Method): BYOL's EMA target
                step_end(state.step, t.max_steps)  # 0-based index of the step just taken
            state.step += 1
            state.epoch_step += 1
            if state.epoch_step == steps_in_epoch:  # the checkpoint says: next epoch
                state.epoch, state.epoch_step = state.epoch + 1, 0
            meter.add(out, samples=local_batch, tokens=sum(count_tokens(b) for b in batches))

            if delay:
                time.sleep(delay)
            if state.step == crash_at and start_step < crash_at and rank == 0:
                os._exit(1)  # a real process death, not an exception Ray could catch in Python
            stopped = stop.flag is not None and any_rank(stop.raised(), world, device)  # all ranks stop at this step
            checkpoint_now = state.step % t.checkpoint_every == 0 or state.step == t.max_steps or stopped
            evaluate_now = online.due(state.step, checkpoint_now)
            val = logger.untimed(online, method) if evaluate_now else {}  # {"val_...": ...} where evaluated
            if evaluate_now or state.step % t.log_every == 0 or state.step == t.max_steps:
                logger.log(state.step, meter.pop(world, device), lr=lr, epoch=state.epoch, **val)
            if checkpoint_now:
                report_checkpoint(rank, method, optimizer, scheduler, state, loop_config,
                                  {**logger.summary(), **resumed, **val})
            elif evaluate_now:  # no checkpoint: Ray Train keeps nothing, but Tune sees the metrics
                ray.train.report({"step": state.step, "epoch": state.epoch, **logger.summary(), **val}, checkpoint=None)
            if state.step >= t.max_steps or stopped:
                break
        stream.close()  # max_steps mid-epoch: stop this pass's Ray Data executor now, not when collected
        if stopped:
            if rank == 0:
                console.say(f"stopped on SIGTERM at step {state.step} (checkpointed)")
            return
        if state.step == epoch_start:
            raise ValueError(f"worker {rank} got no full batch of {local_batch} in a whole epoch; "
                             f"lower train.batch_size")


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank: every rank gets the same answer (an all-reduce of one number)."""
    if world == 1:
        return flag
    votes = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(votes)  # SUM
    return bool(votes.item() > 0)


def micro_batch_size(batch_size: int, world: int, accum_steps: int) -> int:
    """Samples per forward pass on one worker: the global batch split over workers and micro-steps."""
    if batch_size % (world * accum_steps):
        raise ValueError(f"train.batch_size={batch_size} does not split into {world} workers x "
                         f"train.grad_accum_steps={accum_steps} equal micro-batches; "
                         f"use a multiple of {world * accum_steps}")
    return batch_size // (world * accum_steps)


def accumulation_words(mode: str, steps: int, spec: MethodSpec, batchnorm: bool) -> str:
    """How ``steps`` micro-batches make one step, for the run's first line (the driver's,
    ``train.trainer.describe_accumulation``); "" for one."""
    if steps == 1:
        return ""
    if mode == "exact" and spec.accumulation:
        how = "GradCache" if spec.accumulation == "gradcache" else "a per-sample loss"
        words = f" (exact accumulation: {how}"
    elif mode == "exact":
        words = f" (independent micro-batches: {spec.display_name} has no exact accumulation"
    else:
        words = " (independent micro-batches: train.grad_accum_mode=independent"
    if spec.accumulation_note:
        words += f"; {spec.accumulation_note}"
    return words + ("; BatchNorm statistics per micro-batch)" if batchnorm else ")")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (seeds the global RNG that libraries draw from)
    torch.manual_seed(seed)


def wrap_model(method: nn.Module, strategy: str, device: torch.device, world: int) -> nn.Module:
    """The module the loop calls: a DDP wrapper of ``method`` ("ddp"; ``method`` itself with one
    worker) or ``method`` sharded in place with FSDP2 ("fsdp"). Either way the optimizer, the
    checkpoint and ``on_train_step_end`` use ``method``."""
    if strategy == "ddp":
        return ray.train.torch.prepare_model(method)
    method = ray.train.torch.prepare_model(method, parallel_strategy=None)  # only moves it to the device
    from torch.distributed.device_mesh import init_device_mesh

    return shard_model(method, init_device_mesh(device.type, (world,)))


def shard_model(method: nn.Module, mesh) -> nn.Module:
    """FSDP2 in place: each block of every ``nn.ModuleList`` (a transformer layer) is its own
    unit, all-gathered just before it runs and freed after; the rest belongs to the root unit.
    Tied weights (GPT's embedding and LM head) live outside the blocks, in the root. Scalar
    parameters (CLIP's and SigLIP's ``logit_scale``), which ``fully_shard`` refuses, stay whole
    on every rank; :func:`sync_scalar_gradients` averages their gradients."""
    from torch.distributed.fsdp import fully_shard  # here: a DDP run need not import FSDP (~0.7 s a worker)

    # Reversed pre-order: inner blocks are sharded before the blocks that contain them.
    for blocks in [m for m in reversed(list(method.modules())) if isinstance(m, nn.ModuleList)]:
        for block in blocks:
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block, mesh=mesh, ignored_params=scalar_parameters(block))
    fully_shard(method, mesh=mesh, ignored_params=scalar_parameters(method))
    return method


def scalar_parameters(module: nn.Module) -> set[nn.Parameter]:
    """The 0-dimensional parameters of ``module`` (FSDP leaves them unsharded)."""
    return {p for p in module.parameters() if p.ndim == 0}


def sync_scalar_gradients(method: nn.Module, world: int) -> None:
    """Under FSDP, average the gradients of the unsharded scalar parameters over the ranks, as
    FSDP does for the sharded ones; DDP and one worker need nothing."""
    if world == 1 or not is_fsdp(method):
        return
    for p in scalar_parameters(method):
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)  # SUM (gloo has no AVG)
            p.grad.div_(world)


def autocast_context(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast for "bf16", and for "auto" on a GPU; nothing for "fp32" and "fp64", or "auto"
    on a CPU (where bf16 is slower than fp32 on most processors)."""
    if precision in ("fp32", "fp64") or (precision == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def as_dtype(batch: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The batch's floating tensors (views, audio) in ``dtype`` (``train.precision=fp64``); token ids
    and labels as they are. ``dtype=None``: the batch unchanged."""
    if dtype is None:
        return batch
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def groups_of(iterable: Iterable, n: int) -> Iterator[list]:
    """Consecutive lists of ``n`` items; an incomplete last group is dropped, like drop_last.
    Closing this generator closes ``iterable``."""
    group, it = [], iter(iterable)
    try:
        for item in it:
            group.append(item)
            if len(group) == n:
                yield group
                group = []
    finally:
        if hasattr(it, "close"):
            it.close()


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Whether the backward inside syncs gradients across workers (DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync``); a plain module (one worker) has nothing to sync."""
    inner = getattr(model, "_orig_mod", model)  # under torch.compile
    if isinstance(inner, DistributedDataParallel) and not enabled:
        with inner.no_sync():
            yield
    elif not enabled and is_fsdp(inner):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    else:
        yield


def accumulate_gradients(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]],
                         autocast: AbstractContextManager = nullcontext()) -> dict[str, torch.Tensor]:
    """Forward and backward over the micro-batches of one optimizer step.

    Each loss is scaled by ``1 / len(micro_batches)``, so the accumulated gradient is the mean
    over micro-batches: that of one batch of all of them when the loss is a mean over equally
    many independent terms per micro-batch. Gradients are synced across workers in the last
    backward only. Returns each scalar output's mean over the micro-batches (detached).
    """
    n = len(micro_batches)
    means: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        with gradient_sync(model, enabled=i == n - 1):
            with autocast:
                out = model(batch)
            (out["loss"] / n).backward()
        for name, value in out.items():
            if value.ndim == 0:
                value = at_least_fp32(value.detach()) / n
                means[name] = means[name] + value if name in means else value
    return means


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The total gradient norm, measured before clipping to ``max_norm`` (no clipping when 0).

    Called after the last backward, so under DDP and FSDP it sees the gradient already averaged
    over workers and every worker clips by the same factor.
    """
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    # An FSDP model's norm is a DTensor; torch.distributed.tensor is loaded only if one exists.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return norm.full_tensor() if dtensor is not None and isinstance(norm, dtensor.DTensor) else norm


def report_checkpoint(rank: int, method: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: TrainState,
                      loop_config: dict, summary: dict[str, float]) -> None:
    """Every rank takes part (FSDP shards and RNG states are gathered, and ``ray.train.report``
    is a barrier); rank 0 writes the files, with the artifacts (the tokenizer) a checkpoint
    needs to be used on its own. The metrics carry the run summary (last loss, seconds,
    throughput), so the final report is all the driver needs for its summary."""
    model_state, optimizer_state = full_state_dicts(method, optimizer)
    rng = all_rng_states()
    metrics = {"step": state.step, "epoch": state.epoch, **summary}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
    else:
        with tempfile.TemporaryDirectory() as d:
            save_state(d, model_state=model_state, optimizer_state=optimizer_state, scheduler=scheduler, state=state,
                       rng=rng, config=loop_config["config"], derived=loop_config["derived"])
            for name, path in loop_config["artifacts"].items():
                shutil.copytree(path, Path(d) / name)
            if loop_config.get("local"):  # Ray Train keeps no checkpoint in local mode: store it where it would
                stored = local_mode.store(d, loop_config["storage_uri"] or loop_config["run_dir"],
                                          keep=from_dict(loop_config["config"]).train.keep_checkpoints)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint(stored))
            else:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    # The controller registers a reported checkpoint at its next poll (~2 s); a worker dying in
    # between would restart from the previous one and repeat more than checkpoint_every steps.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

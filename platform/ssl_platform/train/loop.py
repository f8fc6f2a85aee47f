"""The per-worker training function that Ray Train runs on every rank.

Read it top to bottom: build the method, wrap it for DDP, restore the newest checkpoint if the
run is being resumed, then stream augmented batches from this worker's shard of the Ray
Dataset until ``max_steps``, checkpointing every ``checkpoint_every`` steps.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ssl_platform import methods
from ssl_platform.config import from_dict
from ssl_platform.train.checkpoint import TrainState, restore_state, save_state
from ssl_platform.train.metrics import MetricsLogger
from ssl_platform.train.optim import build_optimizer, scaled_lr, warmup_cosine

# Fault injection for tests: the worker of this rank exits abruptly when it reaches the step.
CRASH_AT_STEP_ENV = "SSLP_CRASH_AT_STEP"


def train_func(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    t = cfg.train

    # 1. Model, optimizer and schedule. Same seed on every rank; DDP also broadcasts rank 0's weights.
    torch.manual_seed(t.seed)
    method = methods.build(cfg, **loop_config["derived"])
    model = ray.train.torch.prepare_model(method)  # DDP (gloo on CPU, NCCL on GPU)
    optimizer = build_optimizer(method, t.optimizer, scaled_lr(t.lr, t.batch_size), t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, t.max_steps, t.warmup_steps))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    # 2. Resume: Ray hands back the newest checkpoint of this run name, if any.
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = restore_state(d, model=method, optimizer=optimizer, scheduler=scheduler)
        if rank == 0:
            print(f"resumed from step {state.step} (epoch {state.epoch})", flush=True)
    start_step = state.step

    # 3. Stream batches from this worker's shard until max_steps.
    local_batch = t.batch_size // world
    shard = ray.train.get_dataset_shard("train")
    logger = MetricsLogger(loop_config["run_dir"], cfg.name, t.max_steps, enabled=rank == 0)
    crash_at = int(os.environ.get(CRASH_AT_STEP_ENV, "-1"))
    wait = WaitTimer()
    samples = 0
    while state.step < t.max_steps:  # one pass over the shard = one epoch of fresh augmentations
        batches = shard.iter_torch_batches(
            batch_size=local_batch, drop_last=True, device=device,
            prefetch_batches=cfg.data.prefetch_batches, local_shuffle_buffer_size=4 * local_batch,
        )
        epoch_start = state.step
        for batch in wait.timed(batches):
            with autocast:
                out = model(batch)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(method.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            method.on_train_step_end(state.step, t.max_steps)
            state.step += 1
            samples += local_batch * world

            if state.step == crash_at and start_step < crash_at and rank == 0:
                os._exit(1)  # a real process death, not an exception Ray could catch in Python
            if state.step % t.log_every == 0 or state.step == t.max_steps:
                logged = _mean_over_workers(out, world, device)
                logger.log(state.step, start_step, samples, wait.pop(),
                           {**logged, "lr": scheduler.get_last_lr()[0], "epoch": state.epoch})
                samples = 0
            if state.step % t.checkpoint_every == 0 or state.step == t.max_steps:
                _report_checkpoint(rank, method, optimizer, scheduler, state, loop_config, out)
            if state.step >= t.max_steps:
                break
        if state.step == epoch_start:
            raise ValueError(f"worker {rank} got no full batch of {local_batch} in a whole epoch; lower train.batch_size")
        state.epoch += 1


class WaitTimer:
    """Accumulates the time the loop spends blocked on the data pipeline."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, iterable):
        it = iter(iterable)
        while True:
            tic = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - tic
            yield item

    def pop(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _mean_over_workers(out: dict[str, torch.Tensor], world: int, device: torch.device) -> dict[str, float]:
    """Scalar outputs averaged over ranks (every rank calls this at the same steps)."""
    names = [k for k, v in out.items() if v.ndim == 0]
    values = torch.stack([out[k].detach().float() for k in names]).to(device)  # NCCL needs GPU tensors
    if world > 1 and dist.is_initialized():
        dist.all_reduce(values)
        values /= world
    return dict(zip(names, values.cpu().tolist()))


def _report_checkpoint(rank, method, optimizer, scheduler, state, loop_config, out) -> None:
    """Every rank reports (it is a barrier); only rank 0 writes the files, with the artifacts
    (the tokenizer) a checkpoint needs to be used on its own."""
    metrics = {"step": state.step, "epoch": state.epoch, "loss": float(out["loss"].detach())}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        save_state(d, model=method, optimizer=optimizer, scheduler=scheduler, state=state, config=loop_config["config"])
        for name, path in loop_config["artifacts"].items():
            shutil.copytree(path, Path(d) / name)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

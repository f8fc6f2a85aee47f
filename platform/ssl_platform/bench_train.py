"""``sslp bench train``: a preset's training throughput three ways, in one run, on one model,
batch and set of cores.

- **compute bound**: forward, backward and optimizer step of the preset's method on one fixed,
  already augmented batch, in this process: the better of every core's threads and every core
  times one thread (perfect data parallelism). What training would do if data were free.
- **plain loop** (the peers' way, as lightly, solo-learn or open_clip users train): one PyTorch
  process, a ``torch.utils.data.DataLoader`` with one worker process per core that makes each
  sample on its own, the same recipe and model. Images: torchvision's per-image transforms.
  Captions, text blocks and audio: the platform's own transform applied to one record at a time
  (what a ``Dataset.__getitem__`` does), so the comparison is the loading structure, not the code.
- **sslp run**: the preset itself (its workers, Ray Data pipeline and loop) for ``steps`` steps,
  read from its ``metrics.jsonl`` after the first logged interval (start-up excluded).

All three run with the malloc settings ``sslp`` gives itself and every process it starts
(:mod:`ssl_platform.heap`): the bound and the plain loop in this process and its spawned DataLoader
workers, ``sslp run`` in its own. The ratios compare the loading structure, not the allocator.

Presets on the built-in corpora of every kind (image, image-caption, GPT's text blocks, audio);
the figures are samples per second and each run prints them beside each other with the
machine's load, because a shared machine's numbers move between runs.

With ``scaling.use_gpu=true`` all three train on the GPU (one per worker, ``scaling.num_workers``
of them; the run's precision, bf16 autocast by default): the compute bound is one GPU's rate on the
fixed batch times the workers, the plain loop one process on one GPU fed by a DataLoader with a
worker per core (pinned memory), and ``sslp run`` the preset as it runs on GPUs. A GPU machine
measures there what issue 16 asks (data wait per preset with the augmentation on the cores or on
the device: ``data.augment_on=cpu|device``):

    sslp bench train --preset simclr-digits scaling.use_gpu=true scaling.num_workers=1

    sslp bench train --preset simclr-digits --steps 40
    sslp bench train --preset cpc-spoken-digits

``--memory`` measures something else: the peak memory and speed of one step with k = 1 and k
accumulated micro-batches (``ssl_platform.bench_memory``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_platform.config import ExperimentConfig, load_config


def _cpus(cpus: int | None) -> int:
    return cpus or len(os.sched_getaffinity(0))


def _method(cfg: ExperimentConfig):
    from ssl_platform import methods

    return methods.build(cfg, **methods.expected_derived(cfg))


@dataclass
class Corpus:
    """A preset's built-in corpus as ``sslp run`` reads it: its records (columns of equal length)
    and the transform that turns a batch of records into training rows."""

    records: dict[str, np.ndarray]
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

    def __len__(self) -> int:
        return len(next(iter(self.records.values())))

    def rows(self, ids: np.ndarray | slice) -> dict[str, np.ndarray]:
        """The training rows of records ``ids``, as a data task makes them (``ordered.ReadRecords``)."""
        if getattr(self.transform, "reads_by_id", False):  # BERT's pairs draw partners from the whole table
            return self.transform(np.arange(len(self))[ids], self.records)
        return self.transform({k: v[ids] for k, v in self.records.items()})


def builtin_corpus(cfg: ExperimentConfig, workdir: Path) -> Corpus:
    """The records and epoch-0 transform of ``cfg``'s built-in ordered corpus, built by the run's
    own data builder, with ``workdir`` as the run directory (text transforms load the tokenizer
    trained there: keep it while the corpus is used). Ray is started for it and stopped before
    anything is timed (a driver that is connected already stays connected)."""
    import ray

    from ssl_platform import methods
    from ssl_platform.data.pipeline import pretraining_data
    from ssl_platform.data.skips import SkipReporter

    started = not ray.is_initialized()
    quiet = logging.getLogger("ray.data")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the tokenizer's pass over the corpus would print Ray Data's INFO lines
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        data = pretraining_data(cfg, workdir, SkipReporter(), methods.architecture(cfg))
        # Copies: the object store's zero-copy arrays go away with Ray.
        records = {k: np.array(v, copy=True) for k, v in ray.get(data.ordered.records).items()}
        return Corpus(records, data.ordered.transform(epoch=0))
    finally:
        quiet.setLevel(level)
        if started:
            ray.shutdown()


def _device(cfg: ExperimentConfig):
    """The device the run trains on: a CUDA GPU with ``scaling.use_gpu``, else the CPU."""
    import torch

    if not cfg.scaling.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("scaling.use_gpu=true, but torch sees no CUDA GPU on this machine; drop the override to "
                         "measure on the CPU cores")
    return torch.device("cuda")


def _float64(cfg: ExperimentConfig) -> bool:
    return cfg.train.precision == "fp64"


def _finish(batch: dict, device=None, fp64: bool = False) -> dict:
    """Training rows (numpy or torch) -> the method's input on ``device``, as the loop makes it
    (uint8 views are normalised there; float inputs in float64 for ``train.precision=fp64``)."""
    import torch

    from ssl_platform.data.augment import finish_views
    from ssl_platform.train.loop import as_dtype

    tensors = {k: torch.as_tensor(v) for k, v in batch.items()}
    if device is not None and device.type != "cpu":
        tensors = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
    return as_dtype(finish_views(tensors, ()), torch.float64 if fp64 else None)


def _model(cfg: ExperimentConfig, device):
    """The preset's method on ``device`` in training mode (float64 for ``train.precision=fp64``) and its optimizer."""
    import torch

    method = _method(cfg).to(device, dtype=torch.float64 if _float64(cfg) else None).train()
    return method, _optimizer(cfg, method)


def _sync(device) -> None:
    """Wait for the GPU's queued work (a timer around asynchronous kernels measures nothing otherwise)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _optimizer(cfg: ExperimentConfig, method):
    from ssl_platform.train.optim import build_optimizer

    return build_optimizer(method, cfg.train.optimizer, cfg.train.effective_lr()[0], cfg.train.weight_decay,
                           cfg.train.adam_beta2)


def _step(method, optimizer, batch, precision: str = "fp32", device=None) -> None:
    from ssl_platform.train.loop import autocast_context

    optimizer.zero_grad(set_to_none=True)
    with autocast_context(precision, device if device is not None else batch_device(batch)):
        loss = method(batch)["loss"]
    loss.backward()
    optimizer.step()


def batch_device(batch: dict):
    return next(iter(batch.values())).device


def compute_bound(cfg: ExperimentConfig, corpus: Corpus, steps: int, cpus: int) -> float:
    """Samples/s of forward + backward + step on one fixed batch the pipeline's transform made:
    the better of ``cpus`` threads in one process and ``cpus`` x one thread (data parallelism
    without its communication, the limit of ``cpus`` workers). Small models barely speed up
    with threads, and on a shared machine a spinning thread pool can even slow down."""
    import torch

    device = _device(cfg)
    batch = _finish(corpus.rows(slice(0, cfg.train.batch_size)), device, _float64(cfg))
    method, optimizer = _model(cfg, device)
    precision = cfg.train.precision
    if device.type == "cuda":  # one GPU per worker: one GPU's rate on the batch, times the workers
        for _ in range(3):  # warm-up: allocator, kernel selection
            _step(method, optimizer, batch, precision)
        _sync(device)
        tic = time.perf_counter()
        for _ in range(steps):
            _step(method, optimizer, batch, precision)
        _sync(device)
        return max(1, cfg.scaling.num_workers) * steps * cfg.train.batch_size / (time.perf_counter() - tic)
    threads = torch.get_num_threads()
    rates = []
    try:
        for n, scale in {cpus: 1, 1: cpus}.items():
            torch.set_num_threads(n)
            for _ in range(2):  # warm-up: allocator, kernels
                _step(method, optimizer, batch, precision)
            tic = time.perf_counter()
            for _ in range(steps):
                _step(method, optimizer, batch, precision)
            rates.append(scale * steps * cfg.train.batch_size / (time.perf_counter() - tic))
    finally:
        torch.set_num_threads(threads)
    return max(rates)


class RecordRows:
    """Map-style dataset: index -> the training row of one record, made by ``corpus``'s own
    transform on a batch of one (how a ``Dataset.__getitem__`` makes samples)."""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.corpus.rows(slice(i, i + 1)).items()}


class TorchvisionViews:
    """Map-style dataset: index -> the method's views of one image, each made by torchvision's
    per-image transforms from the same recipe (crop, flip, jitter, grayscale, blur), float32."""

    def __init__(self, images: np.ndarray, configs: tuple):
        self.images, self.configs = images, configs
        self.transforms = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        import torch

        if self.transforms is None:  # built in the worker process
            self.transforms = [_torchvision_view(c, self.images.shape[1]) for c in self.configs]
        image = torch.from_numpy(self.images[i])
        return {f"view{k + 1}": t(image) for k, t in enumerate(self.transforms)}


def _torchvision_view(c, channels: int):
    import torch
    import torchvision.transforms.v2 as v2

    s = c.jitter_strength
    steps = [v2.RandomResizedCrop(c.size, scale=(c.crop_scale_min, c.crop_scale_max), antialias=True),
             v2.RandomHorizontalFlip(c.flip_prob),
             v2.RandomApply([v2.ColorJitter(c.jitter_brightness * s, c.jitter_contrast * s,
                                            *((c.jitter_saturation * s, c.jitter_hue * s) if channels == 3 else ()))],
                            p=c.jitter_prob)]
    if channels == 3:
        steps.append(v2.RandomGrayscale(c.grayscale_prob))
    steps += [v2.RandomApply([v2.GaussianBlur(max(3, int(0.1 * c.size) // 2 * 2 + 1), sigma=(0.1, 2.0))],
                             p=c.blur_prob),
              v2.RandomSolarize(128, p=c.solarize_prob),
              v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * channels, [0.5] * channels)]
    return v2.Compose(steps)


def _loader_worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def plain_loop(cfg: ExperimentConfig, corpus: Corpus, steps: int, cpus: int) -> float:
    """Samples/s of one PyTorch process fed by a DataLoader with ``cpus`` workers, each sample
    made on its own: torchvision's transforms for images, the corpus's transform otherwise."""
    import torch

    from ssl_platform.methods import method_spec
    from ssl_platform.views import image_views

    device = _device(cfg)
    torch.set_num_threads(cpus)
    spec = method_spec(cfg.method.name)
    dataset = (TorchvisionViews(corpus.records["image"], image_views(cfg, spec.views)) if spec.data_kind == "image"
               else RecordRows(corpus))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                                         num_workers=cpus, worker_init_fn=_loader_worker_init,
                                         persistent_workers=True, multiprocessing_context="spawn",
                                         pin_memory=device.type == "cuda")
    method, optimizer = _model(cfg, device)
    done, tic = -2, 0.0  # two warm-up steps start the workers
    while done < steps:
        for batch in loader:
            _step(method, optimizer, _finish(batch, device, _float64(cfg)), cfg.train.precision)
            done += 1
            if done == 0:
                _sync(device)
                tic = time.perf_counter()
            if done == steps:
                break
    _sync(device)
    return steps * cfg.train.batch_size / (time.perf_counter() - tic)


def platform_run(preset: str, steps: int, overrides: list[str]) -> tuple[float, float]:
    """(samples/s, data wait fraction) of ``sslp run PRESET`` after its first logged interval."""
    with tempfile.TemporaryDirectory(prefix="sslp-bench-train-") as tmp:
        log_every = max(1, steps // 8)
        args = [sys.executable, "-m", "ssl_platform.cli", "run", preset, f"runs_dir={tmp}", "name=bench",
                f"train.max_steps={steps}", f"train.log_every={log_every}", f"train.checkpoint_every={steps}",
                "eval.enabled=false", "eval.online_every=0", *overrides]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"sslp run {preset} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "bench" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    seconds = sum(r["step_time_s"] * log_every for r in steady)
    return (sum(r["samples_per_s"] * r["step_time_s"] * log_every for r in steady) / seconds,
            sum(r["data_wait_fraction"] * r["step_time_s"] * log_every for r in steady) / seconds)


def run_train_bench(preset: str, steps: int, cpus: int | None, overrides: list[str]) -> dict:
    from ssl_platform import methods

    cfg = methods.validate(load_config(preset, overrides))
    if cfg.data.path:
        raise SystemExit(f"sslp bench train measures presets on the built-in corpora; {preset} reads data.path="
                         f"{cfg.data.path}: leave data.path unset or pick a built-in preset (sslp presets)")
    n = _cpus(cpus)
    device = _device(cfg)  # a GPU run on a machine without one stops here, before anything is measured
    with tempfile.TemporaryDirectory(prefix="sslp-bench-train-") as workdir:  # the tokenizer of text presets
        corpus = builtin_corpus(cfg, Path(workdir))
        load = os.getloadavg()[0]
        bound = compute_bound(cfg, corpus, steps, n)
        plain = plain_loop(cfg, corpus, steps, n)
    ours, wait = platform_run(preset, steps, overrides)
    return {"preset": preset, "steps": steps, "cpus": n, "batch_size": cfg.train.batch_size,
            "device": f"{max(1, cfg.scaling.num_workers)} x GPU" if device.type == "cuda" else "cpu",
            "compute_bound_samples_per_s": bound, "plain_loop_samples_per_s": plain,
            "sslp_run_samples_per_s": ours, "sslp_run_data_wait": wait,
            "load_avg_1m": round(load, 1), "load_avg_1m_after": round(os.getloadavg()[0], 1)}


def format_train_bench(r: dict) -> str:
    bound = r["compute_bound_samples_per_s"]
    plain, ours = r["plain_loop_samples_per_s"], r["sslp_run_samples_per_s"]
    on = f"{r['device']} and {r['cpus']} cores" if r.get("device", "cpu") != "cpu" else f"{r['cpus']} cores"
    head = (f"training throughput of {r['preset']}, samples/s ({r['steps']} steps, batch {r['batch_size']}, "
            f"{on}; machine load {r['load_avg_1m']}-{r['load_avg_1m_after']})")
    how = (f"one GPU's rate x {r['device'].split()[0]}" if r.get("device", "cpu") != "cpu"
           else f"best of {r['cpus']} threads and {r['cpus']} x 1 thread")
    run = (f"  sslp run (Ray Data + Ray Train)           {ours:>9,.0f}  {ours / bound:.0%}  "
           f"(data wait {r['sslp_run_data_wait']:.0%}; {ours / plain:.2f}x the plain loop)")
    return "\n".join([head,
                      f"  compute bound (fixed batch, no data)      {bound:>9,.0f}  100%  ({how})",
                      f"  plain loop (DataLoader, per sample)      {plain:>9,.0f}  {plain / bound:.0%}",
                      run])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sslp bench train``."""
    parser.add_argument("--preset", default=None, help="a preset on a built-in corpus (default: simclr-digits; "
                                                         "with --memory clip-digit-captions and simclr-digits)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps of each measurement (default: 40; "
                                                                 "5 with --memory)")
    parser.add_argument("--memory", action="store_true", help="peak memory and speed of one step with k = 1 and "
                                                              "k = --accum micro-batches, instead of the throughput")
    parser.add_argument("--accum", type=int, default=8, help="--memory: micro-batches k (default: 8)")
    parser.add_argument("--mode", default="exact", choices=("exact", "independent"),
                        help="--memory: train.grad_accum_mode of the k micro-batches (default: exact)")
    parser.add_argument("--cpus", type=int, default=None, help="cores for the compute bound and the plain loop "
                                                                "(default: all)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, as for sslp run")


def run_from_args(args: argparse.Namespace) -> int:
    if args.memory:
        from ssl_platform.bench_memory import MEMORY_PRESETS, format_memory_bench, run_memory_bench

        if args.accum < 2:
            raise SystemExit(f"--accum must be at least 2, got {args.accum}")
        rows = run_memory_bench([args.preset] if args.preset else list(MEMORY_PRESETS), args.accum, args.mode,
                                max(1, args.steps or 5), args.overrides)
        print(json.dumps(rows, indent=2) if args.json else format_memory_bench(rows))
        return 0
    args.preset, args.steps = args.preset or "simclr-digits", 40 if args.steps is None else args.steps
    if args.steps < 2:
        raise SystemExit(f"--steps must be at least 2, got {args.steps}")
    if args.cpus is not None and args.cpus < 1:
        raise SystemExit(f"--cpus must be at least 1, got {args.cpus}")
    row = run_train_bench(args.preset, args.steps, args.cpus, args.overrides)
    print(json.dumps(row, indent=2) if args.json else format_train_bench(row))
    return 0

"""``sslp bench data``: two-view augmentation throughput, the platform against torchvision.

Both sides get the same synthetic JPEGs (made here, no network), the same SimCLR recipe
(random resized crop, flip, colour jitter p=0.8, grayscale p=0.2, blur p=0.5) and the same
number of CPU cores, and both decode every JPEG:

- platform: Ray Data ``map_batches`` on ``cpus`` one-CPU tasks, each decoding a batch with
  :func:`decode_image_bytes` and augmenting it with the batched :class:`MultiViewAugment`;
- baseline: a ``torch.utils.data.DataLoader`` with ``num_workers = cpus``, each worker
  decoding one image with PIL and applying torchvision.transforms.v2 twice.

Throughput is views per second over a whole pass: the best of ``repeats`` passes after a
warm-up that starts the workers (the best, because other processes on a shared machine only ever
slow a pass down). A whole pass of the platform includes the start of a Ray Data execution,
which a training run's stream pays once; the "long pass" figure is the platform's rate over the
same images repeated to :data:`LONG_PASS_BATCHES` batches, where that start weighs little. The two sides'
passes alternate, so a change in the machine's load hits both. The "per core" columns run each
side's transform in this process on one thread with no Ray and no DataLoader, to separate the
transform's speed from the framework's; "N at once" runs the platform's one-core pass in N
processes together (no Ray), which is what the machine gives N copies of the code when they
share its caches and memory bandwidth. Both sides run with the malloc settings ``sslp`` gives
every process it starts (:mod:`ssl_platform.heap`; the DataLoader's spawned workers inherit
them).

    python -m ssl_platform.bench --sizes 32 224 --json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import queue
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# torch, torchvision and Ray are imported where they are used, so building the CLI's parser
# (which imports this module for add_arguments) stays fast.

# Source images are a little larger than the output at 224 px (as in corpora resized to 256
# for ImageNet-style training), and as small as CIFAR at 32 px.
SOURCE_SIDE = {32: 32, 224: 256}
DEFAULT_IMAGES = {32: 16384, 224: 384}  # a pass of a few seconds for the platform
# Small images need big batches to amortise the per-task cost of Ray Data (~10 ms): at 32 px the
# records per task a run's stream uses (data.pipeline.auto_transform_records); at 224 px the
# DataLoader's best (the platform's augmentation is chunked, so its batch size matters little there).
DEFAULT_BATCH = {32: 2048, 224: 32}
PER_CORE_IMAGES = {32: 4096, 224: 128}  # the single-thread passes need fewer images for a steady rate
# Batches in the platform's long pass (the pass's images repeated as often as it takes): enough that
# the start of a Ray Data execution (~0.14 s to a first batch on the development machine, then the
# first tasks' work), which a run's stream pays once, weighs little.
LONG_PASS_BATCHES = 32


@dataclass(frozen=True)
class BenchCase:
    size: int        # output side of the views
    images: int      # JPEGs in one pass
    batch_size: int  # records per map_batches call and per DataLoader batch
    cpus: int        # cores for each side: Ray tasks, DataLoader workers
    repeats: int = 2  # timed passes after the warm-up; the best counts


def synthetic_jpegs(n: int, side: int | tuple[int, int], seed: int = 0, quality: int = 90) -> list[bytes]:
    """``n`` photo-like JPEGs, ``side`` pixels square or (width, height): smooth random colour
    fields plus fine grain.

    Pure noise would compress badly and decode unrealistically slowly; smooth fields with a
    little texture land near natural photos in bytes per pixel.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = (side, side) if isinstance(side, int) else side
    blobs = []
    for _ in range(n):
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
        grain = rng.normal(0, 6, size=field.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        blobs.append(buf.getvalue())
    return blobs


# ---------------------------------------------------------------------------------------------
# The platform's side

class DecodeTwoViews:
    """``map_batches`` callable: ``{"bytes", "path"}`` -> ``{"view1", "view2"}`` float32 (B, 3, S, S)."""

    def __init__(self, size: int, seed: int | None = None):
        from ssl_models import SimCLR
        from ssl_platform.data.transforms import MultiViewAugment
        from ssl_platform.views import recipe

        self.size = size
        self.augment = MultiViewAugment(recipe(SimCLR.spec.views, size=size), seed=seed)  # the bench measures SimCLR's

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ssl_platform.data.decode import decode_image_bytes

        torch.set_num_threads(1)  # one task per CPU, as MultiViewAugment does
        images, failed = decode_image_bytes(batch["bytes"], self.size, channels=3)
        paths = np.delete(batch["path"], failed)
        return self.augment({"image": images, "path": paths})


def _timed(count_views) -> tuple[int, float]:
    start = time.perf_counter()
    views = count_views()
    return views, time.perf_counter() - start


def best_rates(passes: dict, repeats: int) -> dict[str, float]:
    """``{name: one_pass}`` -> ``{name: best views/s}``, running the sides' passes in turn.

    Each ``one_pass() -> (views, seconds)`` is already warmed up.
    """
    best = dict.fromkeys(passes, 0.0)
    for _ in range(repeats):
        for name, one_pass in passes.items():
            views, seconds = one_pass()
            best[name] = max(best[name], views / seconds)
    return best


def _record_batches(blobs: list[bytes], batch_size: int):
    for start in range(0, len(blobs), batch_size):
        chunk = blobs[start:start + batch_size]
        yield {"bytes": np.array(chunk, dtype=object),
               "path": np.array([f"synthetic/{start + i}.jpg" for i in range(len(chunk))], dtype=object)}


def platform_ray_pass(blobs: list[bytes], case: BenchCase, ray_defaults: bool = False, copies: int = 1):
    """A warmed-up pass of decode + two-view augmentation in Ray Data tasks on ``case.cpus`` cores,
    under the platform's Ray Data settings (:func:`configure_data_context`), or Ray Data's own
    defaults with ``ray_defaults`` (the reference that shows what the settings are worth).

    The pass reads the blobs ``copies`` times over.
    """
    import ray.data

    from ssl_platform.data.context import IDLE_WAIT_KEY, configure_data_context, current_data_context

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no line per pass
    configure_data_context()
    ctx = current_data_context()
    if ray_defaults:  # the field's default (a new DataContext() would give Ray's own deprecation notices)
        field = ray.data.DataContext.__dataclass_fields__["op_resource_reservation_enabled"]
        ctx.op_resource_reservation_enabled = field.default
        ctx.set_config(IDLE_WAIT_KEY, 0)  # Ray's own scheduling loop
    items = [{"bytes": b, "path": f"synthetic/{i}.jpg"} for i, b in enumerate(blobs * copies)]
    blocks = max(2 * case.cpus, len(items) // case.batch_size)
    source = ray.data.from_items(items, override_num_blocks=blocks).materialize()  # reading is not timed
    configure_data_context()  # the next Dataset built in this process gets the platform's settings again

    def count_views() -> int:
        pipeline = source.map_batches(DecodeTwoViews(case.size), batch_size=case.batch_size,
                                      batch_format="numpy", num_cpus=1)
        return sum(2 * len(b["view1"]) for b in pipeline.iter_batches(batch_size=None, batch_format="numpy"))

    count_views()  # warm-up: start the workers, import torch there
    return lambda: _timed(count_views)


def platform_core_pass(blobs: list[bytes], case: BenchCase):
    """A pass of the same decode + augmentation in this process (run it on one thread), no Ray."""
    step = DecodeTwoViews(case.size)
    step(next(_record_batches(blobs, case.batch_size)))  # warm-up: first calls allocate and dispatch
    return lambda: _timed(lambda: sum(2 * len(step(b)["view1"]) for b in _record_batches(blobs, case.batch_size)))


# ---------------------------------------------------------------------------------------------
# The torchvision baseline

def torchvision_two_view(size: int):
    """SimCLR's recipe as torchvision users write it: per-image PIL transforms, ToTensor last."""
    import torch
    import torchvision.transforms.v2 as v2

    blur_kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5] * 3, [0.5] * 3),
    ])


def save_blobs(blobs: list[bytes], path: Path) -> Path:
    """All blobs in one ``.npz`` (bytes + offsets), for workers to load instead of unpickling them."""
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(path, data=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets)
    return path


class JpegTwoViews:
    """Baseline map-style dataset: index -> (view1, view2) float32 (3, S, S), decoded with PIL.

    It holds only the path of the blobs (see :func:`save_blobs`) and loads them on first use:
    a spawned worker receives its dataset through a pipe, and a payload larger than the pipe
    would block the parent forever if the worker died while starting.
    """

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        with np.load(path) as f:
            self.n = len(f["offsets"]) - 1
        self.transform = torchvision_two_view(size)
        self._data = self._offsets = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        return {"path": self.path, "size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["size"])

    def __getitem__(self, i: int):
        from PIL import Image

        if self._data is None:
            with np.load(self.path) as f:
                self._data, self._offsets = f["data"], f["offsets"]
        blob = self._data[self._offsets[i]:self._offsets[i + 1]].tobytes()
        with Image.open(io.BytesIO(blob)) as im:
            image = im.convert("RGB")
        return self.transform(image), self.transform(image)


class _FirstN:
    """Sampler of indices 0..n-1, n settable between passes (a short warm-up, then the full pass)."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def _baseline_worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)
    # Tiny Gaussian weights are denormal floats, which slow torchvision's blur several-fold;
    # flushing them gives the baseline its best case rather than its worst.
    torch.set_flush_denormal(True)


def baseline_loader_pass(blobs: Path, case: BenchCase):
    """A warmed-up pass of the torchvision DataLoader with ``case.cpus`` worker processes.

    The workers persist until the returned pass is garbage-collected.
    """
    import torch
    dataset = JpegTwoViews(blobs, case.size)
    sampler = _FirstN(min(len(dataset), case.cpus * case.batch_size))  # one batch per worker
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=case.batch_size, sampler=sampler, num_workers=case.cpus,
        worker_init_fn=_baseline_worker_init, persistent_workers=True,
        multiprocessing_context="spawn")  # never fork a process that may hold Ray's threads
    for _ in loader:  # warm-up: spawn the workers, import torchvision there
        pass
    sampler.n = len(dataset)
    return lambda: _timed(lambda: sum(2 * len(view1) for view1, _view2 in loader))


def baseline_core_pass(blobs: Path, case: BenchCase):
    """A pass of the same per-image decode + transforms in this process (run it on one thread)."""
    dataset = JpegTwoViews(blobs, case.size)
    dataset[0]  # warm-up

    def count_views() -> int:
        for i in range(len(dataset)):
            dataset[i]
        return 2 * len(dataset)

    return lambda: _timed(count_views)


# ---------------------------------------------------------------------------------------------
# Decode + crop of photos larger than the crop, per core

PHOTO_SIDES = ((500, 375), (1024, 768))  # ImageNet's typical photo, and one over twice 224 px (DCT-scaled)
PHOTO_MIN_SIZE = 128  # output sides from which the photo figures are measured (photos are larger than the crop)
PHOTO_REFERENCE = 300  # images/s per core: what FFCV reports per vCPU for decode + random-resized crop


def photo_crop_rates(size: int = 224, images: int = 128, repeats: int = 2) -> dict[str, float]:
    """Images/s on one thread of the platform's decode (reduced-size JPEG decoding when the photo is
    at least twice ``size``) plus a random-resized crop and flip, for JPEG photos of each of
    :data:`PHOTO_SIDES`: ``{"photo_500x375_per_s": ..., ...}``."""
    import torch

    from ssl_platform.data.decode import decode_image_bytes
    from ssl_platform.data.transforms import MultiViewAugment
    from ssl_platform.views import AugmentConfig

    crop = MultiViewAugment([AugmentConfig(size=size, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = {}
        for width, height in PHOTO_SIDES:
            blobs = synthetic_jpegs(images, (width, height), seed=1)
            batches = list(_record_batches(blobs, 32))

            def one_pass(batches=batches) -> tuple[int, float]:
                def count() -> int:
                    done = 0
                    for b in batches:
                        decoded, _ = decode_image_bytes(b["bytes"], size, channels=3)
                        done += len(crop({"image": decoded})["view1"])
                    return done
                return _timed(count)

            one_pass()  # warm-up
            rates[f"photo_{width}x{height}_per_s"] = best_rates({"r": one_pass}, repeats)["r"]
        return rates
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Driver

def _per_core_rates(blobs: list[bytes], case: BenchCase, workdir: Path) -> dict[str, float]:
    """Both transforms in this process with torch on one thread (denormals flushed, as in the
    baseline's workers); the settings are restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        saved = save_blobs(blobs, workdir / f"core-{case.size}.npz")
        return best_rates({"baseline_core_views_per_s": baseline_core_pass(saved, case),
                           "platform_core_views_per_s": platform_core_pass(blobs, case)}, case.repeats)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


PARALLEL_TIMEOUT_S = 600  # the 'N at once' pass: seconds before it is given up


def _core_pass_process(path: Path, size: int, batch_size: int, repeats: int, barrier, results) -> None:
    """One of :func:`parallel_core_rate`'s processes: the platform's one-core pass over the blobs
    at ``path``, ``repeats`` times, each pass started together with the other processes'."""
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    with np.load(path) as f:
        data, offsets = f["data"], f["offsets"]
    blobs = [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
    one_pass = platform_core_pass(blobs, BenchCase(size, len(blobs), batch_size, 1, repeats))
    rates = []
    for _ in range(repeats):
        barrier.wait(timeout=PARALLEL_TIMEOUT_S)  # a process that died breaks it: the others end too
        views, seconds = one_pass()
        rates.append(views / seconds)
    results.put(rates)


def parallel_core_rate(blobs: list[bytes], case: BenchCase, workdir: Path) -> float:
    """Views/s of ``case.cpus`` processes each running the platform's one-core pass at the same
    time, without Ray: what the machine gives N copies of the code (shared caches, memory
    bandwidth, the host), the limit any framework's N workers can reach. Best of the repeats of
    the summed rates."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold Ray's threads
    saved = save_blobs(blobs, workdir / f"parallel-{case.size}.npz")
    barrier, results = ctx.Barrier(case.cpus), ctx.Queue()
    procs = [ctx.Process(target=_core_pass_process, args=(saved, case.size, case.batch_size, case.repeats, barrier,
                                                          results), daemon=True) for _ in range(case.cpus)]
    for proc in procs:
        proc.start()
    try:
        rates, deadline = [], time.monotonic() + PARALLEL_TIMEOUT_S
        while len(rates) < len(procs):  # never wait on a process that is gone
            try:
                rates.append(results.get(timeout=1))
            except queue.Empty:
                failed = [proc.exitcode for proc in procs if proc.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"the 'N at once' pass ({case.cpus} processes of the one-core pass) "
                                       + (f"lost a process (exit code {failed[0]}; its error is printed above)"
                                          if failed else f"took over {PARALLEL_TIMEOUT_S} s")
                                       + "; --no-per-core skips it") from None
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return max(sum(together) for together in zip(*rates, strict=True))


def bench_case(case: BenchCase, per_core: bool, workdir: Path) -> dict:
    """One row of figures for one output size."""
    source_side = SOURCE_SIDE.get(case.size, case.size)
    blobs = synthetic_jpegs(case.images, source_side)
    row = {"size": case.size, "source_side": source_side, "images": case.images, "batch_size": case.batch_size,
           "cpus": case.cpus, "load_avg_1m": round(os.getloadavg()[0], 2)}
    copies = math.ceil(LONG_PASS_BATCHES * case.batch_size / case.images)  # the long pass's repeats
    row["long_pass_images"] = copies * case.images
    passes = {"baseline_views_per_s": baseline_loader_pass(save_blobs(blobs, workdir / f"{case.size}.npz"), case),
              "ray_defaults_views_per_s": platform_ray_pass(blobs, case, ray_defaults=True),
              "platform_views_per_s": platform_ray_pass(blobs, case),
              "platform_long_views_per_s": platform_ray_pass(blobs, case, copies=copies)}
    row.update(best_rates(passes, case.repeats))
    del passes  # stops the DataLoader's workers
    row["ratio"] = row["platform_views_per_s"] / row["baseline_views_per_s"]
    if per_core:
        row.update(_per_core_rates(blobs[:PER_CORE_IMAGES.get(case.size, case.images)], case, workdir))
        row["core_ratio"] = row["platform_core_views_per_s"] / row["baseline_core_views_per_s"]
        # Pipeline efficiency: what Ray Data delivers on N cores over N x the same code on one core.
        cores = case.cpus * row["platform_core_views_per_s"]
        row["efficiency"] = row["platform_views_per_s"] / cores
        row["long_efficiency"] = row["platform_long_views_per_s"] / cores
        row["ray_defaults_efficiency"] = row["ray_defaults_views_per_s"] / cores
        # The machine's limit: N copies of that code running at once share its caches and memory.
        row["parallel_core_views_per_s"] = parallel_core_rate(blobs, case, workdir)  # the Ray pass's images
        row["machine_efficiency"] = row["platform_views_per_s"] / row["parallel_core_views_per_s"]
        row["long_machine_efficiency"] = row["platform_long_views_per_s"] / row["parallel_core_views_per_s"]
        if case.size >= PHOTO_MIN_SIZE:  # photos larger than the crop: the case reduced-size decoding is for
            row.update(photo_crop_rates(case.size, repeats=case.repeats))
    row["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    return row


def run_data_bench(sizes: Sequence[int] = (32, 224), images: int | None = None, batch_size: int | None = None,
                   cpus: int | None = None, per_core: bool = True, repeats: int = 2) -> list[dict]:
    """Measure both pipelines at each size; one row (a dict of figures) per size.

    ``images`` and ``batch_size`` default per size (:data:`DEFAULT_IMAGES`, :data:`DEFAULT_BATCH`);
    ``cpus`` defaults to every core of this machine; each figure is the best of ``repeats``
    passes. Starts a local Ray instance of ``cpus`` CPUs unless Ray is already initialised
    (then its cluster's CPUs are what the tasks get).
    """
    import ray

    cpus = cpus or os.cpu_count() or 1
    started_ray = not ray.is_initialized()
    if started_ray:
        # Ray's start-up lines (the local instance, its token authentication) are not figures: only errors
        # show, as in `sslp bench train`.
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}})
    try:
        with tempfile.TemporaryDirectory(prefix="sslp-bench-") as tmp:
            return [bench_case(BenchCase(size, images or DEFAULT_IMAGES.get(size, 512),
                                         batch_size or DEFAULT_BATCH.get(size, 64), cpus, repeats),
                               per_core, Path(tmp))
                    for size in sizes]
    finally:
        if started_ray:
            ray.shutdown()


def format_bench(rows: list[dict]) -> str:
    """The figures side by side, one line per size."""
    head = (f"{'size':>5} {'images':>6} {'cpus':>4} | {'torchvision DataLoader':>22} {'Ray Data defaults':>17} "
            f"{'platform (Ray Data)':>19} {'long pass':>9} {'ratio':>6} | {'per core: torchvision':>21} "
            f"{'platform':>8} {'ratio':>6} | {'efficiency':>10} {'long':>5} {'(defaults)':>10} | {'N at once':>9} "
            f"{'of it':>5} {'long':>5}")
    lines = ["two-view augmentation throughput, views/s (JPEG decode included; SimCLR recipe)", head,
             "-" * len(head)]
    for r in rows:
        core = (f"{r['baseline_core_views_per_s']:>21.0f} {r['platform_core_views_per_s']:>8.0f} "
                f"{r['core_ratio']:>5.1f}x | {r['efficiency']:>10.0%} {r['long_efficiency']:>5.0%} "
                f"{r['ray_defaults_efficiency']:>10.0%} | {r['parallel_core_views_per_s']:>9.0f} "
                f"{r['machine_efficiency']:>5.0%} {r['long_machine_efficiency']:>5.0%}"
                if "core_ratio" in r else "")
        lines.append(f"{r['size']:>5} {r['images']:>6} {r['cpus']:>4} | {r['baseline_views_per_s']:>22.0f} "
                     f"{r['ray_defaults_views_per_s']:>17.0f} {r['platform_views_per_s']:>19.0f} "
                     f"{r['platform_long_views_per_s']:>9.0f} {r['ratio']:>5.1f}x | {core}")
    lines.append("ratio: platform / torchvision DataLoader, whole passes. Ray Data defaults: the same pipeline "
                 "under Ray Data's own scheduling settings (the platform turns off its per-operator resource "
                 "reservation)")
    lines.append(f"long pass: the platform over the same images repeated to {LONG_PASS_BATCHES} batches, where the "
                 f"start of a Ray Data execution (which a run's stream pays once) weighs little")
    lines.append("per core: each transform in one process on one thread, without Ray or DataLoader; "
                 "efficiency: Ray Data's views/s over cpus x the platform's per-core views/s (goal: 80%), over a "
                 "pass and a long pass; N at once: cpus processes of that one-core pass running together (the "
                 "machine's limit for the code), and what Ray Data delivers of it")
    for r in rows:
        photos = [f"{key[6:-6]} {value:,.0f}" for key, value in r.items() if key.startswith("photo_")]
        if photos:
            lines.append(f"decode + random-resized crop and flip of JPEG photos, one core, {r['size']} px: "
                         f"{', '.join(photos)} images/s (reference: {PHOTO_REFERENCE} per vCPU, FFCV's figure)")
    loads = ", ".join(f"{r['size']} px {r['load_avg_1m']}-{r['load_avg_1m_after']}" for r in rows)
    lines.append(f"machine load (1-min average before-after): {loads}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``sslp bench data``."""
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], help="output sides in pixels")
    parser.add_argument("--images", type=int, default=None, help="JPEGs per pass (default: 16384 at 32 px, 384 at 224)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="records per batch (default: 2048 at 32 px, 32 at 224)")
    parser.add_argument("--cpus", type=int, default=None, help="cores for each side (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per figure; the best counts")
    parser.add_argument("--no-per-core", action="store_true", help="skip the single-thread columns")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")


def run_from_args(args: argparse.Namespace) -> int:
    for name in ("images", "batch_size", "cpus", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    from ssl_platform.views import MIN_SIDE

    small = [size for size in args.sizes if size < MIN_SIDE]
    if small:  # the views' own check would stop it inside a Ray task, naming a config key
        raise SystemExit(f"--sizes {small[0]}: a view's side must be at least {MIN_SIDE} pixels (the encoders' "
                         f"smallest input); use e.g. --sizes 32 224")
    rows = run_data_bench(args.sizes, args.images, args.batch_size, args.cpus, per_core=not args.no_per_core,
                          repeats=args.repeats)
    print(json.dumps(rows, indent=2) if args.json else format_bench(rows))
    return 0


if __name__ == "__main__":
    from ssl_platform.heap import keep_freed_memory

    keep_freed_memory()  # as sslp does first thing
    parser = argparse.ArgumentParser(prog="python -m ssl_platform.bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    raise SystemExit(run_from_args(parser.parse_args()))

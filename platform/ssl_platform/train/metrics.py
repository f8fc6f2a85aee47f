"""The platform's training metrics: one place that names them, measures them, writes them and prints them.

Every rank accumulates its steps in a :class:`StepMeter` (no host sync per step); at each
``log_every`` step the meter is reduced over the ranks and rank 0's :class:`MetricsLogger`
appends one JSON row to ``RUN_DIR/metrics.jsonl`` (Ray keeps only metrics reported with a
checkpoint), prints the progress line and sets the ``ray.util.metrics`` gauges that Prometheus
and the Ray dashboard plot. A resumed run first drops the rows of the steps it will redo, so
the file holds every logged step exactly once. Rows of online-evaluation steps also carry the
``val_*`` metrics (``train.online``) and ``online_eval_s``, the seconds they took.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ssl_models.losses.precision import at_least_fp32
from ssl_platform.config import ExperimentConfig
from ssl_platform.data.skips import SKIPPED_METRIC
from ssl_platform.train import console

# Every ray.util.metrics name the platform emits: name -> (kind, description). Prometheus sees
# them prefixed "ray_" (counters also suffixed "_total"); the README and the Grafana dashboards
# read this dict, the single place these names are defined. Gauges carry the tag "run";
# sslp_online_metric also "metric" (val_knn_top1, val_loss, ...: a Grafana panel selects one,
# or shows them all with the legend {{metric}}).
METRICS: dict[str, tuple[str, str]] = {
    "sslp_train_loss": ("gauge", "training loss, mean over workers and the steps since the last log row"),
    "sslp_train_samples_per_second": ("gauge", "global training throughput in samples (pairs, images, clips)"),
    "sslp_train_tokens_per_second": ("gauge", "text methods: global throughput in non-padding tokens"),
    "sslp_train_step_seconds": ("gauge", "mean seconds per optimizer step since the last log row"),
    "sslp_train_data_wait_seconds": ("gauge", "seconds the slowest worker waited for data since the last log row"),
    "sslp_train_data_wait_fraction": ("gauge", "fraction of the time since the last log row spent waiting for data"),
    "sslp_train_learning_rate": ("gauge", "current learning rate"),
    "sslp_train_grad_norm": ("gauge", "global gradient norm before clipping, mean since the last log row"),
    "sslp_train_step": ("gauge", "optimizer steps taken"),
    "sslp_online_metric": ("gauge", ("online evaluation on the held-out split, tagged by metric: val_knn_top1, "
                                     "val_zero_shot_top1, val_loss, val_mlm_accuracy, val_perplexity, ...")),
    SKIPPED_METRIC: ("counter", "records skipped by the data pipeline, tagged by reason (ssl_platform.data.skips)"),
}
GAUGES = {name: description for name, (kind, description) in METRICS.items() if kind == "gauge"}
ONLINE_GAUGE = "sslp_online_metric"  # one gauge for every val_* metric, which its "metric" tag names
ONLINE_PREFIX = "val_"

# metrics.jsonl field -> the gauge it sets.
_GAUGE_OF_FIELD = {
    "loss": "sslp_train_loss", "samples_per_s": "sslp_train_samples_per_second",
    "tokens_per_s": "sslp_train_tokens_per_second", "step_time_s": "sslp_train_step_seconds",
    "data_wait_s": "sslp_train_data_wait_seconds", "data_wait_fraction": "sslp_train_data_wait_fraction",
    "lr": "sslp_train_learning_rate", "grad_norm": "sslp_train_grad_norm", "step": "sslp_train_step",
}


def count_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
    """Non-padding tokens of a text batch (BERT pairs, GPT blocks); 0 for other kinds of batch.

    Stays a tensor on the batch's device, so counting costs no host sync.
    """
    if "input_ids" not in batch:
        return 0
    mask = batch.get("attention_mask")
    return mask.sum() if mask is not None else batch["input_ids"].numel()


class StepMeter:
    """What one rank accumulates between two log rows: the method's scalar outputs, the
    gradient norm, samples, tokens and the time spent waiting for data."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self.steps = self.samples = 0
        self.tokens: torch.Tensor | int = 0
        self.data_wait_s = 0.0

    def timed(self, iterable: Iterable) -> Iterator:
        """Yield from ``iterable``, adding the time blocked in ``next()`` to the data wait; closing
        this generator closes ``iterable`` (a Ray Data iterator stops its executor)."""
        it = iter(iterable)
        try:
            while True:
                tic = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    self.data_wait_s += time.perf_counter() - tic
                yield item
        finally:
            if hasattr(it, "close"):
                it.close()

    def add(self, outputs: dict[str, torch.Tensor], samples: int, tokens: torch.Tensor | int) -> None:
        """One optimizer step: ``outputs`` are scalar tensors (loss, grad_norm, method metrics)."""
        for name, value in outputs.items():
            value = at_least_fp32(value.detach())  # float64 kept (train.precision=fp64)
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self.steps += 1
        self.samples += samples
        self.tokens = self.tokens + tokens

    def pop(self, world: int, device: torch.device) -> dict[str, float]:
        """Means of the outputs over steps and ranks, global samples/tokens, the slowest rank's
        data wait; then start a new interval. Every rank must call it at the same step."""
        names = sorted(self._sums)  # the same method on every rank: the same names
        counts = torch.tensor([float(self.samples), float(self.tokens)], device=device)
        sums = torch.cat([torch.stack([self._sums[n] for n in names]).to(device), counts])
        wait = torch.tensor([self.data_wait_s], device=device)  # NCCL needs GPU tensors
        if world > 1 and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(wait, op=dist.ReduceOp.MAX)  # the slowest rank holds up the others
        values = sums.cpu().tolist()
        out = {n: v / (self.steps * world) for n, v in zip(names, values, strict=False)}
        out.update(samples=values[-2], tokens=values[-1], steps=self.steps, data_wait_s=float(wait.item()))
        self._reset()
        return out


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# Above this fraction of the training time spent waiting for data, a run is data-bound: the
# progress line and the run summary say so, and what to give it.
DATA_BOUND = 0.10


def data_bound(fraction: float | None, advice: str) -> str:
    """"data-bound: 18% wait; <advice>" when ``fraction`` is over :data:`DATA_BOUND`, else ""."""
    if fraction is None or fraction <= DATA_BOUND:
        return ""
    return f"data-bound: {fraction:.0%} wait; {advice}"


def data_advice(cfg: ExperimentConfig) -> str:
    """What a data-bound run of ``cfg`` should be given, in one clause."""
    from ssl_platform.data.pipeline import DEFAULT_RECORDS, auto_transform_records

    if cfg.scaling.use_gpu and cfg.augment_placement() == "cpu":
        advice = "run the per-pixel augmentation on the GPU (data.augment_on=device) or give Ray Data more CPUs"
    else:
        advice = "give Ray Data more CPUs: scaling.data_cpus (or CPU nodes), or fewer per train worker"
    records, chosen = auto_transform_records(cfg), cfg.data.transform_batch_size
    if chosen is not None and chosen < records and records > DEFAULT_RECORDS:  # small images, short tasks
        advice += (f"; data.transform_batch_size={chosen} makes Ray Data's tasks short for {cfg.data.image_size}-px "
                   f"images: leave it empty ({records} records a task) so they pay for their fixed cost")
    return advice


def format_spill(spilled: int) -> str:
    """The summary's spill line: none, or how much and what to change."""
    if spilled <= 0:
        return "nothing spilled from the object store to disk"
    return (f"{spilled / 2**20:,.0f} MiB spilled from the object store to disk (the blocks in flight did not fit: "
            f"give Ray more object store memory, or lower data.transform_batch_size)")


class MetricsLogger:
    """Turns reduced :class:`StepMeter` intervals into metrics.jsonl rows, gauges and the
    progress line (rank 0 only, ``enabled``), and keeps the run's summary on every rank.

    Args:
        start_step: the step this session starts from (the checkpoint's, 0 for a new run);
            rows after it are removed from metrics.jsonl because those steps are done again.
        workers: the attempt's worker count (an elastic run's summary lists them per attempt).
    """

    def __init__(self, run_dir: str | Path, run_name: str, max_steps: int, start_step: int, enabled: bool,
                 data_advice: str = "give Ray Data more CPUs: scaling.data_cpus", workers: int = 1):
        self.enabled = enabled
        self.data_advice = data_advice  # what the progress line and summary suggest when data-bound
        self._rows = 0
        self._steady_wait_s = self._steady_s = 0.0  # data wait over the rows after the first (warm-up)
        self._advised = False
        self._advice_key = f"data-bound {run_name}"  # the console shows it once per run, across restarts
        self.max_steps = max_steps
        self.start_step = start_step
        self.path = Path(run_dir) / "metrics.jsonl"
        self._t0 = self._last_t = time.perf_counter()
        self._samples = self._tokens = 0.0
        self._last: dict[str, float] = {}
        self._gauges = {}
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            drop_rows_after(self.path, start_step)
            self._gauges = _make_gauges(run_name)
            # An attempt of the run (a restart if not the first), on this many workers.
            console.event("start", step=start_step, workers=workers)

    def untimed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, its time left out of the interval's throughput and step time and of the
        summary's training seconds (the online evaluation runs inside the loop)."""
        tic = time.perf_counter()
        try:
            return fn(*args)
        finally:
            spent = time.perf_counter() - tic
            self._t0 += spent
            self._last_t += spent

    def log(self, step: int, interval: dict[str, float], **values: float) -> dict[str, Any]:
        """Record the interval ending at ``step`` (from :meth:`StepMeter.pop`) plus ``values``
        (lr, epoch, the online ``val_*`` metrics, ...); returns the row."""
        now = time.perf_counter()
        seconds = max(now - self._last_t, 1e-9)
        self._last_t = now
        self._samples += interval["samples"]
        self._tokens += interval["tokens"]
        elapsed = now - self._t0
        steps = interval["steps"]
        row = {"step": step, **{k: float(v) for k, v in values.items()},
               **{k: v for k, v in interval.items() if k not in ("samples", "tokens", "steps", "data_wait_s")},
               "samples_per_s": interval["samples"] / seconds, "step_time_s": seconds / steps,
               "data_wait_s": interval["data_wait_s"],
               "data_wait_fraction": min(1.0, interval["data_wait_s"] / seconds),
               "elapsed_s": elapsed, "time": time.time()}
        if interval["tokens"]:
            row["tokens_per_s"] = interval["tokens"] / seconds
        if self._rows:  # the first interval holds the pipeline's start: not the steady state
            self._steady_wait_s += min(interval["data_wait_s"], seconds)
            self._steady_s += seconds
        self._rows += 1
        self._last = row
        if not self.enabled:
            return row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for field, gauge in _GAUGE_OF_FIELD.items():
            if gauge in self._gauges and field in row:
                self._gauges[gauge].set(row[field])
        online = {k: v for k, v in row.items() if k.startswith(ONLINE_PREFIX)}
        if ONLINE_GAUGE in self._gauges:
            for name, value in online.items():
                self._gauges[ONLINE_GAUGE].set(value, tags={"metric": name})
        done = step - self.start_step
        eta = elapsed / done * (self.max_steps - step) if done > 0 else float("nan")
        rate = (f"{row['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in row
                else f"{row['samples_per_s']:,.0f} samples/s")
        steady = self.steady_data_wait()
        bound = data_bound(steady, self.data_advice) if self._rows > 1 else ""
        console.progress(
            step, self.max_steps,
            f"step {step:>{len(str(self.max_steps))}}/{self.max_steps} | loss {row.get('loss', float('nan')):.4f} | "
            f"lr {row.get('lr', 0):.4g} | {rate} | {row['step_time_s']:.3g} s/step | "
            f"data wait {row['data_wait_fraction']:.0%}{' (data-bound)' if bound else ''} | "
            f"ETA {format_duration(eta)}"
            + "".join(f" | {name} {value:.4g}" for name, value in online.items()),
        )
        if bound and not self._advised:  # the advice once; "(data-bound)" on the lines after
            console.say(bound, once=self._advice_key)  # a restarted worker group (a new logger) asks again
            self._advised = True
        return row

    def steady_data_wait(self) -> float | None:
        """The fraction of training time spent waiting for data after the first logged interval
        (None until there is one)."""
        return self._steady_wait_s / self._steady_s if self._steady_s > 0 else None

    def summary(self) -> dict[str, float]:
        """This session's totals for the run summary: the last logged loss, seconds of training
        and mean throughput (samples/s, and tokens/s for text)."""
        elapsed = self._last_t - self._t0
        out = {"train_seconds": elapsed, "samples_per_s": self._samples / elapsed if elapsed > 0 else 0.0}
        if self._tokens:
            out["tokens_per_s"] = self._tokens / elapsed
        if "loss" in self._last:
            out["loss"] = self._last["loss"]
        steady = self.steady_data_wait()
        if steady is None and "data_wait_fraction" in self._last:  # a single interval: all there is
            steady = self._last["data_wait_fraction"]
        if steady is not None:
            out["data_wait_fraction"] = steady
        return out


def _make_gauges(run_name: str) -> dict:
    try:
        from ray.util.metrics import Gauge

        gauges = {name: Gauge(name, description=desc, tag_keys=("run", "metric") if name == ONLINE_GAUGE else ("run",))
                  for name, desc in GAUGES.items()}
    except Exception:  # outside a Ray worker (unit tests) there is nothing to export to
        return {}
    for g in gauges.values():
        g.set_default_tags({"run": run_name})
    return gauges


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn line (a killed run) is ignored."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def drop_rows_after(path: str | Path, step: int) -> None:
    """Keep only the rows of metrics.jsonl with ``step <= step`` (and no torn line).

    A run resumed from the checkpoint at ``step`` (a re-run, or Ray restarting a dead worker
    group) trains the later steps again and logs them again; without this they would appear
    twice. Written to a temporary file and renamed, so a crash here cannot lose the file.
    """
    p = Path(path)
    if not p.exists():
        return
    text = p.read_text()
    rows = read_metrics(p)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) == len(rows) and (not text or text.endswith("\n")) and len(rows) == len(text.splitlines()):
        return  # nothing to drop and no torn line
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, p)

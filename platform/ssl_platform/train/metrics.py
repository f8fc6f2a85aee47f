"""The platform's training metrics: one place that names them, writes them and prints them.

Rank 0 appends one JSON object per ``log_every`` steps to ``RUN_DIR/metrics.jsonl`` (Ray keeps
only metrics reported with a checkpoint), prints a progress line, and sets ``ray.util.metrics``
gauges so Prometheus / the Ray dashboard can plot the run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

# Metric names exported to Prometheus (prefixed "ray_" by Ray's exporter). Dashboards and their
# tests read this dict; it is the single place these names are defined.
GAUGES = {
    "sslp_train_loss": "training loss (mean over workers)",
    "sslp_train_samples_per_second": "global training throughput",
    "sslp_train_learning_rate": "current learning rate",
    "sslp_train_data_wait_fraction": "fraction of step time spent waiting for the data pipeline",
    "sslp_train_step": "optimizer steps taken",
}


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class MetricsLogger:
    """Rank-0 sink for step metrics; a no-op on other ranks."""

    def __init__(self, run_dir: str | Path, run_name: str, max_steps: int, enabled: bool):
        self.enabled = enabled
        self.max_steps = max_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self._t0 = time.perf_counter()
        self._last_t = self._t0
        self._gauges = {}
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from ray.util.metrics import Gauge

                self._gauges = {name: Gauge(name, description=desc, tag_keys=("run",)) for name, desc in GAUGES.items()}
                for g in self._gauges.values():
                    g.set_default_tags({"run": run_name})
            except Exception:  # outside a Ray worker (unit tests) there is nothing to export to
                self._gauges = {}

    def log(self, step: int, start_step: int, samples: int, data_wait_s: float, values: dict[str, float]) -> None:
        """Record ``values`` at ``step``; ``samples``/``data_wait_s`` accumulate since the last call."""
        if not self.enabled:
            return
        now = time.perf_counter()
        interval = max(now - self._last_t, 1e-9)
        self._last_t = now
        throughput = samples / interval
        elapsed = now - self._t0
        done = step - start_step
        eta = elapsed / done * (self.max_steps - step) if done > 0 else float("nan")
        row = {"step": step, **{k: float(v) for k, v in values.items()}, "samples_per_s": throughput,
               "data_wait_fraction": min(1.0, data_wait_s / interval), "elapsed_s": elapsed, "time": time.time()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for name, value in (("sslp_train_loss", row.get("loss")), ("sslp_train_samples_per_second", throughput),
                            ("sslp_train_learning_rate", row.get("lr")), ("sslp_train_step", step),
                            ("sslp_train_data_wait_fraction", row["data_wait_fraction"])):
            if name in self._gauges and value is not None:
                self._gauges[name].set(value)
        print(
            f"step {step:>{len(str(self.max_steps))}}/{self.max_steps} | loss {row.get('loss', float('nan')):.4f} | "
            f"lr {row.get('lr', 0):.4g} | {throughput:,.0f} samples/s | data wait {row['data_wait_fraction']:.0%} | "
            f"ETA {format_duration(eta)}",
            flush=True,
        )


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a killed run) is ignored."""
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

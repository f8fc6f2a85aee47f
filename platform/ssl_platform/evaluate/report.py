"""The results report of a run: results.json, results.md and report.png in the run directory.

A results row is ``{"encoder": str, <metric>: float, ...}``: one row per encoder (this run's,
random init, other baselines) and any of the metrics in :data:`COLUMNS`. A row may lack a
metric (a raw-pixel baseline has no zero-shot score), which the table shows as "-". Percent
metrics are stored as fractions in 0..1 and shown in percent; number metrics (perplexity,
bits per token, loss) as they are. Other keys of a row are kept in results.json only.

The figure is drawn with matplotlib's object-oriented API (``Figure`` + ``savefig``, which
renders PNG with Agg) and never touches pyplot, so it works headless, in Ray workers and in
loops without leaking pyplot's global figures or changing the caller's backend.
"""

from __future__ import annotations

import json
import math
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

PERCENT, NUMBER = "percent", "number"
# Metric key -> (table header, kind), in table order. Percent metrics are fractions in 0..1.
COLUMNS: dict[str, tuple[str, str]] = {
    "linear_probe_top1": ("linear probe top-1", PERCENT),
    "knn_top1": ("kNN top-1", PERCENT),
    "zero_shot_top1": ("zero-shot top-1", PERCENT),
    "i2t_r1": ("image->text R@1", PERCENT),
    "i2t_r5": ("image->text R@5", PERCENT),
    "t2i_r1": ("text->image R@1", PERCENT),
    "t2i_r5": ("text->image R@5", PERCENT),
    "mlm_accuracy": ("MLM accuracy", PERCENT),
    "nsp_accuracy": ("NSP accuracy", PERCENT),
    "perplexity": ("perplexity", NUMBER),
    "bits_per_token": ("bits per token", NUMBER),
    "loss": ("loss", NUMBER),
    "top1": ("held-out top-1", PERCENT),  # `sslp finetune`: a classifier's own predictions
}


def display_name(method: str) -> str:
    """How the method's paper spells it (its spec's ``display_name``), for titles and the
    "<method> (this run)" row of every protocol's table."""
    from ssl_platform.methods import method_spec  # ssl_models and torch, which the report needs not

    return method_spec(method).display_name


def _check_rows(rows: list[dict]) -> list[dict]:
    """Rows with float metrics (a metric that is None is dropped), or a ValueError naming the bad row and key."""
    checked = []
    for i, row in enumerate(rows):
        if "encoder" not in row:
            raise ValueError(f"results row {i} lacks 'encoder'; each row needs an encoder name and metrics of "
                             f"{list(COLUMNS)}")
        clean = {**row, "encoder": str(row["encoder"])}
        for key, (_, kind) in COLUMNS.items():
            if key not in row:
                continue
            if row[key] is None:
                del clean[key]
                continue
            value = float(row[key])
            if not math.isfinite(value):
                raise ValueError(f"results row {i} ({clean['encoder']!r}) has {key}={value}; metrics must be finite "
                                 f"(a diverged checkpoint?)")
            if kind == PERCENT and not 0.0 <= value <= 1.0:
                raise ValueError(f"results row {i} ({clean['encoder']!r}) has {key}={value}; "
                                 f"accuracies are fractions in 0..1, not percent")
            clean[key] = value
        checked.append(clean)
    return checked


def present_columns(rows: list[dict]) -> list[str]:
    """The metric keys of :data:`COLUMNS` that at least one row has, in table order."""
    return [key for key in COLUMNS if any(key in row for row in rows)]


def format_value(key: str, value: float | None) -> str:
    """One table cell: percent metrics as 85.3, numbers with two decimals, a missing one as "-"."""
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if COLUMNS[key][1] == PERCENT else f"{value:.2f}"


def _to_json(value):
    # Extra keys a caller adds to a row may hold numpy scalars or arrays; store them as plain values.
    return value.tolist() if hasattr(value, "tolist") else str(value)


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table with only the metrics some row has; "-" where a row lacks one.

    | encoder | linear probe top-1 | kNN top-1 |
    |---|---|---|
    | random init | 85.3 | 80.1 |
    """
    rows = _check_rows(rows)
    keys = present_columns(rows)
    lines = ["| " + " | ".join(["encoder"] + [COLUMNS[k][0] for k in keys]) + " |", "|---" * (1 + len(keys)) + "|"]
    for row in rows:
        name = row["encoder"].replace("|", "\\|")  # a pipe would split the cell
        lines.append("| " + " | ".join([name] + [format_value(k, row.get(k)) for k in keys]) + " |")
    return "\n".join(lines)


def stage_table(stages: list[dict]) -> str:
    """Per-stage linear probes (``eval.probe_stages=all``) as a markdown table: a row per encoder,
    a column per stage from the input side, top-1 in percent.

    | linear probe top-1 per stage | stem | stage1 | stage2 |
    |---|---|---|---|
    | random init | 31.0 | 35.2 | 40.3 |
    """
    names = [k for k in stages[0] if k != "encoder"]
    lines = ["| " + " | ".join(["linear probe top-1 per stage", *names]) + " |", "|---" * (1 + len(names)) + "|"]
    for row in stages:
        cells = [f"{100 * row[k]:.1f}" if k in row else "-" for k in names]
        lines.append("| " + " | ".join([row["encoder"].replace("|", "\\|"), *cells]) + " |")
    return "\n".join(lines)


def _plot_stages(ax, stages: list[dict]) -> None:
    """Probe top-1 against depth, a line per encoder (the RotNet paper's per-layer comparison)."""
    names = [k for k in stages[0] if k != "encoder"]
    ax.set_title("linear probe per stage")
    for i, row in enumerate(stages):
        ax.plot(range(len(names)), [100 * row.get(k, math.nan) for k in names], marker="o", color=f"C{i}",
                label=row["encoder"])
    ax.set_xticks(range(len(names)), names, fontsize=9)
    ax.set_ylim(0, 105)
    ax.set_ylabel("top-1 %")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)


def read_loss_curve(metrics_path: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) from a metrics.jsonl, sorted by step; empty arrays if there is none.

    Lines that are torn (a killed run) or lack a finite ``loss`` are skipped. A resumed run
    rewinds to its checkpoint and logs some steps twice; the later line wins.
    """
    if metrics_path is None or not Path(metrics_path).is_file():
        return np.zeros(0), np.zeros(0)
    by_step: dict[int, float] = {}
    for line in Path(metrics_path).read_text().splitlines():
        try:
            row = json.loads(line)
            step, loss = int(row["step"]), float(row["loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if math.isfinite(loss):
            by_step[step] = loss
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points; the first points average what exists so far.

    Shape: (T,) -> (T,)
    """
    csum = np.cumsum(np.concatenate([[0.0], values]))  # (T + 1,)
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (csum[ends] - csum[starts]) / (ends - starts)


def _plot_loss(ax, steps: np.ndarray, losses: np.ndarray) -> None:
    ax.set_title("pretraining loss")
    if len(losses) == 0:
        ax.text(0.5, 0.5, "no training metrics", ha="center", va="center", transform=ax.transAxes,
                fontsize=12, color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    window = max(1, min(50, len(losses) // 10))  # ~10% of the run, so the trend shows through noise
    if window > 1:
        ax.plot(steps, losses, lw=0.8, alpha=0.35, color="C0", label="loss")
        ax.plot(steps, moving_average(losses, window), lw=2.2, color="C0", label=f"moving average ({window} points)")
    else:  # under 20 points there is nothing to smooth
        ax.plot(steps, losses, lw=2.2, color="C0", marker="o", ms=3, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _encoder_axis(ax, rows: list[dict]) -> np.ndarray:
    x = np.arange(len(rows))
    ax.set_xticks(x, [textwrap.fill(row["encoder"], 14) for row in rows], fontsize=9)
    center, half = (len(rows) - 1) / 2, max(len(rows), 3) / 2  # one or two encoders keep slim bars
    ax.set_xlim(center - half, center + half)
    ax.grid(axis="y", alpha=0.3)
    return x


def _plot_percent(ax, rows: list[dict], keys: list[str]) -> None:
    """Grouped bars: one group per encoder, one bar per percent metric."""
    ax.set_title("held-out scores")
    if not rows or not keys:
        _no_data(ax, "no results")
        return
    x = _encoder_axis(ax, rows)
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        have = [j for j, row in enumerate(rows) if key in row]  # a row may lack the metric: no bar
        bars = ax.bar(x[have] + (i - (len(keys) - 1) / 2) * width, [100 * rows[j][key] for j in have], width,
                      label=COLUMNS[key][0], color=f"C{i}")
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8 if len(keys) < 4 else 6)
    ax.set_ylim(0, 112)  # room above 100 for the value labels
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("%")
    ax.legend(frameon=False, loc="upper left", ncols=min(len(keys), 4), fontsize=8)


def _plot_number(ax, rows: list[dict], key: str) -> None:
    """One number metric (its own scale): one bar per encoder that has it."""
    header = COLUMNS[key][0]
    ax.set_title(header)
    x = _encoder_axis(ax, rows)
    have = [j for j, row in enumerate(rows) if key in row]
    bars = ax.bar(x[have], [rows[j][key] for j in have], 0.6, color="C7")
    ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
    ax.margins(y=0.15)
    ax.set_ylabel(header)


def plot_report(path: str | Path, rows: list[dict], metrics_path: str | Path | None = None, title: str = "",
                stages: list[dict] | None = None) -> Path:
    """Write the report figure: the loss curve, then the percent metrics per encoder (grouped
    bars), then one panel per number metric (perplexity and loss have scales of their own), then
    the per-stage probes when there are (``stages``, see :func:`stage_table`)."""
    rows = _check_rows(rows)
    keys = present_columns(rows)
    percent = [k for k in keys if COLUMNS[k][1] == PERCENT]
    numbers = [k for k in keys if COLUMNS[k][1] == NUMBER]
    ratios = [1.0] + ([1.25 + 0.1 * max(0, len(percent) - 2)] if percent or not numbers else []) + [0.7] * len(numbers)
    ratios += [1.0] if stages else []
    fig = Figure(figsize=(4.8 * sum(ratios) + 1, 4.5), dpi=110, layout="constrained")
    axes = list(fig.subplots(1, len(ratios), width_ratios=ratios, squeeze=False)[0])
    _plot_loss(axes.pop(0), *read_loss_curve(metrics_path))
    if percent or not numbers:
        _plot_percent(axes.pop(0), rows, percent)
    if stages:
        _plot_stages(axes.pop(), stages)
    for ax, key in zip(axes, numbers, strict=True):
        _plot_number(ax, rows, key)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, format="png")
    return Path(path)


def write_results(run_dir: str | Path, rows: list[dict], metrics_path: str | Path | None = None,
                  title: str = "", notes: str = "", stages: list[dict] | None = None) -> dict[str, Path]:
    """Write results.json, results.md and report.png into ``run_dir``; return their paths.

    ``metrics_path`` is the run's metrics.jsonl (rows with ``step`` and ``loss``); when it is
    missing or empty the loss panel says so instead of failing, so a report can be made for
    an evaluation without a training run. ``notes`` is markdown shown under the table (e.g.
    GPT's samples) and stored in results.json. ``stages`` are per-stage probe rows (see
    :func:`stage_table`): a second table, ``probe_stages`` in results.json, a panel of the figure.
    Keys of the returned dict: ``"json"``, ``"markdown"``, ``"figure"``.
    """
    rows = _check_rows(rows)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / "results.json", "markdown": run_dir / "results.md", "figure": run_dir / "report.png"}

    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    payload = {"title": title, "created_at": created_at, "rows": rows, "notes": notes}
    if stages:
        payload["probe_stages"] = stages
    paths["json"].write_text(json.dumps(payload, indent=2, default=_to_json) + "\n")
    heading = f"# {title}\n\n" if title else ""
    tail = f"\n{notes.rstrip()}\n" if notes.strip() else ""
    per_stage = f"\n{stage_table(stages)}\n" if stages else ""
    paths["markdown"].write_text(heading + markdown_table(rows) + "\n" + per_stage + tail)
    plot_report(paths["figure"], rows, metrics_path, title, stages)
    return paths

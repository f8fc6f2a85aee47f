"""What every ``sslp data inspect SOURCE --kind K`` shares: a throw-away skip ledger, one
streaming pass that counts the records and keeps a few, the report dict, and figure helpers.

Each kind's ``inspect_<kind>`` (:mod:`~ssl_platform.data.images`,
:mod:`~ssl_platform.data.captions`, :mod:`~ssl_platform.data.text`,
:mod:`~ssl_platform.data.audio`) is these steps plus its own transform and picture:

    with InspectLedger(strict) as ledger:
        records, batch = scan(read_x(source, reporter=ledger.reporter))
    if not records:
        return report(0, ledger.summary)  # the caller refuses the corpus
    ...
    return report(records, ledger.summary, example, save(figure, out_dir, "x.png"))

Ray must be initialised by the caller.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from ssl_platform.data.skips import SkipReporter, get_or_create_ledger, ledger_name, skip_summary

INSPECT_EXAMPLES = 8  # records kept for the example batch and figure
SCAN_BATCH_SIZE = 64


class InspectLedger:
    """A throw-away skip ledger for one ``sslp data inspect`` call; ``summary`` is set on exit.

        with InspectLedger(strict) as ledger:
            records, batch = scan(read_image_corpus(..., reporter=ledger.reporter).dataset)
        ledger.summary  # {"total": ..., "by_reason": ..., "examples": ...}

    The summary is complete once the Dataset has been consumed: ``SkipReporter.flush`` waits
    for the ledger.
    """

    def __init__(self, strict: bool):
        self.name = ledger_name(f"inspect-{uuid.uuid4().hex[:8]}")
        self.reporter = SkipReporter(self.name, strict=strict)
        self.summary: dict = {}

    def __enter__(self) -> InspectLedger:
        self.actor = get_or_create_ledger(self.name)
        return self

    def __exit__(self, *exc) -> None:
        import ray

        self.summary = skip_summary(self.actor)
        ray.kill(self.actor)  # detached: it would outlive the command otherwise


def scan(ds, keep: int = INSPECT_EXAMPLES, *, varied_by: str | None = None,
         batch_size: int = SCAN_BATCH_SIZE) -> tuple[int, dict[str, np.ndarray]]:
    """Stream a whole Dataset once: (number of rows, up to ``keep`` rows as a numpy batch).

    The kept rows are the first ones; with ``varied_by`` (a column such as "label"), rows with
    a value not kept yet come first, for a varied picture, then the earliest of the others.
    Columns keep their dtype; a column whose kept values differ in shape (clips of different
    lengths from different batches) becomes a 1-D object array of them. ``{}`` when empty.
    """
    count, chosen, spare, seen = 0, [], [], set()
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n = len(next(iter(batch.values()))) if batch else 0
        count += n
        for i in range(n):
            if len(chosen) == keep and (varied_by is None or len(spare) == keep):
                break
            row = {k: v[i:i + 1].copy() for k, v in batch.items()}  # (1, ...): a copy holds no whole batch
            value = None if varied_by is None else row[varied_by][0]
            if len(chosen) < keep and (varied_by is None or value not in seen):
                chosen.append(row)
                seen.add(value)
            elif len(spare) < keep:
                spare.append(row)
    rows = (chosen + spare)[:keep]
    return count, ({k: _join([r[k] for r in rows]) for k in rows[0]} if rows else {})


def _join(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of shape (1, ...) -> one column (N, ...), or a ragged (N,) object array if their shapes differ."""
    if len({r.shape[1:] for r in rows}) == 1:
        return np.concatenate(rows)
    column = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):  # element-wise: np.array(list) would try to broadcast them
        column[i] = r[0]
    return column


def report(records: int, skipped: dict, example: dict | None = None, figure: str | Path | None = None) -> dict:
    """The dict every ``inspect_<kind>`` returns; ``records == 0`` (no example, no figure) means no valid record."""
    return {"records": records, "skipped": skipped, "example": example or {},
            "figure": None if figure is None else str(figure)}


def show(ax, image: np.ndarray, title: str = "", fontsize: int = 7) -> None:
    """Draw one image, uint8 (C, H, W) or normalised float (C, H, W), on a matplotlib axis."""
    x = np.asarray(image)
    if x.dtype != np.uint8:
        from ssl_platform.data.transforms import MEAN, STD

        x = np.clip((x * STD + MEAN) * 255, 0, 255).astype(np.uint8)
    x = x.transpose(1, 2, 0)
    ax.imshow(x[..., 0] if x.shape[-1] == 1 else x, cmap="gray", vmin=0, vmax=255)
    ax.set_title(title, fontsize=fontsize)
    ax.axis("off")


def save(fig, out_dir: Path, name: str, dpi: int = 100, **savefig) -> str:
    """Write a matplotlib Figure as OUT_DIR/NAME (a PNG; ``savefig`` are extra options) and return the path."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, **savefig)
    return str(path)

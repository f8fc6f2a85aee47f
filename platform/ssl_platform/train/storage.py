"""Where a run lives: its run directory, the files in it, and the copies a URI run keeps in storage.

Where a run lives (:func:`run_paths`):

- ``runs_dir`` a local path: checkpoints, Ray's run snapshot, config.yaml, metrics.jsonl,
  summary.json and the evaluation report all live in ``RUNS_DIR/NAME``. A relative ``runs_dir``
  is resolved on the driver (Ray Train workers run in a directory of their own). With workers on
  several nodes it must be a shared filesystem; Ray checks that and says so.
- ``runs_dir`` a URI (``s3://``, ``gs://``, ``file://``, whatever ``pyarrow.fs`` opens): Ray
  writes checkpoints and its snapshot to ``URI/NAME``. The driver writes its files in a local
  staging directory and copies them to ``URI/NAME``; rank 0 writes metrics.jsonl on its own node
  and copies it to ``URI/NAME`` when its attempt ends (:func:`ssl_platform.train.worker.train_worker`).

A run whose summary.json says it reached ``train.max_steps`` is not trained again (:func:`completed_run`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs
import ray.train

from ssl_platform.config import ExperimentConfig
from ssl_platform.data.sources import filesystem
from ssl_platform.train.session import StorageError

CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, ERROR_FILE = "config.yaml", "metrics.jsonl", "summary.json", "error.log"


@dataclass(frozen=True)
class RunPaths:
    """``storage``: Ray's storage path, an absolute local path or a URI; ``local``: the driver's
    run directory, ``storage/name`` itself for local storage, else a staging directory."""

    storage: str
    name: str
    local: Path
    remote: bool  # storage is a URI: the driver's files are copied there

    @property
    def uri(self) -> str:
        return f"{self.storage}/{self.name}"


def is_uri(path: str) -> bool:
    """``s3://...``, ``gs://...``, ``file://...``: as ``data.path`` (see data.sources.filesystem)."""
    return "://" in path


def run_paths(cfg: ExperimentConfig) -> RunPaths:
    if is_uri(cfg.runs_dir):
        storage = cfg.runs_dir.rstrip("/")
        digest = hashlib.sha1(f"{storage}/{cfg.name}".encode()).hexdigest()[:8]
        return RunPaths(storage, cfg.name, Path(tempfile.gettempdir()) / "sslp-runs" / f"{cfg.name}-{digest}", True)
    storage = str(Path(cfg.runs_dir).expanduser().resolve())  # on the driver, before workers chdir elsewhere
    return RunPaths(storage, cfg.name, Path(storage) / cfg.name, False)


def run_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem and path of a run's storage; a :class:`StorageError` if it cannot be opened."""
    try:
        fs, path, _ = filesystem(uri, what="run storage")
    except ValueError as e:
        raise StorageError(f"{e}; check runs_dir (a local path or a URI such as s3://bucket/runs)") from None
    return fs, path


def read_run_file(paths: RunPaths, name: str) -> str | None:
    """A file of the run directory (in storage for a URI run) as text, None if there is none."""
    fs, root = run_filesystem(paths.uri if paths.remote else str(paths.local))
    if fs.get_file_info(f"{root}/{name}").type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(f"{root}/{name}") as f:
        return f.read().decode()


def copy_to_storage(paths: RunPaths, *names: str) -> None:
    """Copy files of the driver's run directory to a URI run's storage (no-op for local storage)."""
    if not paths.remote:
        return
    fs, root = run_filesystem(paths.uri)
    fs.create_dir(root, recursive=True)
    for name in names:
        if (paths.local / name).is_file():
            pyarrow.fs.copy_files(str(paths.local / name), f"{root}/{name}",
                                  source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def remove_run_file(paths: RunPaths, name: str) -> None:
    """Delete a file of the run directory, and a URI run's copy of it in storage."""
    (paths.local / name).unlink(missing_ok=True)
    if paths.remote:
        fs, root = run_filesystem(paths.uri)
        if fs.get_file_info(f"{root}/{name}").type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(f"{root}/{name}")


def completed_run(paths: RunPaths, max_steps: int) -> dict | None:
    """The summary of this run if it already reached ``max_steps`` (its checkpoint still there), else None."""
    text = read_run_file(paths, SUMMARY_FILE)
    summary = json.loads(text) if text else None
    if not summary or summary.get("steps", 0) < max_steps:
        return None
    if not paths.remote and not Path(summary["checkpoint"]).is_dir():
        return None
    return summary


def local_checkpoint(paths: RunPaths, checkpoint: str) -> Path:
    """A checkpoint as a local directory (a URI run's is downloaded into the staging directory)."""
    if not paths.remote:
        return Path(checkpoint)
    target = paths.local / "checkpoints" / Path(urlparse(checkpoint).path).name
    if not target.is_dir():
        ray.train.Checkpoint(checkpoint).to_directory(str(target))
    return target

"""Checkpoints of local mode (``scaling.num_workers=0``).

In local mode Ray Train runs the loop in the driver process as the only rank: no controller,
no worker processes, no process group (Ray Train's own local mode, ``ScalingConfig(num_workers=0)``).
Ray Train then keeps no checkpoint: its ``report`` only remembers the last one, in memory. So the
loop stores them itself, where and as Ray Train would: ``checkpoint_<date>_<time>`` directories in
the run's storage (a local directory or a URI), the newest ``train.keep_checkpoints`` of them. Each
carries a marker file, so that the same command resumes from it in local mode and with workers
alike (``resume_point``).
"""

from __future__ import annotations

from datetime import datetime

import pyarrow.fs

from ssl_platform.data.sources import filesystem
from ssl_platform.train.checkpoint import STATE_FILE

PREFIX = "checkpoint_"
MARKER = "local_mode"  # a file in each checkpoint local mode stored: Ray Train's snapshot does not know them


def dir_name(now: datetime | None = None) -> str:
    """Ray Train's name for a checkpoint directory: its creation time, so the newest sorts last."""
    return f"{PREFIX}{(now or datetime.now()):%Y-%m-%d_%H-%M-%S.%f}"


def store(directory: str, storage: str, keep: int) -> str:
    """Copy the checkpoint ``directory`` into ``storage`` (the run's directory or URI) under a new
    ``checkpoint_*`` name, then delete all but the newest ``keep``; returns its path or URI. On a
    local disk the copy is renamed into place when complete; an object store cannot rename a
    directory, so there the marker, written last, is what says it is complete."""
    fs, root, scheme = filesystem(storage, what="run storage")
    name = dir_name()
    target = f"{root}/{name}"
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    written = f"{root}/.{name}.partial" if local else target
    fs.create_dir(written, recursive=True)
    pyarrow.fs.copy_files(directory, written, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)
    with fs.open_output_stream(f"{written}/{MARKER}") as f:
        f.write(b"stored by the loop in local mode (scaling.num_workers=0)\n")
    if local:
        fs.move(written, target)
    for old in _stored(fs, root, marked_only=True)[:-keep]:
        fs.delete_dir(old)
    return f"{scheme}{target}"


def resume_point(storage: str, *, local: bool) -> str | None:
    """The checkpoint the loop resumes from besides Ray Train's own (a path or URI, as
    ``ray.train.Checkpoint`` takes), or None. In local mode: the newest complete checkpoint in
    ``storage``, whichever mode stored it. With workers, Ray Train hands back the newest one it
    registered, so only a newer one that local mode stored (Ray Train does not know it)."""
    fs, root, scheme = filesystem(storage, what="run storage")
    found = _stored(fs, root, marked_only=False)
    if not found or not (local or _is_file(fs, f"{found[-1]}/{MARKER}")):
        return None
    return f"{scheme}{found[-1]}"


def _stored(fs: pyarrow.fs.FileSystem, root: str, *, marked_only: bool) -> list[str]:
    """Complete checkpoint directories under ``root``, oldest first."""
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    dirs = sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(PREFIX))
    need = (STATE_FILE, MARKER) if marked_only else (STATE_FILE,)
    return [d for d in dirs if all(_is_file(fs, f"{d}/{n}") for n in need)]


def _is_file(fs: pyarrow.fs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pyarrow.fs.FileType.File

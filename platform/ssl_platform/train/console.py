"""What a run shows on the console, and where Ray's own output goes (``RUN_DIR/ray.log``).

The platform's lines (header, progress, online evaluation, advice, resume) are printed by rank 0
of the train workers, the Ray Train controller (a restart) or the driver. A worker says them with
:func:`say` and :func:`progress`: under a quiet console (``SSLP_CONSOLE=1`` in the workers'
environment, set by ``init_ray``) the line carries a marker, and Ray streams it to the driver
with everything else the workers print. On the driver, :class:`Console` replaces Ray's printer
of worker output: a marked line is shown (without its marker), every other line, and the
driver's own ``ray.*`` log records, go to the log file (also to the console with ``--verbose``).
One path for every line, wherever rank 0 runs (another node, a Ray job).

On a terminal the progress is one line updated in place (tqdm); in a pipe, CI or a Ray job log
it is a plain line per ``train.log_every`` steps. In the driver's own process (local mode) the
worker-side calls reach the console directly. A sweep shows a live table of its trials instead
(:meth:`Console.table`, tqdm lines at fixed positions); its trials' own lines go to the log.

Ray internals this relies on (to re-check on a Ray upgrade): ``ray._private.worker``'s
``global_worker_stdstream_dispatcher`` (handlers named ``ray_print_logs``), ``print_to_stdstream``
and ``filter_autoscaler_events``; Ray Data configuring its ``ray.data`` logger's console handler
when ``ray.data`` is imported.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TextIO

CONSOLE_ENV = "SSLP_CONSOLE"  # "1" in the workers' environment when the driver shows only marked lines
MARK = "[sslp] "  # a line the console shows
PROGRESS_MARK = "[sslp:progress] "  # {"step", "max_steps", "text"}: the progress display
EVENT_MARK = "[sslp:event] "  # {"kind": "start" | "failure", ...}: what the run summary reports
ONCE_MARK = "[sslp:once] "  # {"key", "text"}: a line the console shows once (advice), whichever process says it
LOG_FILE = "ray.log"
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")

_installed: list[Console] = []  # the driver's console, when one is installed in this process


def say(text: str, once: str | None = None) -> None:
    """Show ``text`` on the console of the run (from a worker, the controller or the driver).
    With ``once``, only the first line of that key is shown in the command: advice that a restarted
    worker group (a new process, with nothing of the old one's memory) would give again."""
    if (shown := active()) is not None:
        shown.show(text, once=once)
    elif _filtered() and once is not None:
        print(ONCE_MARK + json.dumps({"key": once, "text": text}), flush=True)
    else:
        print(MARK + text if _filtered() else text, flush=True)


def progress(step: int, max_steps: int, text: str) -> None:
    """The progress display's new state: ``text`` is the whole line (step, loss, throughput, ETA)."""
    if (shown := active()) is not None:
        shown.progress(step, max_steps, text)
    elif _filtered():
        print(PROGRESS_MARK + json.dumps({"step": step, "max_steps": max_steps, "text": text}), flush=True)
    else:
        print(text, flush=True)


def event(kind: str, **fields) -> None:
    """A fact about the run for its summary (an attempt started, a worker failed); not shown."""
    if (shown := active()) is not None:
        shown.event({"kind": kind, **fields})
    elif _filtered():
        print(EVENT_MARK + json.dumps({"kind": kind, **fields}), flush=True)


def live() -> bool:
    """Whether this process's console updates a display in place (a terminal, without --verbose):
    where Ray Data's own progress bars help (evaluation, embed) rather than drown a plain log."""
    return (shown := active()) is not None and shown.live


def _filtered() -> bool:
    """Whether the driver shows only marked lines (else, in a Tune trial, say prints plain text)."""
    return os.environ.get(CONSOLE_ENV) == "1"


class Console:
    """The driver's console for one command: shows the platform's lines, keeps the rest in a
    log file (buffered until :meth:`log_to` names it), records the run's events.

    Args:
        verbose: also show Ray's lines on the console (as Ray would, prefixed by the process).
        stream: where the console writes (stdout).
        show_workers: show the lines the workers mark; a sweep keeps its trials' lines (several
            runs at once, each with its own header and progress) in the log and shows its table.
    """

    def __init__(self, verbose: bool = False, stream: TextIO | None = None, show_workers: bool = True):
        self.verbose = verbose
        self.show_workers = show_workers
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() and not verbose  # a line updated in place
        self.events: list[dict] = []
        self._last_step: int | None = None  # the newest step in the progress display
        self.log_path: Path | None = None
        self._pending: list[str] = []  # Ray's lines before the log file is known
        self._file: TextIO | None = None
        self._bar = None
        self._rows: list = []  # the live table: one tqdm line per row, at fixed positions
        self._said: set[str] = set()  # keys of the once-only lines already shown
        self._lock = threading.Lock()  # Ray's log thread and the main thread both write
        self._handler = _RecordHandler(self)
        self._ray_handlers: dict[str, list[logging.Handler]] = {}
        self._ray_printer = None  # Ray's printer of worker output, while this console replaces it
        self._native_stderr: int | None = None  # a copy of file descriptor 2 while it points to the log
        self._python_stderr: TextIO | None = None

    # -- the platform's lines ------------------------------------------------------------
    def show(self, text: str, once: str | None = None) -> None:
        with self._lock:
            if once is not None:
                if once in self._said:
                    return
                self._said.add(once)
            if self._bar is not None or self._rows:  # above the live line or table, which stays last
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    def progress(self, step: int, max_steps: int, text: str) -> None:
        with self._lock:
            self._last_step = step
            if not self.live:
                print(text, file=self.stream, flush=True)
                return
            if self._bar is None or self._bar.total != max_steps:
                from tqdm import tqdm

                self._close_bar()
                self._bar = tqdm(total=max_steps, file=self.stream, bar_format="{desc}",
                                 ncols=_size(self.stream)[0], nrows=_size(self.stream)[1])
            self._bar.n = step
            self._bar.set_description_str(text)

    def table(self, lines: list[str]) -> None:
        """The live table's new state (a sweep's trials, a header first): on a terminal the lines
        replace the table in place; elsewhere nothing (the caller prints a plain line per change)."""
        with self._lock:
            if not self.live:
                return
            from tqdm import tqdm

            columns, rows = _size(self.stream)
            while len(self._rows) < len(lines):
                self._rows.append(tqdm(total=0, file=self.stream, bar_format="{desc}", position=len(self._rows),
                                       leave=False, ncols=columns, nrows=rows))
            for bar, line in zip(self._rows, lines, strict=False):
                bar.set_description_str(line)

    def event(self, fields: dict) -> None:
        with self._lock:
            if fields["kind"] == "start":  # an attempt: how far the one before it got
                fields = {**fields, "reached": self._last_step}
                self._last_step = fields["step"]
            self.events.append(fields)

    def end_progress(self) -> None:
        """Leave the live line where it is, as a plain line (before the summary); clear the live
        table (the command prints its final table)."""
        with self._lock:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for bar in reversed(self._rows):  # the bottom line first: each clears its own line
            bar.close()
        self._rows.clear()

    # -- Ray's lines -------------------------------------------------------------------------
    def ray_line(self, text: str) -> None:
        self.keep(text)
        if self.verbose:
            self.show(text)

    def keep(self, text: str) -> None:
        """Write ``text`` to the log file (kept in memory until there is one)."""
        with self._lock:
            if self._file is not None:
                self._file.write(text + "\n")
                self._file.flush()
            else:
                self._pending.append(text)

    def as_ray_output(self) -> TextIO:
        """A text stream whose lines are Ray's lines (:meth:`ray_line`): for what a Ray library
        prints with ``print`` in the driver (Tune's experiment header, whatever its verbosity)."""
        return _LineWriter(self.ray_line)

    def log_to(self, path: Path) -> None:
        """Ray's lines from now on (and those kept until now) go to ``path`` (appended: a resumed run)."""
        with self._lock:
            if self._file is not None and self.log_path == path:
                return
            if self._file is not None:
                self._file.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a")
            self.log_path = path
            self._file.writelines(line + "\n" for line in self._pending)
            self._file.flush()
            self._pending.clear()

    def worker_output(self, data: dict) -> None:
        """Ray's handler of the lines its processes print (``log_to_driver``): ``data`` holds
        ``lines``, ``pid``, ``ip``, ``is_err`` and the actor or task name."""
        who = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({who} pid={data.get('pid')}, ip={data.get('ip')})"
        lines = data.get("lines", [])
        if data.get("pid") == "autoscaler":  # its status every few seconds: only the events, as Ray prints them
            from ray._private import worker

            lines = list(worker.filter_autoscaler_events(lines))
        for line in lines:
            if line.startswith(MARK):
                self._worker_says(prefix, line[len(MARK):])
            elif line.startswith(ONCE_MARK):
                said = json.loads(line[len(ONCE_MARK):])
                self._worker_says(prefix, said["text"], said["key"])
            elif line.startswith(PROGRESS_MARK):
                p = json.loads(line[len(PROGRESS_MARK):])
                if self.show_workers:
                    self.progress(p["step"], p["max_steps"], p["text"])
                else:
                    self.keep(f"{prefix} {p['text']}")
            elif line.startswith(EVENT_MARK):
                self.event(json.loads(line[len(EVENT_MARK):]))
            else:
                self.ray_line(f"{prefix} {line}")

    def _worker_says(self, prefix: str, text: str, once: str | None = None) -> None:
        if self.show_workers:
            self.show(text, once=once)
        else:
            self.ray_line(f"{prefix} {text}")

    # -- installing and removing -------------------------------------------------------------
    def install(self) -> None:
        """Take over the driver's ``ray.*`` loggers and, with a log file, the native stderr; before
        ``ray.init``, whose own lines they print."""
        import ray.data  # noqa: F401  (it configures its logger's console handler on import: taken over below)

        # Found before the redirection below, which gives Python a new sys.stderr object.
        found = {name: [h for h in logging.getLogger(name).handlers if _is_console_handler(h)] for name in RAY_LOGGERS}
        self._redirect_native_stderr()
        for name in RAY_LOGGERS:
            logger = logging.getLogger(name)
            streams = found[name]
            self._ray_handlers[name] = streams
            if not self.verbose:
                for h in streams:
                    logger.removeHandler(h)
            logger.addHandler(self._handler)
        _installed.append(self)

    def take_worker_output(self) -> None:
        """Take over Ray's printing of what its processes print; after ``ray.init(log_to_driver=True)``."""
        from ray._private import worker

        dispatcher = worker.global_worker_stdstream_dispatcher
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("sslp_console", self.worker_output)
        # The raylet's messages to the driver (a worker died, an OOM kill) take another path to
        # the same printer, which Ray's thread looks up by name.
        self._ray_printer = worker.print_to_stdstream
        worker.print_to_stdstream = lambda data, ignore_prefix=False: self.worker_output(data)

    def uninstall(self) -> None:
        from ray._private import worker

        worker.global_worker_stdstream_dispatcher.remove_handler("sslp_console")
        if self._ray_printer is not None:
            worker.print_to_stdstream, self._ray_printer = self._ray_printer, None
        for name, streams in self._ray_handlers.items():
            logger = logging.getLogger(name)
            logger.removeHandler(self._handler)
            for h in streams:
                if h not in logger.handlers:
                    logger.addHandler(h)
        self._ray_handlers.clear()
        self._restore_native_stderr()
        with self._lock:
            self._close_bar()
            if self._file is not None:
                self._file.close()
                self._file = None
        if self in _installed:
            _installed.remove(self)


    def _redirect_native_stderr(self) -> None:
        """Ray's C++ core worker in this process logs to file descriptor 2 (``core_worker.cc: Actor
        ... has constructor arguments in the object store``, on healthy runs): point it at the log
        file. Python's own ``sys.stderr`` (tracebacks, warnings, the platform's errors) keeps the
        console; when it is not descriptor 2 (a test's capture) it is left as it is."""
        if self._file is None or self.verbose:
            return
        try:
            python_on_fd2 = sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError):
            python_on_fd2 = False
        sys.stderr.flush()
        self._native_stderr = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        if python_on_fd2:
            self._python_stderr = sys.stderr
            sys.stderr = open(os.dup(self._native_stderr), "w", buffering=1)  # noqa: SIM115 (closed on restore)

    def _restore_native_stderr(self) -> None:
        if self._native_stderr is None:
            return
        if self._python_stderr is not None:
            sys.stderr.close()
            sys.stderr, self._python_stderr = self._python_stderr, None
        os.dup2(self._native_stderr, 2)
        os.close(self._native_stderr)
        self._native_stderr = None


def active() -> Console | None:
    """The driver's console in this process, if a command installed one."""
    return _installed[-1] if _installed else None


def _size(stream: TextIO) -> tuple[int, int]:
    """The terminal's columns and rows (tqdm cuts the line at the width and hides it at 0 rows);
    120 x 24 where it reports none (a pseudo-terminal of size 0, as under `script`)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return 120, 24
    return size.columns or 120, size.lines or 24


def _is_console_handler(h: logging.Handler) -> bool:
    return (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and getattr(h, "stream", None) in (sys.stdout, sys.stderr))


class _LineWriter(io.TextIOBase):
    """A writable text stream that hands each complete line to ``line``."""

    def __init__(self, line):
        self._line, self._partial = line, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""


class _RecordHandler(logging.Handler):
    """The driver's ``ray.*`` log records, into the console's log file."""

    def __init__(self, console: Console):
        super().__init__(level=logging.INFO)
        self.console = console
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.keep(self.format(record))
        except Exception:  # a malformed record must not break the run
            self.handleError(record)

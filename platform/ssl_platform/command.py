"""What the ``sslp`` commands share: exit statuses, the Ray options, running work on Ray, and
finding a run's checkpoint.

Below every command (``cli``, ``tune.sweep``, ``pretrained``, ``embed``, ``finetune``, ...), so
that none of them imports ``cli``. Imports nothing heavy at module level: every ``sslp`` call
builds the parser, and ``sslp presets`` answers without Ray or torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # SIGTERM: the run checkpointed its current step and stopped


def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    p.add_argument("--no-dashboard", action="store_true", help="start a local Ray cluster without the dashboard")


def add_verbose_arg(p: argparse.ArgumentParser, where: str = "RUN_DIR/ray.log") -> None:
    p.add_argument("--verbose", action="store_true", help=f"also show what Ray prints (always kept in {where})")


def quiet_console(args: argparse.Namespace, log: Path, show_workers: bool = True):
    """The command's console (``train.console.Console``): the platform's lines on the console,
    Ray's in ``log`` (on the console too with ``--verbose``). Imports no Ray."""
    from ssl_platform.train.console import Console

    console = Console(verbose=getattr(args, "verbose", False), show_workers=show_workers)
    console.log_to(log)
    return console


def failure_line(error: BaseException, console) -> str:
    """An unexpected error (a Ray Data task that failed, a Ray error): its full traceback into the
    console's log, one line for the console that names the error and the file to read."""
    import traceback

    console.keep("".join(traceback.format_exception(error)).rstrip())
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"sslp: failed: {type(error).__name__}: {lines[-1] if lines else ''}; full error in {console.log_path}"


class Interrupted(Exception):
    """Ctrl-C at a point with its own advice (the message)."""


def on_ray(args: argparse.Namespace, work: Callable[[], None], interrupted: str, console=None) -> int:
    """Start or join Ray, do ``work()``, leave Ray. Returns the exit status, after printing one
    line for what a user can cause or do (printed once Ray is down, so that no late worker log
    line follows it). ``console`` (``train.console.Console``) shows the platform's lines and keeps
    Ray's in its log file while Ray is up."""
    import ray

    from ssl_platform.train.preemption import Preempted
    from ssl_platform.train.session import (
        DataError,
        ResourceError,
        StorageError,
        TrainingFailed,
        init_ray,
        shutdown_ray,
    )

    failures = {ResourceError: ("resources", EXIT_USAGE), DataError: ("data", EXIT_USAGE),
                StorageError: ("storage", EXIT_USAGE), TrainingFailed: ("training failed", EXIT_FAILED),
                Preempted: ("preempted", EXIT_TERMINATED)}
    joined = ray.is_initialized()  # a caller's connection (an embedding program, a test) stays as it is
    try:
        url = init_ray(args.address, dashboard=not args.no_dashboard, console=console)
        if url:
            print(f"Ray dashboard: {url}", flush=True)
        work()
        return EXIT_OK
    except KeyboardInterrupt:
        message = (f"\nsslp: {interrupted}", EXIT_INTERRUPTED)
    except Interrupted as e:
        message = (f"\nsslp: {e}", EXIT_INTERRUPTED)
    except tuple(failures) as e:
        what, status = failures[type(e)]
        message = (f"sslp: {what}: {e}", status)
    except Exception as e:
        if console is None:
            raise
        message = (failure_line(e, console), EXIT_FAILED)  # never only in the log file
    finally:
        # A local cluster started here goes down with its workers; a joined one is only left.
        if ray.is_initialized() and not joined:
            shutdown_ray()
        if console is not None:
            console.uninstall()
    print(message[0], file=sys.stderr)
    return message[1]


def resolve_checkpoint(target: str | Path) -> tuple[Path, dict]:
    """(checkpoint directory, its run's raw config) for a run directory or a checkpoint directory.

    A run directory's checkpoint is the one its summary.json names (the finished run's), else
    its newest ``checkpoint_*`` (a run that was stopped early); the config is the one saved in
    the checkpoint itself, so a checkpoint copied elsewhere evaluates on its own.
    """
    import json

    from ssl_platform.train.checkpoint import STATE_FILE, load_payload

    target = Path(target)
    if not target.is_dir():
        raise FileNotFoundError(f"{target} does not exist; give a run directory (RUNS_DIR/NAME) or a checkpoint in it")
    if (target / STATE_FILE).is_file():
        checkpoint = target
    else:
        summary = target / "summary.json"
        named = Path(json.loads(summary.read_text())["checkpoint"]) if summary.is_file() else None
        candidates = sorted(p for p in target.glob("checkpoint_*") if (p / STATE_FILE).is_file())
        if named is not None and named.is_dir():
            checkpoint = named
        elif candidates:
            checkpoint = candidates[-1]  # Ray names them checkpoint_<date>_<time>: the newest sorts last
        else:
            raise FileNotFoundError(f"{target} holds no checkpoint (no {STATE_FILE} in it or in a checkpoint_* "
                                    f"directory); train first with `sslp run`")
    return checkpoint, load_payload(checkpoint)["config"]

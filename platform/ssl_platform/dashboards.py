"""``sslp dashboards``: put the platform's Grafana dashboard beside Ray's generated ones.

Ray's dashboard writes a Grafana set-up for each session (``SESSION/metrics/grafana``): a
``grafana.ini`` whose provisioning folder holds ``dashboards/default.yml``, which points Grafana
at a folder of dashboard JSON files (``SESSION/metrics/grafana/dashboards`` unless
``RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR`` moves it). ``sslp dashboards install`` copies
``dashboards/ssl-platform.json`` into that folder, found from the provisioning file, so a
Grafana started with Ray's ``grafana.ini`` shows it in the Ray folder. Ray rewrites the session's
Grafana folder when the head node starts: install after ``ray start --head``.

    sslp dashboards install [DIR]   copy the dashboard into DIR (default: the running session's folder)
    sslp dashboards path            print where the shipped dashboard JSON is

The JSON ships in the repository (editable installs, clusters that ``pip install -e`` the
project) and, for wheel installs, under ``share/ssl-platform/dashboards`` of the environment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from ssl_platform.command import EXIT_USAGE

DASHBOARD_FILES = ("ssl-platform.json",)
# Ray's temp root (`ray start --temp-dir` or RAY_TMPDIR move it) and the provisioning file Ray
# generates in each session (ray/dashboard/modules/metrics/metrics_head.py).
RAY_TEMP_DIR = "/tmp/ray"
PROVISIONING_FILE = Path("session_latest/metrics/grafana/provisioning/dashboards/default.yml")


def add_parser(sub) -> None:
    dashboards = sub.add_parser(
        "dashboards", help="install the platform's Grafana dashboard beside Ray's",
        description="The platform's Grafana dashboard (loss, throughput, data wait, learning rate, online "
                    "evaluation, skipped records per run; Ray Data pipeline panels). `install` copies it into "
                    "the folder Ray's generated Grafana provisioning reads; `path` prints where it is shipped.")
    commands = dashboards.add_subparsers(dest="dashboards_command", required=True)
    install = commands.add_parser(
        "install", help="copy the dashboard JSON into Grafana's dashboards folder",
        description="Copy the dashboard JSON into DIR, created if missing. Without DIR: the folder that the "
                    "running Ray session's Grafana provisioning (RAY_TEMP_DIR/session_latest/metrics/grafana/"
                    "provisioning/dashboards/default.yml) points at; run it on the head node after `ray start`.")
    install.add_argument("dir", nargs="?", default=None, metavar="DIR",
                         help="destination folder (default: the running Ray session's Grafana dashboards folder)")
    install.add_argument("--ray-temp-dir", default=None,
                         help=f"Ray's temp root (default: $RAY_TMPDIR, else {RAY_TEMP_DIR})")
    commands.add_parser("path", help="print the folder that holds the shipped dashboard JSON",
                        description="Print the folder of the shipped dashboard JSON (to mount it into a Grafana "
                                    "of your own, e.g. a ConfigMap for KubeRay's Grafana).")


def main(args: argparse.Namespace) -> int:
    try:
        source = shipped_dir()
        if args.dashboards_command == "path":
            print(source)
            return 0
        dest = Path(args.dir) if args.dir else ray_dashboards_dir(args.ray_temp_dir)
        for path in install(dest, source):
            print(f"wrote {path}")
    except DashboardError as e:
        print(f"sslp: dashboards: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


class DashboardError(Exception):
    """A missing dashboard file, no Ray session or an unwritable folder; the message says what to do."""


def shipped_dir() -> Path:
    """The folder with the dashboard JSON: the source checkout's ``dashboards/`` (editable
    installs), else the installed data files (``share/ssl-platform/dashboards``)."""
    candidates = [Path(__file__).resolve().parents[2] / "dashboards",  # platform/ssl_platform/ -> repo root
                  Path(sysconfig.get_path("data")) / "share" / "ssl-platform" / "dashboards",
                  Path(sys.prefix) / "share" / "ssl-platform" / "dashboards"]
    for folder in candidates:
        if all((folder / name).is_file() for name in DASHBOARD_FILES):
            return folder
    raise DashboardError(f"the dashboard JSON is not installed (looked in {', '.join(map(str, candidates))}); "
                         f"reinstall the project (pip install -e . from the repository)")


def ray_dashboards_dir(temp_dir: str | None = None) -> Path:
    """The dashboards folder of the running Ray session, read from Ray's provisioning file."""
    import yaml

    root = Path(temp_dir or os.environ.get("RAY_TMPDIR") or RAY_TEMP_DIR)
    provisioning = root / PROVISIONING_FILE
    if not provisioning.is_file():
        raise DashboardError(f"no Ray session with Grafana provisioning here ({provisioning} is missing); start "
                             f"Ray on this node first (`ray start --head`), pass --ray-temp-dir, or give DIR")
    providers = (yaml.safe_load(provisioning.read_text()) or {}).get("providers") or []
    paths = [p.get("options", {}).get("path") for p in providers if isinstance(p, dict)]
    if not paths or not paths[0]:
        raise DashboardError(f"{provisioning} names no dashboards folder (providers[0].options.path); give DIR")
    return Path(paths[0])


def install(dest: str | Path, source: Path | None = None) -> list[Path]:
    """Copy the dashboard JSON files into ``dest`` (created if missing); returns the paths written."""
    source = source or shipped_dir()
    dest = Path(dest)
    written = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name in DASHBOARD_FILES:
            written.append(Path(shutil.copyfile(source / name, dest / name)))
    except OSError as e:
        raise DashboardError(f"cannot write to {dest} ({e.strerror or e}); give a folder you can write to, "
                             f"or run as the user that started Ray") from None
    return written

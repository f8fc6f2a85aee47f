"""``sslp dashboards``: put the platform's Grafana dashboard beside Ray's generated ones.

Ray's dashboard writes a Grafana set-up for each session (``SESSION/metrics/grafana``): a
``grafana.ini`` whose provisioning folder holds ``dashboards/default.yml``, which points Grafana
at a folder of dashboard JSON files (``SESSION/metrics/grafana/dashboards`` unless
``RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR`` moves it). ``sslp dashboards install`` copies
``dashboards/ssl-platform.json`` into that folder, found from the provisioning file, so a
Grafana started with Ray's ``grafana.ini`` shows it in the Ray folder. Ray rewrites the session's
Grafana folder when the head node starts: install after ``ray start --head``.

    sslp dashboards install [DIR]   copy the dashboard into DIR (default: the running session's folder)
    sslp dashboards start           on the head node: install, then start Prometheus and Grafana
    sslp dashboards path            print where the shipped dashboard JSON is

``start`` is what the cluster files run on the head after ``ray start --head``: Prometheus with the
scrape configuration Ray generated for the session (every node's metrics endpoint, the autoscaler's
and the dashboard's, found through Ray's service-discovery file) and Grafana with Ray's
``grafana.ini`` (Ray's data source and dashboards, and this one), both on 127.0.0.1 by default, in
the background, their logs and data under Ray's temp root. Run again after a new ``ray start
--head``: it stops the ones it started before (Grafana reads provisioning only when it starts).

The JSON ships in the repository (editable installs, clusters that ``pip install -e`` the
project) and, for wheel installs, under ``share/ssl-platform/dashboards`` of the environment.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from ssl_platform.command import EXIT_USAGE

DASHBOARD_FILES = ("ssl-platform.json",)
# Ray's temp root (`ray start --temp-dir` or RAY_TMPDIR move it) and the provisioning file Ray
# generates in each session (ray/dashboard/modules/metrics/metrics_head.py).
RAY_TEMP_DIR = "/tmp/ray"
PROVISIONING_FILE = Path("session_latest/metrics/grafana/provisioning/dashboards/default.yml")
PROMETHEUS_CONFIG = Path("session_latest/metrics/prometheus/prometheus.yml")
GRAFANA_INI = Path("session_latest/metrics/grafana/grafana.ini")
# Where the binaries are: clusters/Dockerfile puts both on PATH; Grafana's files under GRAFANA_HOME.
GRAFANA_HOME = "/usr/share/grafana"


def add_parser(sub) -> None:
    dashboards = sub.add_parser(
        "dashboards", help="install the platform's Grafana dashboard beside Ray's; start Prometheus and Grafana",
        description="The platform's Grafana dashboard (loss, throughput, data wait, learning rate, online "
                    "evaluation, skipped records per run; the run's Ray Data pipeline, GPUs, object store, "
                    "autoscaler and Ray Train restarts). `install` copies it into the folder Ray's generated "
                    "Grafana provisioning reads; `start` also starts Prometheus and Grafana on the head node; "
                    "`path` prints where it is shipped.")
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
    start = commands.add_parser(
        "start", help="on the head node: install the dashboard, start Prometheus and Grafana",
        description="Install the dashboard into the running Ray session's Grafana folder, then start Prometheus "
                    "(Ray's generated scrape configuration) and Grafana (Ray's grafana.ini) in the background, "
                    "waiting until each answers; logs and data under RAY_TEMP_DIR. Stops the ones a previous "
                    "`start` left running. Run it on the head node after `ray start --head`.")
    start.add_argument("--ray-temp-dir", default=None,
                       help=f"Ray's temp root (default: $RAY_TMPDIR, else {RAY_TEMP_DIR})")
    start.add_argument("--host", default="127.0.0.1",
                       help="address both listen on (default 127.0.0.1: reach them through an SSH tunnel)")
    start.add_argument("--prometheus-port", type=int, default=9090,
                       help="(default 9090; RAY_PROMETHEUS_HOST must name it)")
    start.add_argument("--grafana-port", type=int, default=3000, help="(default 3000; RAY_GRAFANA_HOST must name it)")
    start.add_argument("--scrape-interval", type=int, default=None, metavar="SECONDS",
                       help="Prometheus's scrape interval (default: Ray's, 10 s)")
    start.add_argument("--cluster-label", default=None, metavar="NAME",
                       help="label every series ray_io_cluster=NAME, as KubeRay's PodMonitor does (the "
                            "dashboard's Cluster filter)")
    start.add_argument("--no-grafana", action="store_true", help="start Prometheus only")
    commands.add_parser("path", help="print the folder that holds the shipped dashboard JSON",
                        description="Print the folder of the shipped dashboard JSON (to mount it into a Grafana "
                                    "of your own, e.g. a ConfigMap for KubeRay's Grafana).")


def main(args: argparse.Namespace) -> int:
    try:
        source = shipped_dir()
        if args.dashboards_command == "path":
            print(source)
            return 0
        if args.dashboards_command == "start":
            start(args.ray_temp_dir, host=args.host, prometheus_port=args.prometheus_port,
                  grafana_port=None if args.no_grafana else args.grafana_port,
                  scrape_interval=args.scrape_interval, cluster_label=args.cluster_label,
                  say=lambda line: print(line, flush=True))
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


def start(temp_dir: str | None = None, host: str = "127.0.0.1", prometheus_port: int = 9090,
          grafana_port: int | None = 3000, scrape_interval: int | None = None, cluster_label: str | None = None,
          wait_s: float = 60, say: Callable[[str], None] = print) -> None:
    """Install the dashboard, then (re)start Prometheus and, unless ``grafana_port`` is None, Grafana
    for the running Ray session under ``temp_dir``; ``say`` gets one line per thing done."""
    root = Path(temp_dir or os.environ.get("RAY_TMPDIR") or RAY_TEMP_DIR)
    # Ray's dashboard writes the session's Prometheus and Grafana files just after `ray start` returns.
    deadline = time.monotonic() + wait_s
    while not all((root / f).is_file() for f in (PROMETHEUS_CONFIG, GRAFANA_INI, PROVISIONING_FILE)):
        if time.monotonic() > deadline or not (root / "session_latest").exists():
            raise DashboardError(f"no Ray session with metrics configuration under {root} ({root / PROMETHEUS_CONFIG} "
                                 f"is missing); start Ray with its dashboard on this node first (`ray start --head`; "
                                 f"not --include-dashboard=false), or pass --ray-temp-dir")
        time.sleep(1)
    for path in install(ray_dashboards_dir(str(root))):
        say(f"wrote {path}")
    session = (root / "session_latest").resolve()  # this session's files, not whatever session_latest names later

    config = (root / PROMETHEUS_CONFIG).read_text()
    if scrape_interval:
        config = re.sub(r"(scrape|evaluation)_interval: \S+", rf"\g<1>_interval: {scrape_interval}s", config)
    if cluster_label:
        config += f"  relabel_configs:\n  - target_label: ray_io_cluster\n    replacement: {cluster_label}\n"
    (root / "prometheus.yml").write_text(config)
    prometheus = _binary("prometheus")
    say(_daemon("prometheus", root, f"http://{host}:{prometheus_port}/-/ready", wait_s, [
        prometheus, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'prometheus'}",
        f"--web.listen-address={host}:{prometheus_port}"]))
    if grafana_port is not None:
        grafana = _binary("grafana", "grafana-server")
        home = os.environ.get("GRAFANA_HOME", GRAFANA_HOME)
        server = [grafana, "server"] if Path(grafana).name == "grafana" else [grafana]
        say(_daemon("grafana", root, f"http://{host}:{grafana_port}/api/health", wait_s, [
            *server, "--homepath", home, "--config", str(session / "metrics" / "grafana" / "grafana.ini"),
            f"cfg:default.paths.data={root / 'grafana'}", f"cfg:default.paths.logs={root / 'grafana'}",
            f"cfg:default.server.http_addr={host}", f"cfg:default.server.http_port={grafana_port}"]))


def _binary(*names: str) -> str:
    for name in names:
        if found := shutil.which(name):
            return found
    raise DashboardError(f"{names[0]} is not installed on this node (the project image, clusters/Dockerfile, has it; "
                         f"elsewhere install it, e.g. `apt-get install prometheus` on Debian)")


def _daemon(name: str, root: Path, ready_url: str, wait_s: float, argv: list[str]) -> str:
    """Stop the ``name`` a previous start left (its pid file), start ``argv`` detached with its log
    under ``root``, and wait until ``ready_url`` answers."""
    pid_file, log = root / f"{name}.pid", root / f"{name}.log"
    if pid_file.is_file():
        _stop(int(pid_file.read_text()), name)
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # outlives this command, and a Ctrl-C of it
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            urllib.request.urlopen(ready_url, timeout=2).read()
            return f"started {name} (pid {proc.pid}) at {ready_url.rsplit('/', 2)[0]}, log {log}"
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited {proc.returncode}" if proc.returncode is not None else f"no answer in {wait_s:.0f} s"
            tail = log.read_text(errors="replace")[-1500:]
            raise DashboardError(f"{name} did not start ({why} at {ready_url}); its log {log} ends:\n{tail}")
        time.sleep(0.5)


def stop(temp_dir: str | None = None) -> None:
    """Stop the Prometheus and Grafana that ``start`` left running for ``temp_dir``."""
    root = Path(temp_dir or os.environ.get("RAY_TMPDIR") or RAY_TEMP_DIR)
    for name in ("prometheus", "grafana"):
        if (root / f"{name}.pid").is_file():
            _stop(int((root / f"{name}.pid").read_text()), name)


def _stop(pid: int, name: str) -> None:
    """SIGTERM the process ``pid`` if it is still the ``name`` a previous start launched."""
    try:
        if name not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)

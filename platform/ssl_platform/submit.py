"""``sslp submit``: send a run (or a sweep) to a running Ray cluster as a Ray job.

    sslp submit --address http://HEAD:8265 simclr-digits train.max_steps=200 runs_dir=s3://bucket/runs --follow

What it does, in order:

1. checks the config on this machine exactly as ``sslp run`` (or ``sslp sweep``) would, so a typo
   exits 2 here instead of failing minutes later on the cluster;
2. refuses paths that would not mean the same on the cluster: the job runs in a temporary
   directory there, so a relative ``runs_dir`` (or ``data.path``) would be written into (or read
   from) that directory and vanish with it;
3. writes the resolved config (or sweep) into a folder that becomes the job's
   ``runtime_env["working_dir"]``, and runs ``python -m ssl_platform.cli run config.yaml`` there
   (``sweep sweep.yaml`` for a sweep): the job trains what was checked here, whatever presets the
   cluster's copy of the platform holds;
4. with ``--code ship`` (the default) also uploads this machine's ``ssl_platform`` and
   ``ssl_models`` packages as ``runtime_env["py_modules"]``, so the cluster needs only the
   dependencies (torch, torchvision, ``ray[default]``, open_clip, ...) in its image, and runs the
   very code that checked the config. ``--code installed`` uploads nothing and imports the
   platform installed in the cluster image (``pip install ssl-platform`` in its setup commands).

It prints the submission id and the commands to follow and stop the job. ``--follow`` streams the
job's logs until it ends and ``--wait`` waits without streaming; either returns the job's status:
0 when it SUCCEEDED, else the driver's exit code (2 for a config, data or storage error found on
the cluster, 1 for a failed training run) with the job's last log lines on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ssl_platform.command import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from ssl_platform.config import ConfigError, ExperimentConfig, list_presets, load_config

# Where `ray job submit` looks for the cluster when --address is not given, in this order.
ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# The packages --code ship uploads; both are plain directories found without importing them.
PACKAGES = ("ssl_platform", "ssl_models")
LOG_TAIL_LINES = 30
POLL_S = 2.0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "submit", help="submit a run or a sweep to a running Ray cluster (a Ray job)",
        description="Check a preset or YAML (with key=value overrides) here, then submit it to a running Ray "
                    "cluster as a Ray job that runs `sslp run` (or `sslp sweep` with --sweep) on the resolved "
                    "config. runs_dir must be storage the cluster keeps: s3://..., gs://..., or an absolute path "
                    "every node sees. Prints the submission id; --follow streams the logs and returns the job's "
                    "exit status.")
    p.add_argument("target", metavar="PRESET_OR_YAML", help="preset name or config YAML (with --sweep: a sweep name "
                                                            "or sweep YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config (or sweep) overrides, as for sslp run")
    add_address_arg(p)
    p.add_argument("--sweep", action="store_true", help="submit a Ray Tune sweep (`sslp sweep`) instead of one run")
    p.add_argument("--max-failures", type=int, default=0,
                   help="as for sslp run: restart the run's worker group from its newest checkpoint this many times "
                        "if a worker (or its node) dies; -1: without limit (runs only)")
    p.add_argument("--code", choices=("ship", "installed"), default="ship",
                   help="ship (default): upload this machine's ssl_platform and ssl_models with the job, so the "
                        "cluster image needs only the dependencies (torch, torchvision, ray[default], open_clip); "
                        "installed: upload only the config and use the platform installed on the cluster")
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--follow", action="store_true",
                      help="stream the job's logs until it ends; exit with its status (Ctrl-C stops following, not "
                           "the job)")
    wait.add_argument("--wait", action="store_true",
                      help="wait for the job to end without streaming its logs; exit with its status")


def add_address_arg(p) -> None:
    """--address, as `sslp submit` and `sslp jobs` take it."""
    p.add_argument("--address", default=None,
                   help="the cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, else "
                        "$RAY_ADDRESS, as for `ray job submit`). The token sent is $RAY_AUTH_TOKEN, else the file at "
                        "$RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token")


def resolve_address(given: str | None, command: str) -> str | None:
    """--address, else the environment; None (with one line on stderr) when there is none."""
    address = given or next((os.environ[v] for v in ADDRESS_VARS if os.environ.get(v)), None)
    if not address:
        print(f"sslp: {command}: no cluster address; give --address http://HEAD:8265 (the Ray dashboard) or set "
              "RAY_API_SERVER_ADDRESS", file=sys.stderr)
    return address


def connect(address: str, command: str):
    """The Jobs API client of the cluster at ``address``, or None with one line on stderr saying
    whether the address or the token was wrong."""
    try:
        return _connect(address)
    except _Unreachable as e:
        print(f"sslp: {command}: {e}", file=sys.stderr)
        return None


def main(args: argparse.Namespace) -> int:
    address = resolve_address(args.address, "submit")
    if not address:
        return EXIT_USAGE
    try:
        job = _prepare(args)
    except ConfigError as e:
        print(f"sslp: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    client = connect(address, "submit")
    if client is None:
        return EXIT_USAGE
    training = running_job_for(client, job.location)
    if training is not None:
        print(f"sslp: submit: job {training.submission_id} ({training.status}) already trains {job.location}; "
              f"stop it (`sslp jobs stop {training.submission_id} --address {address}`) or give this run another "
              f"name=", file=sys.stderr)
        return EXIT_USAGE

    with tempfile.TemporaryDirectory(prefix="sslp-submit-") as staging:
        job.stage(Path(staging))
        try:
            submission_id = _submit_when_an_agent_is_up(client, job, Path(staging))
        except RuntimeError as e:  # an upload the cluster refused (too large, ...)
            print(f"sslp: submit: the cluster at {address} refused the job: {_first_line(e)}", file=sys.stderr)
            return EXIT_FAILED
        except OSError as e:  # the connection dropped (requests' errors are OSErrors): submitted or not
            print(f"sslp: submit: lost the connection to the cluster at {address} while submitting "
                  f"({_first_line(e)}); see whether the job is there with `sslp jobs list --address {address}` "
                  f"before submitting again", file=sys.stderr)
            return EXIT_FAILED
    print(f"submitted {job.kind} {job.name} as job {submission_id} ({job.location})")
    print(f"  follow: sslp jobs logs -f {submission_id} --address {address}")
    print(f"  stop:   sslp jobs stop {submission_id} --address {address}", flush=True)
    if not (args.follow or args.wait):
        return EXIT_OK
    try:
        if args.follow:
            import asyncio

            asyncio.run(_stream_logs(client, submission_id))
        return _final_status(client, submission_id)
    except KeyboardInterrupt:
        print(f"\nsslp: stopped waiting; job {submission_id} keeps running on the cluster. Stop it with "
              f"`sslp jobs stop {submission_id} --address {address}`", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, RuntimeError) as e:  # the head went away, the log stream broke off
        print(f"sslp: submit: lost the cluster at {address} while waiting for job {submission_id} ({_first_line(e)}); "
              f"check it with `sslp jobs status {submission_id} --address {address}`", file=sys.stderr)
        return EXIT_FAILED


# ----------------------------------------------------------------------------- what is sent

@dataclass
class _Job:
    """A checked run or sweep: the files it ships and the command that runs them."""

    kind: str  # "run" or "sweep"
    name: str  # the run's (sweep's) name
    location: str  # where its results go: RUNS_DIR/NAME
    entrypoint: str  # the shell command the job runs in its working directory
    files: dict[str, str]  # staged file name -> its text
    copies: dict[str, Path] = field(default_factory=dict)  # staged file name -> a local file copied as it is
    py_modules: list[str] = field(default_factory=list)  # package directories uploaded with the job (--code ship)

    def new_submission_id(self) -> str:
        """Readable in `ray job list` and unique per submission (Ray refuses a reused id)."""
        return f"sslp-{self.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"

    def stage(self, folder: Path) -> None:
        for file, text in self.files.items():
            (folder / file).write_text(text)
        for file, source in self.copies.items():
            shutil.copyfile(source, folder / file)

    def runtime_env(self, folder: Path) -> dict:
        env = {"working_dir": str(folder), "excludes": ["__pycache__", "*.pyc"]}
        if self.py_modules:
            env["py_modules"] = self.py_modules
        return env


def package_dir(name: str) -> str:
    """The directory of an importable package, found without importing it (ssl_models imports torch)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"--code ship: package {name} is not importable here; install the project "
                          f"(pip install -e .) or use --code installed")
    return next(iter(spec.submodule_search_locations))


def _prepare(args: argparse.Namespace) -> _Job:
    """Check the config (or sweep) as `sslp run` (`sslp sweep`) would, and what it ships."""
    import yaml

    if args.sweep:
        from ssl_platform.tune.spec import load_sweep

        if args.max_failures:
            raise ConfigError("--max-failures applies to a run, not a sweep (its trials are restored by re-running "
                              "the sweep)")

        spec = load_sweep(args.target, args.overrides)
        _check_cluster_paths(spec.base, sweep=True)
        sweep = spec.to_dict()
        copies = {}
        if spec.preset not in list_presets():  # a YAML of this machine: it travels beside the sweep
            copies["preset.yaml"] = Path(spec.preset)
            sweep["preset"] = "preset.yaml"
        location = f"{spec.base.runs_dir.rstrip('/')}/{spec.name}"
        job = _Job("sweep", spec.name, location, "python -m ssl_platform.cli sweep sweep.yaml",
                   {"sweep.yaml": yaml.safe_dump(sweep, sort_keys=False)}, copies)
    else:
        from ssl_platform import methods  # ssl_models and torch, not Ray

        cfg = methods.validate(load_config(args.target, args.overrides))
        _check_cluster_paths(cfg)
        retries = f" --max-failures {args.max_failures}" if args.max_failures else ""
        job = _Job("run", cfg.name, cfg.run_location(), f"python -m ssl_platform.cli run config.yaml{retries}",
                   {"config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False)})
    if args.code == "ship":
        job.py_modules = [package_dir(name) for name in PACKAGES]
    return job


def _check_cluster_paths(cfg: ExperimentConfig, sweep: bool = False) -> None:
    """Relative paths would resolve inside the job's temporary working directory on the cluster."""
    if "://" not in cfg.runs_dir and not Path(cfg.runs_dir).is_absolute():
        # A sweep writes its tables and plots with plain file I/O, so it needs a path (tune/spec.py).
        uri = "" if sweep else "s3://BUCKET/runs, gs://BUCKET/runs or "
        raise ConfigError(f"runs_dir={cfg.runs_dir} is relative, and a job runs in a temporary directory on the "
                          f"cluster that is deleted when it ends; set runs_dir to {uri}an absolute path on storage "
                          f"every node sees (a local absolute path is fine for a single-node cluster)")
    path = cfg.data.path
    if path and "://" not in path and not Path(path).is_absolute():
        raise ConfigError(f"data.path={path} is relative, and a job runs in a temporary directory on the cluster; "
                          f"give a URI (s3://, gs://) or an absolute path that exists on the cluster's nodes")


# ----------------------------------------------------------------------------- the cluster

@contextmanager
def _without(names: tuple[str, ...]):
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class _Unreachable(Exception):
    """No Ray dashboard answered at the address, or it refused this machine's token."""


NO_AGENT = "No available agent to submit job"  # the Jobs API's answer while the head's agent starts
AGENT_WAIT_S = 60.0


def _submit_when_an_agent_is_up(client, job, staging: Path, wait_s: float = AGENT_WAIT_S,
                                 sleep=time.sleep, clock=time.monotonic) -> str:
    """``client.submit_job``, again every 2 s for up to ``wait_s`` while the head answers that no
    job agent is up yet (a head that has just started: `ray up`, a new KubeRay cluster, a loaded
    machine); any other refusal at once."""
    deadline = clock() + wait_s
    submission_id = job.new_submission_id()  # one id: the cluster refuses to run it twice
    while True:
        try:
            return client.submit_job(entrypoint=job.entrypoint, submission_id=submission_id,
                                     runtime_env=job.runtime_env(staging),
                                     metadata={"sslp": job.kind, "name": job.name, "location": job.location})
        except RuntimeError as e:
            if NO_AGENT not in str(e) or clock() >= deadline:
                raise
            sleep(2.0)


def sslp_jobs(client) -> list:
    """The cluster's jobs that `sslp submit` sent (metadata "sslp"), newest first."""
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("sslp") and j.submission_id]
    return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)


def running_job_for(client, location: str):
    """The job (not yet ended) that trains the run or sweep writing to ``location``, or None: two
    drivers in one run directory would overwrite each other's checkpoints and metrics."""
    return next((j for j in sslp_jobs(client)
                 if not j.status.is_terminal() and (j.metadata or {}).get("location") == location), None)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def token_header() -> dict[str, str]:
    """The token this machine holds, as `ray.init` would find it ($RAY_AUTH_TOKEN, else the file at
    $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), read now. Ray's job client sends one only when
    RAY_AUTH_MODE=token is set, while Ray 2.60 clusters require one by default; and where it sends
    one, it is the token its loader cached when this process first needed one (a `ray.init` of
    this process sets RAY_AUTH_MODE=token and caches its own cluster's). A header given here wins
    over Ray's, so it is always sent, unless RAY_AUTH_MODE=disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _connect(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        # Ray lets $RAY_ADDRESS override the address it is given; here --address wins, as its help says.
        with _without(ADDRESS_VARS):
            return JobSubmissionClient(address, headers=token_header())
    except AuthenticationError as e:  # Ray 2.60 clusters require a token by default
        raise _Unreachable(f"the Ray dashboard at {address} refused this machine ({e.message.splitlines()[0]}); "
                           f"set RAY_AUTH_TOKEN to the cluster's token "
                           f"(`ray get-auth-token` on its head node)") from None
    except (OSError, RuntimeError, ValueError) as e:  # refused, unresolvable, not a Ray dashboard
        raise _Unreachable(f"no Ray dashboard at {address}: start the cluster or check --address "
                           f"({_first_line(e)})") from None


async def _stream_logs(client, submission_id: str) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        print(chunk, end="", flush=True)


def _final_status(client, submission_id: str) -> int:
    """Wait for the job to end (the log stream may close a moment before its status is final);
    0 when it succeeded, else the driver's exit code (1 when it has none), with the log tail."""
    from ray.job_submission import JobStatus

    info = client.get_job_info(submission_id)
    while not info.status.is_terminal():
        time.sleep(POLL_S)
        info = client.get_job_info(submission_id)
    if info.status == JobStatus.SUCCEEDED:
        print(f"job {submission_id} SUCCEEDED", flush=True)
        return EXIT_OK
    # A driver killed by a signal (ray job stop) reports a negative code: a plain failure here.
    code = info.driver_exit_code if info.driver_exit_code and info.driver_exit_code > 0 else EXIT_FAILED
    tail = client.get_job_logs(submission_id).rstrip("\n").splitlines()[-LOG_TAIL_LINES:]
    print(f"--- last {len(tail)} lines of job {submission_id}'s log ---", *tail, sep="\n", file=sys.stderr)
    exit_code = f" (exit code {info.driver_exit_code})" if info.driver_exit_code is not None else ""
    reason = (info.message or "").strip().splitlines()[:1] or ["see its log above"]
    print(f"sslp: submit: job {submission_id} {info.status}{exit_code}: {reason[0]}", file=sys.stderr)
    return code

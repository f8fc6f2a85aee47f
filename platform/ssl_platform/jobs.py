"""``sslp jobs``: the jobs ``sslp submit`` sent to a Ray cluster, with the same address and token
handling as ``sslp submit`` (``--address`` or $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS; the token
from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).

    sslp jobs list   --address http://localhost:8265          # sslp's jobs, newest first
    sslp jobs status JOB_ID --address ...                      # exit 0 while it runs or once it succeeded
    sslp jobs logs   JOB_ID --address ... [-f]                 # its driver's log; -f follows it
    sslp jobs stop   JOB_ID --address ...

A wrong address or a refused token is one line naming which; an unknown job id too.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from ssl_platform import submit
from ssl_platform.command import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE


def add_parser(sub) -> None:
    p = sub.add_parser("jobs", help="list, inspect, follow or stop the jobs `sslp submit` sent to a cluster",
                       description="The Ray jobs `sslp submit` sent to a running cluster: list them, show one's "
                                   "status, print or follow its log, stop it. Address and token as for sslp submit.")
    actions = p.add_subparsers(dest="jobs_command", required=True)
    listing = actions.add_parser("list", help="sslp's jobs on the cluster, newest first")
    submit.add_address_arg(listing)
    for name, text in (("status", "one job's status (exit 0 while it is pending or running, or once it succeeded)"),
                       ("logs", "one job's driver log"), ("stop", "stop one job (its run keeps its checkpoints)")):
        q = actions.add_parser(name, help=text)
        q.add_argument("job_id", metavar="JOB_ID", help="the submission id `sslp submit` printed (sslp-NAME-...)")
        submit.add_address_arg(q)
        if name == "logs":
            q.add_argument("-f", "--follow", action="store_true", help="follow the log until the job ends")


def main(args: argparse.Namespace) -> int:
    command = f"jobs {args.jobs_command}"
    address = submit.resolve_address(args.address, command)
    if not address:
        return EXIT_USAGE
    client = submit.connect(address, command)
    if client is None:
        return EXIT_USAGE
    try:
        if args.jobs_command == "list":
            return _list(client)
        client.get_job_info(args.job_id)  # an unknown id: one line, below
        return {"status": _status, "logs": _logs, "stop": _stop}[args.jobs_command](client, args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except RuntimeError as e:
        message = submit._first_line(e)
        if "does not exist" in message:
            print(f"sslp: {command}: no job {args.job_id} on the cluster at {address} (`sslp jobs list --address "
                  f"{address}` lists them)", file=sys.stderr)
            return EXIT_USAGE
        print(f"sslp: {command}: the cluster at {address} answered: {message}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"sslp: {command}: lost the cluster at {address} ({submit._first_line(e)})", file=sys.stderr)
        return EXIT_FAILED


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ms else "-"


def _list(client) -> int:
    jobs = submit.sslp_jobs(client)
    if not jobs:
        print("no sslp jobs on this cluster")
        return EXIT_OK
    rows = [("JOB", "STATUS", "KIND", "STARTED", "WRITES TO")]
    rows += [(j.submission_id, str(j.status), j.metadata.get("sslp", ""), _when(j.start_time),
              j.metadata.get("location", "")) for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
    return EXIT_OK


def _status(client, args) -> int:
    info = client.get_job_info(args.job_id)
    meta = info.metadata or {}
    code = f", exit code {info.driver_exit_code}" if info.driver_exit_code is not None else ""
    print(f"job {args.job_id}: {info.status}{code} ({meta.get('sslp', 'job')} {meta.get('name', '?')}, writes to "
          f"{meta.get('location', '?')}; started {_when(info.start_time)}, ended {_when(info.end_time)})")
    if info.message:
        print(f"  {info.message.strip().splitlines()[0]}")
    return EXIT_OK if str(info.status) in ("PENDING", "RUNNING", "SUCCEEDED") else EXIT_FAILED


def _logs(client, args) -> int:
    if args.follow:
        import asyncio

        asyncio.run(submit._stream_logs(client, args.job_id))
    else:
        print(client.get_job_logs(args.job_id), end="", flush=True)
    return EXIT_OK


def _stop(client, args) -> int:
    if client.get_job_info(args.job_id).status.is_terminal():
        print(f"job {args.job_id} has already ended ({client.get_job_status(args.job_id)})")
        return EXIT_OK
    client.stop_job(args.job_id)
    print(f"asked job {args.job_id} to stop; `sslp jobs status {args.job_id}` shows when it has")
    return EXIT_OK

"""``sslp``: the platform's command line.

    sslp presets                                  list the shipped presets
    sslp run PRESET_OR_YAML [key=value ...]       pretrain (and evaluate) on Ray
    sslp demo                                     SimCLR on digits, 2 workers, then the table

Configs are validated before Ray starts: a bad key or value exits with status 2 and one line
saying what to change.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime

from ssl_platform.config import ConfigError, ExperimentConfig, describe_keys, list_presets, load_config

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.max_steps=200 method.temperature=0.2 (see --help-config)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    p.add_argument("--max-failures", type=int, default=0,
                   help="restart the worker group from the newest checkpoint this many times if a worker dies")
    p.add_argument("--no-dashboard", action="store_true", help="start a local Ray cluster without the dashboard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslp", description="Self-supervised pretraining on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("presets", help="list the shipped presets", description="List the presets shipped with the platform.")

    run = sub.add_parser("run", help="pretrain from a preset or YAML file, then evaluate",
                         description="Pretrain from a preset name or YAML file with key=value overrides. "
                                     "Re-running the same run name resumes from its newest checkpoint.")
    run.add_argument("preset", help="preset name (see `sslp presets`) or path to a YAML config")
    _add_run_args(run)
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and the worker layout, do not train")
    run.add_argument("--help-config", action="store_true", help="list every config key with its default and allowed values")

    demo = sub.add_parser("demo", help="SimCLR on the built-in digits with 2 workers, then the results table",
                          description="Pretrain SimCLR on the built-in digits corpus with 2 Ray Train workers, "
                                      "evaluate the frozen encoder against baselines and print the table.")
    _add_run_args(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`run X --dry-run a=1 b=2`); argparse's
    # intermixed parsing does not support sub-commands, so leftovers are collected here.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "presets":
            for name, description in list_presets().items():
                print(f"{name:<24} {description}")
            return 0
        from ssl_platform import methods  # ssl_models and torch, not Ray

        if args.command == "demo":
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            cfg = load_config("simclr-digits", [f"name=demo-{stamp}", *args.overrides])
        else:
            cfg = load_config(args.preset, args.overrides)
        if args.command == "run" and args.help_config:
            print(describe_keys(methods.method_params(cfg.method.name), methods.DERIVED))
            return 0
        methods.validate(cfg)
        if getattr(args, "dry_run", False):
            return _dry_run(cfg)
        return _run(cfg, args)
    except ConfigError as e:
        print(f"sslp: config error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _dry_run(cfg: ExperimentConfig) -> int:
    import yaml

    s = cfg.scaling
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    cpus = "auto" if s.cpus_per_worker is None else f"{s.cpus_per_worker:g}"
    print(f"# workers: {s.num_workers} x (CPU={cpus}{', GPU=1' if s.use_gpu else ''}), "
          f"data pipeline keeps {s.data_cpus:g} CPUs")
    print(f"# global batch {cfg.train.batch_size} = {s.num_workers} x {cfg.train.batch_size // s.num_workers} per worker")
    print(f"# run directory: {cfg.run_dir()}")
    return 0


def _run(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    # Imported here so `sslp presets` and config errors answer without importing Ray and torch.
    from ssl_platform.train.checkpoint import load_payload
    from ssl_platform.train.trainer import DataError, ResourceError, fit, init_ray

    t0 = time.perf_counter()
    run_dir = cfg.run_dir()
    try:
        url = init_ray(args.address, dashboard=not args.no_dashboard)
        if url:
            print(f"Ray dashboard: {url}", flush=True)
        print(f"run directory: {run_dir}", flush=True)
        checkpoint = fit(cfg, max_failures=args.max_failures)
    except ResourceError as e:
        print(f"sslp: resources: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DataError as e:
        print(f"sslp: data: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\nsslp: interrupted; the newest checkpoint stays in {run_dir}. "
              f"Run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"checkpoint: {checkpoint}", flush=True)
    if cfg.eval.enabled:
        from ssl_platform.evaluate.frozen import evaluate_image_encoder

        evaluate_image_encoder(cfg, load_payload(checkpoint)["model"], run_dir)
    print(f"run directory: {run_dir} (done in {time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

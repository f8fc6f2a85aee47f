"""``sslp``: the platform's command line.

    sslp presets                                  list the shipped presets
    sslp run PRESET_OR_YAML [key=value ...]       pretrain (and evaluate) on Ray
    sslp eval RUN_DIR_OR_CHECKPOINT [eval.k=v]    the method's evaluation table against baselines
    sslp sweep SWEEP_OR_YAML [key=value ...]      a Ray Tune sweep (ASHA on the online metric)
    sslp demo                                     SimCLR on digits-m, 2 workers, then the table

Configs are validated before Ray starts: a bad key or value exits with status 2 and one line
saying what to change. `sslp run` exits 0 when the run finished (or had already finished), 1 when
training failed (one line on stderr, the full error in RUN_DIR/error.log), 2 for config, data and
resource errors, 130 when interrupted with Ctrl-C (the newest checkpoint stays; re-run to resume),
143 when stopped by SIGTERM (the step it was at is checkpointed; re-run to resume, repeating no step).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime

from ssl_platform.command import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Interrupted,
    add_ray_args,
    add_verbose_arg,
    on_ray,
    quiet_console,
    resolve_checkpoint,
)
from ssl_platform.config import (
    BUILTIN_KINDS,
    CORPUS_FORMATS,
    CORPUS_KINDS,
    ConfigError,
    ExperimentConfig,
    describe_keys,
    list_presets,
    load_config,
    with_overrides,
    worker_counts,
)
from ssl_platform.heap import keep_freed_memory

# The exit statuses and resolve_checkpoint live in ssl_platform.command (shared with the commands'
# modules, which never import this one) and stay importable from here.
__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_USAGE", "build_parser", "main", "resolve_checkpoint"]

# What `sslp demo` (and `make demo`) runs: a corpus on which raw pixels and a random encoder do badly.
DEMO_PRESET = "simclr-digits-m"

# Sub-commands that live in a module of their own: name -> module. Each module defines
# ``add_parser(sub)`` (registers the sub-command; the module must import nothing heavy, since
# every `sslp` call builds the parser) and ``main(args) -> int`` (the exit status).
COMMAND_MODULES: dict[str, str] = {
    "submit": "ssl_platform.submit",
    "jobs": "ssl_platform.jobs",
    "finetune": "ssl_platform.finetune",
    "embed": "ssl_platform.embed",
    "dashboards": "ssl_platform.dashboards",
    "export": "ssl_platform.export",
}


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.max_steps=200 method.temperature=0.2 (see --help-config)")
    add_ray_args(p)
    add_verbose_arg(p)
    p.add_argument("--max-failures", type=int, default=0,
                   help="restart the worker group from the newest checkpoint this many times if a worker dies "
                        "(-1: without limit). Tests kill rank 0 at step N once with SSLP_CRASH_AT_STEP=N "
                        "(SSLP_* variables of the driver reach every worker)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslp", description="Self-supervised pretraining on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("presets", help="list the shipped presets",
                   description="List the presets shipped with the platform.")

    run = sub.add_parser("run", help="pretrain from a preset or YAML file, then evaluate",
                         description="Pretrain from a preset name or YAML file with key=value overrides. "
                                     "Re-running the same run name resumes from its newest checkpoint.")
    run.add_argument("preset", help="preset name (see `sslp presets`) or path to a YAML config")
    _add_run_args(run)
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved config and the worker layout, do not train")
    run.add_argument("--help-config", action="store_true",
                     help="list every config key with its default and allowed values")

    evaluate = sub.add_parser(
        "eval", help="evaluate a run's (or a checkpoint's) encoder against baselines",
        description="Evaluate the newest checkpoint of RUN_DIR (or the checkpoint directory given) with its method's "
                    "protocol: linear probe and kNN (SimCLR, BYOL, Barlow Twins, VICReg), zero-shot and retrieval "
                    "(CLIP), spoken-digit probe (CPC), MLM/NSP accuracy (BERT), perplexity and samples (GPT), each "
                    "beside its baselines. Features are extracted with Ray Data batch inference. Writes results.json, "
                    "results.md and report.png.")
    evaluate.add_argument("target", metavar="RUN_DIR_OR_CHECKPOINT",
                          help="a run directory or one of its checkpoint_* dirs")
    evaluate.add_argument("overrides", nargs="*", metavar="eval.key=value",
                          help="evaluation settings, e.g. eval.knn_k=10 eval.supervised_epochs=0 eval.actors=2")
    evaluate.add_argument("--out", default=None, help="folder for the results (default: the run directory)")
    add_ray_args(evaluate)
    add_verbose_arg(evaluate, "OUT/ray.log")

    sweep = sub.add_parser(
        "sweep", help="a Ray Tune sweep over a preset's config keys",
        description="Run a Ray Tune sweep: a shipped sweep name (see `sslp presets`) or a sweep YAML (a base preset, "
                    "a search space over config keys, the metric and ASHA settings). Overrides: sweep keys "
                    "(num_samples=4, scheduler.grace_period=10) or config keys applied to every trial "
                    "(train.max_steps=100). Running the same command again resumes an interrupted sweep.")
    sweep.add_argument("sweep", metavar="SWEEP_OR_YAML", help="shipped sweep name or path to a sweep YAML")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="sweep or trial-config overrides")
    add_ray_args(sweep)
    add_verbose_arg(sweep, "the sweep directory's ray.log")

    demo = sub.add_parser("demo", help="SimCLR on the built-in digits-m with 2 workers, then the results table",
                          description="Pretrain SimCLR on the built-in digits-m corpus (digits blended on photo "
                                      "patches) with 2 Ray Train workers (the simclr-digits-m preset), evaluate the "
                                      "frozen encoder against baselines and print the table.")
    _add_run_args(demo)

    data = sub.add_parser("data", help="look at a corpus before training on it",
                          description="Tools for corpora: `sslp data inspect SOURCE --kind KIND`.")
    inspect = data.add_subparsers(dest="data_command", required=True).add_parser(
        "inspect", help="counts, skipped records with reasons, one example batch and a PNG",
        description="Read a corpus through the platform's pipeline: count good and skipped records (with "
                    "reasons), show one transformed batch, and draw a PNG (augmented view pairs, masked text, "
                    "waveforms and spectrograms).")
    inspect.add_argument("source", help="a path or URI (s3://, gs://), or a built-in corpus name")
    inspect.add_argument("--kind", choices=CORPUS_KINDS, default=None,
                         help="what SOURCE holds (default: the built-in corpus's kind, else image)")
    inspect.add_argument("--format", default="auto", choices=CORPUS_FORMATS, help="file format (auto: from the path)")
    inspect.add_argument("--out", default="inspect", help="folder for the PNG (default: ./inspect)")
    inspect.add_argument("--strict", action="store_true", help="fail on the first bad record, naming it")
    inspect.add_argument("--size", type=int, default=32, help="image side in pixels (image kinds)")
    inspect.add_argument("--channels", type=int, default=3, choices=(1, 3), help="image channels (image kinds)")

    from ssl_platform.bench import add_arguments as add_bench_arguments  # no torch at import
    from ssl_platform.bench_train import add_arguments as add_bench_train_arguments

    bench = sub.add_parser("bench", help="benchmarks",
                           description="Benchmarks: `sslp bench data`, `sslp bench train`.")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    bench_data = bench_commands.add_parser(
        "data", help="two-view augmentation throughput against a torchvision DataLoader",
        description="Two-view augmentation throughput (views/s) of the platform's Ray Data pipeline against a "
                    "torchvision-transforms DataLoader on the same JPEGs and cores, at 32 and 224 px.")
    add_bench_arguments(bench_data)
    add_bench_train_arguments(bench_commands.add_parser(
        "train", help="training throughput: compute bound, a plain DataLoader loop and sslp run",
        description="A preset's training throughput (samples/s) three ways on the same model, batch and cores: "
                    "the compute bound (a fixed batch), a plain PyTorch loop fed by a torchvision DataLoader, "
                    "and sslp run."))

    import importlib

    for module in COMMAND_MODULES.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # first, before threads allocate: this process and those it starts (ssl_platform.heap)
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
        if args.command in COMMAND_MODULES:
            import importlib

            return importlib.import_module(COMMAND_MODULES[args.command]).main(args)
        if args.command == "presets":
            from ssl_platform.tune.sweep import list_sweeps

            for name, description in list_presets().items():
                print(f"{name:<24} {description}")
            print("\nsweeps (sslp sweep NAME):")
            for name, description in list_sweeps().items():
                print(f"{name:<24} {description}")
            return 0
        if args.command == "sweep":
            from ssl_platform.tune.sweep import run_sweep

            return run_sweep(args.sweep, args.overrides, address=args.address, dashboard=not args.no_dashboard,
                             verbose=args.verbose)
        if args.command == "eval":
            return _eval(args)
        if args.command == "data":
            return _inspect(args)
        if args.command == "bench" and args.bench_command == "train":
            from ssl_platform.bench_train import run_from_args

            return run_from_args(args)
        if args.command == "bench":
            from ssl_platform.bench import run_from_args

            return run_from_args(args)
        if args.command == "demo":
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            cfg = load_config(DEMO_PRESET, [f"name=demo-{stamp}", *args.overrides])
        else:
            cfg = load_config(args.preset, args.overrides)  # a typo in a key stops here, before torch loads
        from ssl_platform import methods  # ssl_models and torch, not Ray
        if args.command == "run" and args.help_config:
            print(describe_keys(methods.method_params(cfg.method.name), methods.DERIVED,
                                methods.method_spec(cfg.method.name).objective_keys))
            print(f"method.name: one of {', '.join(methods.method_specs())} (each declares itself: ssl_models spec)")
            return 0
        methods.validate(cfg)
        if getattr(args, "dry_run", False):
            return _dry_run(cfg)
        return _run(cfg, args)
    except ConfigError as e:
        print(f"sslp: config error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _inspect(args: argparse.Namespace) -> int:
    """`sslp data inspect`: the kind's inspect function on a local Ray instance (or --address)."""
    import importlib
    import json
    from pathlib import Path

    from ssl_platform.data.skips import format_summary
    from ssl_platform.train.session import init_ray

    kind = args.kind or BUILTIN_KINDS.get(args.source, "image")
    module, function, options = {
        "image": ("images", "inspect_image", {"size": args.size, "channels": args.channels}),
        "image-caption": ("captions", "inspect_image_caption", {"size": args.size, "channels": args.channels}),
        "text": ("text", "inspect_text", {}),
        "audio": ("audio", "inspect_audio", {}),
    }[kind]
    if args.source not in BUILTIN_KINDS:  # a path that is not there is said before Ray starts (seconds)
        from ssl_platform.data.sources import locate

        try:
            locate(args.source, globs=True)
        except ValueError as e:
            print(f"sslp: data: {e}", file=sys.stderr)
            return EXIT_USAGE
    inspect = getattr(importlib.import_module(f"ssl_platform.data.{module}"), function)
    init_ray(None, dashboard=False)
    try:
        report = inspect(args.source, Path(args.out), strict=args.strict, fmt=args.format, **options)
    except (ValueError, FileNotFoundError) as e:  # a missing path, a wrong format, a strict-mode bad record
        print(f"sslp: data: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.source} ({kind}): {report['records']} usable records; {format_summary(report['skipped'])}")
    print("example batch:", json.dumps(report["example"], indent=2, default=str))
    if not report["records"]:
        print(f"sslp: data: {args.source}: no usable {kind} record; check the path, --kind and --format",
              file=sys.stderr)
        return EXIT_USAGE
    print(f"figure: {report['figure']}")
    return 0


def _dry_run(cfg: ExperimentConfig) -> int:
    import yaml

    s = cfg.scaling
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    cpus = "auto" if s.cpus_per_worker is None else f"{s.cpus_per_worker:g}"
    counts = worker_counts(cfg)
    if s.num_workers:
        print(f"# workers: {s.num_workers} x (CPU={cpus}{', GPU=1' if s.use_gpu else ''}), "
              f"data pipeline keeps {s.data_cpus:g} CPUs" + (f"; elastic: one of {counts}, as many as the cluster "
                                                             f"holds" if s.elastic else ""))
    else:
        print("# local mode (scaling.num_workers=0): the loop runs in this process; Ray Data uses the cluster's CPUs")
    print(f"# global batch {cfg.train.batch_size} = " + " or ".join(
        f"{max(1, n)} x {cfg.train.batch_size // max(1, n)}" for n in counts) + " per worker")
    print(f"# run directory: {cfg.run_location()}")
    return 0


def _run(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    # Imported here so `sslp presets` and config errors answer without importing Ray and torch.
    from ssl_platform.train.console import LOG_FILE
    from ssl_platform.train.session import StorageError
    from ssl_platform.train.storage import completed_run, copy_to_storage, local_checkpoint, run_paths
    from ssl_platform.train.trainer import fit

    if args.max_failures and cfg.scaling.num_workers == 0:  # before Ray starts (fit() says the same)
        print("sslp: resources: scaling.num_workers=0 trains in this process: it cannot be restarted "
              "(--max-failures needs Ray Train workers); set scaling.num_workers=1 or more", file=sys.stderr)
        return EXIT_USAGE
    t0 = time.perf_counter()
    paths = run_paths(cfg)
    try:
        done = completed_run(paths, cfg.train.max_steps)
    except StorageError as e:
        print(f"sslp: storage: {e}", file=sys.stderr)
        return EXIT_USAGE
    if done:
        # Resuming would restore the final checkpoint and stop at once; say so instead of starting Ray.
        print(f"run {cfg.name} is already complete: step {done['steps']} of train.max_steps={cfg.train.max_steps}, "
              f"checkpoint {done['checkpoint']}; raise train.max_steps to train further or set a new name=",
              flush=True)
        if not cfg.eval.enabled or (paths.local / "results.json").is_file():
            return 0

    def train_and_evaluate() -> None:
        print(f"run directory: {paths.uri}", flush=True)
        checkpoint = done["checkpoint"] if done else None
        if not done:
            summary = fit(cfg, paths, max_failures=args.max_failures)
            print(summary.text(), flush=True)
            checkpoint = summary.checkpoint
        if cfg.eval.enabled:
            from ssl_platform.evaluate import evaluate_run

            try:
                evaluate_run(cfg, local_checkpoint(paths, checkpoint), paths.local)
            except KeyboardInterrupt:  # training is complete; a re-run only evaluates
                raise Interrupted(f"interrupted during evaluation; run the same command again to evaluate the "
                                  f"finished checkpoint {checkpoint}") from None
            copy_to_storage(paths, "results.json", "results.md", "report.png")

    console = quiet_console(args, paths.local / LOG_FILE)  # Ray's lines (appended when the run is resumed)
    status = on_ray(args, train_and_evaluate, interrupted=f"interrupted; the newest checkpoint stays in {paths.uri}. "
                                                         f"Run the same command again to resume.", console=console)
    copy_to_storage(paths, LOG_FILE)  # a URI run keeps Ray's log beside its other files
    if status == 0:
        print(f"run directory: {paths.uri} (done in {time.perf_counter() - t0:.0f} s)", flush=True)
    return status


def _eval(args: argparse.Namespace) -> int:
    """`sslp eval`: the run's config (with eval.* overrides) and newest checkpoint -> the table."""
    from pathlib import Path

    try:
        checkpoint, raw = resolve_checkpoint(Path(args.target))
    except FileNotFoundError as e:
        print(f"sslp: eval: {e}", file=sys.stderr)
        return EXIT_USAGE
    bad = [o for o in args.overrides if not o.startswith("eval.")]
    if bad:
        print(f"sslp: config error: {bad[0]}: `sslp eval` takes eval.* settings only; the model and data are the "
              f"run's own", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = with_overrides(raw, ["eval.enabled=true", *args.overrides])
    except ConfigError as e:
        print(f"sslp: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out) if args.out else (checkpoint.parent if (checkpoint.parent / "config.yaml").is_file()
                                           else checkpoint)
    print(f"evaluating {cfg.method.name} checkpoint {checkpoint}", flush=True)

    def evaluate() -> None:
        from ssl_platform.evaluate import evaluate_run

        try:
            evaluate_run(cfg, checkpoint, out)
        except (ValueError, FileNotFoundError) as e:
            from ssl_platform.train.session import DataError

            raise DataError(str(e)) from None
        print(f"results: {out / 'results.md'}, {out / 'report.png'}", flush=True)

    from ssl_platform.train.console import LOG_FILE

    return on_ray(args, evaluate, interrupted="interrupted during evaluation; nothing was written",
                  console=quiet_console(args, out / LOG_FILE))


if __name__ == "__main__":
    sys.exit(main())

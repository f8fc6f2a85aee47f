"""Bad records are skipped, counted and reported, or (``data.strict=true``) fail the run.

A corrupt image, an undecodable audio file, an empty text or a missing caption must neither
crash a run deep inside Ray nor vanish silently. Every decode step takes a
:class:`SkipReporter`; for each bad record it calls ``reporter.skip(source, reason)``, which

- with ``strict=True`` raises :class:`BadRecordError` naming the record (the run stops);
- otherwise counts it locally and, at ``flush()`` (once per batch), sends the counts to the
  run's ledger actor (waiting for it, so a finished Dataset's counts are all in) and to the
  ``sslp_data_skipped_records`` Prometheus counter.

The driver reads the totals with :func:`skip_summary` for the run summary and the metrics.
Without Ray (unit tests) a reporter with ``ledger=None`` only counts locally.

    reporter = SkipReporter(ledger_name("my-run"), strict=False)
    ledger = get_or_create_ledger(ledger_name("my-run"))   # on the driver, before the Dataset runs
    ...
    skip_summary(ledger)  # {"total": 3, "by_reason": {"corrupt image": 2, "empty text": 1}, "examples": {...}}
"""

from __future__ import annotations

from collections import Counter, defaultdict

NAMESPACE = "sslp"
EXAMPLES_PER_REASON = 5  # record ids kept per reason, enough to find the culprits
SKIPPED_METRIC = "sslp_data_skipped_records"


class BadRecordError(ValueError):
    """A record could not be used and ``data.strict=true``; the message names the record."""


def ledger_name(run_name: str) -> str:
    return f"sslp-skips-{run_name}"


class _Ledger:
    """Totals of skipped records for one run (the body of the ledger actor)."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def record(self, counts: dict[str, int], examples: dict[str, list[str]]) -> None:
        self.counts.update(counts)
        for reason, sources in examples.items():
            kept = self.examples[reason]
            kept.extend(sources[: EXAMPLES_PER_REASON - len(kept)])

    def summary(self) -> dict:
        return {"total": sum(self.counts.values()), "by_reason": dict(self.counts),
                "examples": {k: list(v) for k, v in self.examples.items()}}

    def reset(self) -> None:
        self.counts.clear()
        self.examples.clear()


def on_this_node():
    """The scheduling strategy that keeps a run's own actor (the ledger, the stop flag) on the
    driver's node: a node that leaves (an elastic run goes on without it) must not take them along."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def get_or_create_ledger(name: str):
    """The named ledger actor of a run (created on first use). Ray must be initialised."""
    import ray

    actor = ray.remote(num_cpus=0)(_Ledger)
    return actor.options(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                         scheduling_strategy=on_this_node()).remote()


def skip_summary(ledger) -> dict:
    import ray

    return ray.get(ledger.summary.remote())


def format_summary(summary: dict) -> str:
    """One line for the run summary: ``skipped 3 records: corrupt image 2 (a.png, b.png), ...``."""
    if not summary.get("total"):
        return "skipped 0 records"
    parts = []
    for reason, n in sorted(summary["by_reason"].items(), key=lambda kv: -kv[1]):
        examples = summary.get("examples", {}).get(reason, [])
        parts.append(f"{reason} {n}" + (f" (e.g. {', '.join(examples[:3])})" if examples else ""))
    return f"skipped {summary['total']} records: " + "; ".join(parts)


class SkipReporter:
    """Picklable handle a decode step uses to skip (or, when strict, reject) bad records.

    Args:
        ledger: name of the run's ledger actor (see :func:`ledger_name`), or None to count
            locally only (tests, tools without Ray).
        strict: raise :class:`BadRecordError` on the first bad record instead of skipping it.
    """

    def __init__(self, ledger: str | None = None, strict: bool = False):
        self.ledger = ledger
        self.strict = strict
        self.counts: Counter[str] = Counter()  # since the last flush
        self.total: Counter[str] = Counter()  # over this reporter's life (this process only)
        self._examples: dict[str, list[str]] = defaultdict(list)
        self._metric = None

    def __getstate__(self) -> dict:
        # Only the configuration travels to Ray workers; counts are per process.
        return {"ledger": self.ledger, "strict": self.strict}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["ledger"], state["strict"])

    def skip(self, source: str, reason: str) -> None:
        """Count one bad record; ``source`` identifies it (path, shard/key, row number)."""
        if self.strict:
            raise BadRecordError(f"{source}: {reason} (data.strict=true; set data.strict=false to skip such records)")
        self.counts[reason] += 1
        self.total[reason] += 1
        if len(self._examples[reason]) < EXAMPLES_PER_REASON:
            self._examples[reason].append(str(source))

    def flush(self) -> None:
        """Send the counts since the last flush to the ledger and the metric (once per batch)."""
        if not self.counts:
            return
        counts, examples = dict(self.counts), dict(self._examples)
        self.counts.clear()
        self._examples = defaultdict(list)
        if self.ledger is None:
            return
        import ray
        from ray.util.metrics import Counter as MetricCounter

        try:
            ledger = ray.get_actor(self.ledger, namespace=NAMESPACE)
        except ValueError:  # no ledger (a Dataset used outside a platform run): local counts only
            ledger = None
        if ledger is not None:
            # Waited for, so that once the Dataset has finished the ledger holds every count: a
            # round trip per batch that had skips, none for clean batches.
            ray.get(ledger.record.remote(counts, examples))
        if self._metric is None:
            self._metric = MetricCounter(SKIPPED_METRIC, description="records skipped by the data pipeline",
                                         tag_keys=("run", "reason"))
        run = self.ledger.removeprefix("sslp-skips-")
        for reason, n in counts.items():
            self._metric.inc(n, tags={"run": run, "reason": reason})

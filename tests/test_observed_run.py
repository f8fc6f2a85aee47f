"""One real 2-worker run, watched the two ways a user watches one: what the run writes and reports
(online evaluation in metrics.jsonl and in the results Ray Train and Tune see), and what Ray's
Prometheus endpoint exports for the Grafana dashboard. One run serves both claims because a run
is the costly part (~25 s of process start-up on 2 cores); each claim has its own test.
"""

import concurrent.futures
import json
import re
import time
import urllib.request

import pytest
from conftest import skip_a_record
from test_dashboards import DASHBOARD, metric_names, queries

from ssl_platform.train.metrics import read_metrics

pytestmark = pytest.mark.ray

STEPS = 120  # long enough (~10 s of training) for several metric exports (every 2 s, see conftest)
ONLINE_EVERY, CHECKPOINT_EVERY, LOG_EVERY = 5, 60, 2
RUN = "observed-run"


class _RecordReports:
    """A Ray Train callback (it runs in the controller) that appends rank 0's reported metrics to a file."""

    def __new__(cls, path: str):
        import ray.train

        class Recorder(ray.train.UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                with open(path, "a") as f:
                    f.write(json.dumps({**metrics[0], "has_checkpoint": checkpoint is not None}) + "\n")

        return Recorder()


def _scrape(port: int, wanted: set[str], run: str, running, seconds: float = 300) -> dict[str, list[float]]:
    """name -> the latest values of its samples on Ray's metrics endpoint (the platform's own only
    for ``run``: the session's head serves other runs too), polled while ``running()`` until every
    wanted name has been seen. The export is periodic, and a finished worker's gauges leave the
    endpoint, as they do for a Prometheus that scrapes a real cluster: so the scrape runs beside
    the training. ``seconds`` only keeps a broken run from hanging the test."""
    deadline = time.monotonic() + seconds
    seen: dict[str, list[float]] = {}
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        samples: dict[str, list[float]] = {}
        for line in text.splitlines():
            if line.startswith("ray_data_") or (line.startswith("ray_sslp_") and f'run="{run}"' in line):
                name, value = re.match(r"([A-Za-z0-9_:]+)(?:\{.*\})?\s+(\S+)", line).groups()
                samples.setdefault(name, []).append(float(value))
        seen.update(samples)
        if wanted <= set(seen) or not running() or time.monotonic() > deadline:
            return seen
        time.sleep(2)  # the export's own period (conftest); a scrape is ~1 MB of text to parse


@pytest.fixture(scope="module")
def observed(ray_session, tmp_path_factory):
    """(summary, the run's local directory, rank 0's reports, the scraped samples, the wanted names)."""

    from ssl_platform.config import load_config
    from ssl_platform.train.storage import run_paths
    from ssl_platform.train.trainer import fit

    root = tmp_path_factory.mktemp("observed")
    cfg = load_config("simclr-digits", [
        "model.encoder_widths=[4,8]", "model.projector_width=16", "model.projector_dim=8", f"name={RUN}",
        f"runs_dir={root / 'runs'}", f"train.max_steps={STEPS}", "train.batch_size=16", f"train.log_every={LOG_EVERY}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.warmup_steps=0", "train.optimizer=adamw",
        "train.lr=0.001", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "eval.enabled=false",
        f"eval.online_every={ONLINE_EVERY}", "eval.online_examples=64"])

    skip_a_record(RUN, "corrupt image")  # the skipped-records counter, with Ray's name for a counter
    # Every platform and Ray Data metric the dashboard plots, bar tokens/s (text methods only); Ray
    # exports the Ray Data ones for the run's training dataset. (Node, autoscaler and Ray Train
    # metrics come from the dashboard's agent and Ray's autoscaler, which the suite's head leaves
    # out: test_prometheus.py runs them.)
    dashboard = json.loads(DASHBOARD.read_text())
    wanted = {name for _, q in queries(dashboard) for name in metric_names(q)
              if name.startswith(("ray_sslp_", "ray_data_"))} - {"ray_sslp_train_tokens_per_second"}
    reports = root / "reports.jsonl"
    paths = run_paths(cfg)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        run = pool.submit(fit, cfg, paths, callbacks=[_RecordReports(str(reports))])
        samples = _scrape(ray_session.metrics_port, wanted, run=RUN, running=lambda: not run.done())
        summary = run.result()
    return summary, paths.local, reports, samples, wanted


def test_fit_reports_and_logs_the_online_metric(observed):
    summary, run_dir, reports, *_ = observed
    assert summary.steps == STEPS
    online = list(range(ONLINE_EVERY, STEPS + 1, ONLINE_EVERY))
    rows = read_metrics(run_dir / "metrics.jsonl")
    # Every log_every-th step, and every online step (5, 15, ...) is also a row.
    assert [r["step"] for r in rows] == sorted(set(range(LOG_EVERY, STEPS + 1, LOG_EVERY)) | set(online))
    with_val = {r["step"]: r for r in rows if "val_knn_top1" in r}
    assert sorted(with_val) == online
    assert all(0 <= r["val_knn_top1"] <= 1 and r["online_eval_s"] > 0 for r in with_val.values())

    reported = [json.loads(line) for line in reports.read_text().splitlines()]
    assert [(r["step"], r["has_checkpoint"]) for r in reported] == [(s, s % CHECKPOINT_EVERY == 0) for s in online]
    for r in reported:  # what Tune sees: the metric in every result, equal to the metrics row
        assert r["val_knn_top1"] == pytest.approx(with_val[r["step"]]["val_knn_top1"])


def test_a_run_exposes_the_dashboards_metrics_on_rays_prometheus_endpoint(observed):
    *_, samples, wanted = observed
    assert wanted <= set(samples), f"not exported: {wanted - set(samples)}"
    for name in ("ray_sslp_train_loss", "ray_sslp_train_samples_per_second", "ray_sslp_train_step_seconds",
                 "ray_sslp_train_learning_rate", "ray_sslp_train_grad_norm", "ray_sslp_online_metric",
                 "ray_sslp_data_skipped_records_total"):
        assert all(v > 0 for v in samples[name]), (name, samples[name])
    [step] = samples["ray_sslp_train_step"]
    assert 1 <= step <= STEPS and step.is_integer()

"""Monitoring as it runs on a cluster's head node: a real Prometheus (Debian's `prometheus`),
started by `sslp dashboards start`'s code with the scrape configuration Ray generates, finds every
metrics endpoint through the service-discovery file Ray's dashboard keeps and scrapes a real Ray
head while a tiny run trains on it (Ray Data pipeline + Ray Train fit); then **every** query of the
Grafana dashboard, with its variables set to this session and this run, returns data through
Prometheus's HTTP API.

The head is this module's own: the service-discovery file and the node metrics (GPUs, object
store) come from Ray's dashboard and its agent, which the suite's shared head leaves out. Its
autoscaler and dashboard export their metrics on ports of their own (Ray's defaults are fixed
ports another cluster on the machine may hold). The machine has no GPU: the dashboard agent of
this head reads one stand-in GPU through a stand-in of NVML (Ray's own pynvml module replaced in
that process only), so the GPU panels run Ray's real reporting code and Prometheus's real queries.

The same run is watched the other way a user watches one: what it writes and reports (online
evaluation in metrics.jsonl and in the results Ray Train and Tune see). One run serves all these
claims because a run with workers is the costly part (~80 CPU-s on 2 cores); each has its own test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import QUIET, free_ports, leave_shared_driver, skip_a_record, start_head, stop_head, wait_for_head
from test_dashboards import DASHBOARD, queries

from ssl_platform.dashboards import start, stop
from ssl_platform.train.metrics import read_metrics

pytestmark = pytest.mark.ray

RUN = "prom-run"
CLUSTER = "sslp-test"
STEPS = 60
ONLINE_EVERY, CHECKPOINT_EVERY, LOG_EVERY = 5, 30, 2
SCRAPE_S = 1  # Prometheus's scrape interval here (Ray's generated configuration says 10 s)

# Loaded by every Python process of the head; it replaces Ray's NVML binding only in the dashboard
# agent (the process that reports node metrics), and only when that process imports it.
FAKE_NVML = textwrap.dedent('''
    import importlib.abc, importlib.util, sys, types

    class NVMLError(Exception):
        pass

    class _Memory:
        total, used, free = 80 * 2**30, 20 * 2**30, 60 * 2**30

    class _Utilization:
        gpu, memory = 42, 10

    def _missing(name):
        def call(*args, **kwargs):
            raise NVMLError(f"stand-in NVML has no {name}")
        return call

    def _nvml():
        m = types.ModuleType("ray._private.thirdparty.pynvml")
        m.NVMLError = NVMLError
        m.nvmlInit = m.nvmlShutdown = lambda: None
        m.nvmlDeviceGetCount = lambda: 1
        m.nvmlDeviceGetHandleByIndex = lambda i: i
        m.nvmlDeviceGetName = lambda h: "Stand-in GPU"
        m.nvmlDeviceGetUUID = lambda h: "GPU-stand-in-0"
        m.nvmlDeviceGetMemoryInfo = lambda h: _Memory
        m.nvmlDeviceGetUtilizationRates = lambda h: _Utilization
        m.nvmlDeviceGetComputeRunningProcesses = m.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []
        m.__getattr__ = _missing
        return m

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "ray._private.thirdparty.pynvml" and "dashboard/agent.py" in " ".join(sys.argv):
                return importlib.util.spec_from_loader(name, self)
            return None

        def create_module(self, spec):
            return _nvml()

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())
''')


def _need_prometheus() -> None:
    if shutil.which("prometheus") is None:
        pytest.fail("this test needs Prometheus: `apt-get install prometheus` (Debian's package; .ci/run installs it)")


def _get(url: str, **params: str) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    return json.loads(urllib.request.urlopen(url + query, timeout=30).read())


def _wait(what: str, ready, seconds: float = 120) -> None:
    """Poll ``ready()`` every second; fail naming ``what`` after ``seconds`` (only a broken set-up takes that long)."""
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(1)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """(Prometheus's URL, the head's Ray session name, the run's time window, the dashboard's URL, the
    run's local directory, rank 0's reports) after a run."""
    _need_prometheus()
    leave_shared_driver()  # the run below joins this module's own head from this process
    root = tmp_path_factory.mktemp("prom")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_NVML)
    autoscaler_port, dashboard_metrics_port, prom_port = free_ports(3)
    prom_url = f"http://127.0.0.1:{prom_port}"
    env = {"RAY_metrics_report_interval_ms": "1000", "AUTOSCALER_METRIC_PORT": str(autoscaler_port),
           "DASHBOARD_METRIC_PORT": str(dashboard_metrics_port), "RAY_PROMETHEUS_HOST": prom_url,
           "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    head, ports, temp_dir = start_head("--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                       f"--object-store-memory={100 * 2**20}", env=env)
    dashboard_url = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        wait_for_head(head, f"{dashboard_url}/api/version")
        # What the cluster files run on the head after `ray start --head` (the Grafana half needs Grafana,
        # which Debian does not package: not run here).
        lines = []
        start(temp_dir, prometheus_port=prom_port, grafana_port=None, scrape_interval=SCRAPE_S,
              cluster_label=CLUSTER, say=lines.append)
        assert lines[-1].startswith("started prometheus") and (Path(temp_dir) / "prometheus.yml").is_file()
        _wait("Prometheus to find the head's endpoints (node, autoscaler, dashboard)",
              lambda: len(_get(f"{prom_url}/api/v1/targets")["data"]["activeTargets"]) >= 3)
        began = time.time()
        run_dir, reports = _train(temp_dir, ports["--port"], root)
        time.sleep(3 * SCRAPE_S)  # the run's last exported values reach Prometheus
        window = {"start": f"{began:.3f}", "end": f"{time.time():.3f}"}
        session_name = Path(os.path.realpath(Path(temp_dir) / "session_latest")).name  # Ray's SessionName label
        yield prom_url, session_name, window, dashboard_url, run_dir, reports
    finally:
        stop(temp_dir)
        stop_head(head, temp_dir)


class _RecordReports:
    """A Ray Train callback (it runs in the controller) that appends rank 0's reported metrics to a file."""

    def __new__(cls, path: str):
        import ray.train

        class Recorder(ray.train.UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                with open(path, "a") as f:
                    f.write(json.dumps({**metrics[0], "has_checkpoint": checkpoint is not None}) + "\n")

        return Recorder()


def _train(temp_dir: str, gcs_port: int, root: Path) -> tuple[Path, Path]:
    """A tiny GPT run (Ray Data pipeline, 2 Ray Train workers) on the head, from this process; returns
    its local directory and the file of rank 0's reports."""
    import ray

    from ssl_platform.config import load_config
    from ssl_platform.data.context import configure_data_context
    from ssl_platform.train.storage import run_paths
    from ssl_platform.train.trainer import fit

    # GPT: a text method, so the tokens/s panel has data too; every other panel is method-agnostic.
    cfg = load_config("gpt-python-docs", [
        "model.dim=32", "model.depth=1", "data.vocab_size=512", "data.max_len=32", f"name={RUN}",
        f"runs_dir={root / 'runs'}", f"train.max_steps={STEPS}", "train.batch_size=16", f"train.log_every={LOG_EVERY}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.warmup_steps=0", "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5", "eval.enabled=false", f"eval.online_every={ONLINE_EVERY}",
        "eval.online_examples=64"])
    reports, paths = root / "reports.jsonl", run_paths(cfg)
    ray.init(address=f"127.0.0.1:{gcs_port}", runtime_env={"env_vars": QUIET}, log_to_driver=False)
    try:
        configure_data_context()
        skip_a_record(RUN, "corrupt record")  # the skipped-records panel has data too
        assert fit(cfg, paths, callbacks=[_RecordReports(str(reports))]).steps == STEPS
    finally:
        ray.shutdown()
    return paths.local, reports


def _substitute(query: str, session_name: str) -> str:
    """The query Grafana sends with the dashboard's variables set to this session, cluster and run (and
    the range of a 15-minute dashboard)."""
    values = {"SessionName": session_name, "Cluster": CLUSTER, "run": RUN, "metric": ".+", "datasource": "",
              "__rate_interval": "15s", "__range": "15m", "__interval": "5s"}
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], query)


def test_every_dashboard_query_returns_data_from_prometheus(monitored):
    """As Grafana asks over the run's time range: panels by query_range, variables by series. (A
    finished run's gauges leave Ray's endpoints, and Prometheus marks them stale: an instant query
    after the run finds nothing, a graph of the run's hour shows it.)"""
    prom_url, session_name, window, *_ = monitored
    empty, errors = [], []
    for where, query in queries(json.loads(DASHBOARD.read_text())):
        promql = _substitute(query, session_name)
        if where.startswith("variable"):  # label_values(selector, label): Grafana asks for the series
            selector, label = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", promql).groups()
            answer = _get(f"{prom_url}/api/v1/series", **{"match[]": selector}, **window)
            found = {s.get(label) for s in answer.get("data", [])} - {None}
        else:
            answer = _get(f"{prom_url}/api/v1/query_range", query=promql, step=f"{SCRAPE_S}s", **window)
            found = answer.get("data", {}).get("result", [])
        if answer.get("status") != "success":
            errors.append((where, promql, answer))
        elif not found:
            empty.append((where, promql))
    assert not errors, errors
    targets = [(t["scrapeUrl"], t["health"]) for t in _get(f"{prom_url}/api/v1/targets")["data"]["activeTargets"]]
    assert not empty, f"scraped {targets}; no data:\n" + "\n".join(f"{w}: {q}" for w, q in empty)


def test_the_run_and_its_dataset_are_labelled_with_the_run_name(monitored):
    prom_url, session_name, window, *_ = monitored
    runs = _get(f"{prom_url}/api/v1/label/run/values", **window)["data"]
    assert RUN in runs
    datasets = _get(f"{prom_url}/api/v1/label/dataset/values", **window)["data"]
    assert any(d.startswith(f"{RUN}_") for d in datasets), datasets
    [gpu] = _get(f"{prom_url}/api/v1/query_range", query=f'ray_node_gpus_utilization{{SessionName="{session_name}"}}',
                 step=f"{SCRAPE_S}s", **window)["data"]["result"]
    assert gpu["metric"]["GpuDeviceName"] == "Stand-in GPU" and {float(v) for _, v in gpu["values"]} == {42}


def test_rays_dashboard_reaches_prometheus(monitored):
    """RAY_PROMETHEUS_HOST, as the cluster files set it: the Ray dashboard's Metrics tab queries this Prometheus."""
    *_, dashboard_url, _, _ = monitored
    request = urllib.request.Request(f"{dashboard_url}/api/prometheus_health",
                                     headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
    answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
    assert answer["result"] is True, answer


def test_the_runs_own_metrics_reach_prometheus_with_its_values(monitored):
    """Beyond "every query has data": the platform's gauges carry the run's values (all positive for a
    run that trains), and its step gauge counts the run's steps."""
    prom_url, _, window, *_ = monitored
    for name in ("ray_sslp_train_loss", "ray_sslp_train_samples_per_second", "ray_sslp_train_tokens_per_second",
                 "ray_sslp_train_step_seconds", "ray_sslp_train_learning_rate", "ray_sslp_train_grad_norm",
                 "ray_sslp_online_metric", "ray_sslp_data_skipped_records_total"):
        result = _get(f"{prom_url}/api/v1/query_range", query=f'{name}{{run="{RUN}"}}', step=f"{SCRAPE_S}s",
                      **window)["data"]["result"]
        values = [float(v) for series in result for _, v in series["values"]]
        assert values and all(v > 0 for v in values), (name, values)
    result = _get(f"{prom_url}/api/v1/query_range", query=f'ray_sslp_train_step{{run="{RUN}"}}',
                  step=f"{SCRAPE_S}s", **window)["data"]["result"]
    steps = [float(v) for series in result for _, v in series["values"]]
    assert steps and all(1 <= s <= STEPS and s.is_integer() for s in steps), steps


def test_fit_reports_and_logs_the_online_metric(monitored):
    *_, run_dir, reports = monitored
    online = list(range(ONLINE_EVERY, STEPS + 1, ONLINE_EVERY))
    rows = read_metrics(run_dir / "metrics.jsonl")
    # Every log_every-th step, and every online step (5, 15, ...) is also a row.
    assert [r["step"] for r in rows] == sorted(set(range(LOG_EVERY, STEPS + 1, LOG_EVERY)) | set(online))
    with_val = {r["step"]: r for r in rows if "val_perplexity" in r}
    assert sorted(with_val) == online
    assert all(r["val_perplexity"] >= 1 and r["online_eval_s"] > 0 for r in with_val.values())

    reported = [json.loads(line) for line in reports.read_text().splitlines()]
    assert [(r["step"], r["has_checkpoint"]) for r in reported] == [(s, s % CHECKPOINT_EVERY == 0) for s in online]
    for r in reported:  # what Tune sees: the metric in every result, equal to the metrics row
        assert r["val_perplexity"] == pytest.approx(with_val[r["step"]]["val_perplexity"])


def test_the_restarts_panel_counts_each_restart_and_zero_for_a_run_without(tmp_path):
    """The Train restarts query on series shaped as Ray Train's controller sets them (1 for the state it
    is in, 0 for the one it left; a state's series appears when first entered), evaluated by
    Prometheus's own rule tester: two restarts count 2, a run that never restarted counts 0."""
    if shutil.which("promtool") is None:
        pytest.fail("this test needs promtool: `apt-get install prometheus` (Debian's package; .ci/run installs it)")
    [query] = [q for where, q in queries(json.loads(DASHBOARD.read_text())) if where == "panel 'Train worker restarts'"]
    values = {"SessionName": ".+", "Cluster": ".*", "run": ".+", "__range": "10m"}
    promql = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], query)
    state = 'ray_train_controller_state{{SessionName="s", ray_train_run_name="{}", ray_train_controller_state="{}"}}'
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": state.format("crashy", "RUNNING"), "values": "1 1 0 0 1 1 0 0 1 1"},
            {"series": state.format("crashy", "RESTARTING"), "values": "_ _ 1 0 0 0 1 0 0 0"},
            {"series": state.format("calm", "RUNNING"), "values": "1 1 1 1 1 1 1 1 1 1"}],
        "promql_expr_test": [{"expr": promql, "eval_time": "9m", "exp_samples": [
            {"labels": '{ray_train_run_name="crashy"}', "value": 2},
            {"labels": '{ray_train_run_name="calm"}', "value": 0}]}]}]}
    (tmp_path / "restarts.yml").write_text(json.dumps(tests))  # JSON is YAML
    done = subprocess.run(["promtool", "test", "rules", str(tmp_path / "restarts.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

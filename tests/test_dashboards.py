"""The Grafana dashboard (dashboards/ssl-platform.json) and `sslp dashboards install`.

Every metric a panel or variable queries must be one the platform emits (train.metrics.METRICS,
as Ray's Prometheus export names it), one Ray 2.60's Ray Data defines, or one Ray's own generated
dashboards query (both read from Ray's code here, not copied). That a real run exports every
platform and Ray Data metric on Ray's Prometheus endpoint, the platform's with non-zero values, is
tested in test_prometheus.py, where a real Prometheus scrapes a real run and answers every query of
the dashboard with data.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import free_ports

from ssl_platform.cli import main as sslp
from ssl_platform.dashboards import (
    DASHBOARD_FILES,
    GRAFANA_INI,
    PROMETHEUS_CONFIG,
    PROVISIONING_FILE,
    ray_dashboards_dir,
    shipped_dir,
    stop,
)
from ssl_platform.train.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "ssl-platform.json"
# How Ray's Prometheus export names a ray.util.metrics metric of each kind (checked by the run below).
EXPORTED = {"gauge": ("",), "counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def exported_names(name: str, kind: str) -> set[str]:
    return {f"ray_{name}{suffix}" for suffix in EXPORTED[kind]}


def platform_metric_names() -> set[str]:
    return set().union(*(exported_names(name, kind) for name, (kind, _) in METRICS.items()))


def ray_data_metric_names() -> set[str]:
    """Every metric Ray Data's stats actor defines (the ones Ray's Data dashboard plots), read by
    constructing the actor's class with recording stand-ins for Gauge, Counter and Histogram."""
    from ray.data._internal import stats

    defined = []

    def recorder(kind):
        class Recorder:
            def __init__(self, name, *args, **kwargs):
                defined.append((name, kind))

        return Recorder

    actor = stats._StatsActor.__ray_actor_class__
    # The module's namespace, and the one the class's methods see: once Ray has run a Dataset in
    # this process, Ray's actor machinery has given the class a copy of the module's globals.
    namespaces = {id(ns): ns for ns in (vars(stats), actor.__init__.__globals__)}.values()
    saved = [(ns, n, ns[n]) for ns in namespaces for n in ("Gauge", "Counter", "Histogram") if n in ns]
    try:
        for ns, n, _ in saved:
            ns[n] = recorder(n.lower())
        actor()
    finally:
        for ns, n, cls in saved:
            ns[n] = cls
    return set().union(*(exported_names(name, kind) for name, kind in defined))


def ray_dashboard_metric_names() -> set[str]:
    """Every metric Ray's own generated Grafana dashboards query (default, Train, Data: node, GPU,
    object store, autoscaler, Ray Train controller and worker metrics), read from Ray's panel definitions."""
    from ray.dashboard.modules.metrics.dashboards import (
        data_dashboard_panels,
        default_dashboard_panels,
        train_dashboard_panels,
    )

    configs = [default_dashboard_panels.default_dashboard_config, train_dashboard_panels.train_dashboard_config,
               data_dashboard_panels.data_dashboard_config]
    panels = [p for c in configs for p in [*c.panels, *(p for row in c.rows for p in row.panels)]]
    return set().union(*(metric_names(t.expr.replace("{{", "{").replace("}}", "}")) for p in panels for t in p.targets))


# PromQL words that are not metric names: aggregations, functions and keywords are followed by
# "(" or are in this set; label names only occur inside {...} and by/without (...).
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}


def metric_names(query: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values/query_result query) reads."""
    q = re.sub(r'"(?:[^"\\]|\\.)*"', '""', query)  # string literals (label values, regexes)
    q = re.sub(r"\{[^}]*\}", "", q)  # label matchers
    q = re.sub(r"\[[^\]]*\]", "", q)  # range durations
    q = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", q)  # label lists
    q = re.sub(r"^\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", r"\1", q)  # Grafana: (metric, label)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", q):
        rest = q[match.end():].lstrip()
        word = match.group()
        after_dollar = q[match.start() - 1:match.start()] == "$"
        if rest.startswith("(") or word in _KEYWORDS or word.startswith("$") or after_dollar:
            continue
        names.add(word)
    return names


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, query) for every panel target and every query variable."""
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    out += [(f"variable {v['name']!r}", v["query"]["query"]) for v in dashboard["templating"]["list"]
            if v["type"] == "query"]
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_extractor_finds_metric_names_and_only_them():
    assert metric_names('sum by (run, reason) (rate(ray_sslp_x_total{SessionName=~"$SessionName", '
                        'run=~"a|b"}[$__rate_interval]))') == {"ray_sslp_x_total"}
    assert metric_names('increase(ray_a{x="1"}[5m]) / increase(ray_b[5m])') == {"ray_a", "ray_b"}
    assert metric_names('label_values(ray_sslp_train_step{SessionName=~"$S"}, run)') == {"ray_sslp_train_step"}
    assert metric_names("max by (run) (ray_made_up_metric)") == {"ray_made_up_metric"}


def test_every_queried_metric_is_one_the_platform_or_ray_emits(dashboard):
    known = platform_metric_names() | ray_data_metric_names() | ray_dashboard_metric_names()
    assert {"ray_sslp_data_skipped_records_total", "ray_data_output_rows", "ray_node_gpus_utilization",
            "ray_object_store_memory", "autoscaler_pending_nodes", "ray_train_controller_state"} <= known
    found = {where: metric_names(query) for where, query in queries(dashboard)}
    assert all(found.values()), [where for where, names in found.items() if not names]
    unknown = {where: names - known for where, names in found.items() if names - known}
    assert not unknown, f"metrics no code defines: {unknown}"
    # ... and the check can fail: a made-up name next to a real one is caught.
    assert metric_names("ray_sslp_train_loss + ray_sslp_train_made_up") - known == {"ray_sslp_train_made_up"}


def test_every_platform_metric_has_a_panel_and_ray_data_has_a_row(dashboard):
    queried = set().union(*(metric_names(q) for where, q in queries(dashboard) if where.startswith("panel")))
    missing = {name for name, (kind, _) in METRICS.items() if not exported_names(name, kind) & queried}
    assert not missing, f"platform metrics without a panel: {missing}"
    titles = [p["title"] for p in dashboard["panels"]]
    for title in ("Loss", "Samples / s", "Tokens / s", "Step time", "Data wait fraction", "Learning rate",
                  "Gradient norm", "Step", "Online evaluation", "Skipped records / s"):
        assert title in titles
    rows = [i for i, p in enumerate(dashboard["panels"]) if p["type"] == "row"]
    data_row = next(i for i in rows if "Ray Data" in dashboard["panels"][i]["title"])
    data_panels = dashboard["panels"][data_row + 1:next((i for i in rows if i > data_row), None)]
    assert len(data_panels) >= 4
    assert all(name.startswith("ray_data_")
               for p in data_panels for t in p["targets"] for name in metric_names(t["expr"]))
    # Every panel is filtered by the run variable: the platform's metrics by their run tag, Ray Data's by
    # the dataset the trainer names after the run, Ray Train's by its run name, and Ray's node metrics
    # by the nodes (GPUs) or the clusters (object store, autoscaler) the selected runs ran on.
    run_filters = ('run=~"$run"', 'dataset=~"${run}_.+"', 'ray_train_run_name=~"$run"')
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            assert 'SessionName=~"$SessionName"' in t["expr"] and 'ray_io_cluster=~"$Cluster"' in t["expr"]
            assert any(f in t["expr"] for f in run_filters), p["title"]
            assert ('dataset=~"${run}_.+"' in t["expr"]) == ("ray_data_" in t["expr"]), p["title"]
    titles = [p["title"] for p in dashboard["panels"]]
    for title in ("GPU utilisation", "GPU memory", "Object store memory", "Spilled to disk", "Autoscaler: nodes",
                  "Train worker restarts"):
        assert title in titles


def test_variables_and_datasource_match_rays_dashboards(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"run", "SessionName", "Cluster", "metric"} <= set(variables)
    assert variables["run"]["query"]["query"].endswith(", run)")
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"]


def test_install_writes_the_shipped_json_and_refuses_an_unwritable_dir(tmp_path, capsys):
    assert shipped_dir() == DASHBOARD.parent and (DASHBOARD.name,) == DASHBOARD_FILES
    dest = tmp_path / "grafana" / "dashboards"
    assert sslp(["dashboards", "install", str(dest)]) == 0
    assert (dest / DASHBOARD.name).read_bytes() == DASHBOARD.read_bytes()
    assert str(dest / DASHBOARD.name) in capsys.readouterr().out

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert sslp(["dashboards", "install", str(blocker / "dashboards")]) == 2
    assert f"cannot write to {blocker / 'dashboards'}" in capsys.readouterr().err


def test_default_dir_is_the_one_rays_provisioning_names(tmp_path, capsys):
    """Without DIR: the folder that Ray's generated provisioning file (Ray's own template) lists."""
    from ray.dashboard.modules.metrics.templates import DASHBOARD_PROVISIONING_TEMPLATE

    assert sslp(["dashboards", "install", "--ray-temp-dir", str(tmp_path)]) == 2
    assert "start Ray on this node first" in capsys.readouterr().err

    target = tmp_path / "session_1" / "metrics" / "grafana" / "dashboards"
    provisioning = tmp_path / PROVISIONING_FILE
    provisioning.parent.mkdir(parents=True)
    provisioning.write_text(DASHBOARD_PROVISIONING_TEMPLATE.format(dashboard_output_folder=target))
    assert ray_dashboards_dir(str(tmp_path)) == target
    assert sslp(["dashboards", "install", "--ray-temp-dir", str(tmp_path)]) == 0
    assert (target / DASHBOARD.name).read_bytes() == DASHBOARD.read_bytes()


def _ray_session_files(root: Path) -> Path:
    """The Grafana and Prometheus files Ray's dashboard writes for a session (Ray's own templates)."""
    from ray.dashboard.modules.metrics.templates import (
        DASHBOARD_PROVISIONING_TEMPLATE,
        GRAFANA_INI_TEMPLATE,
        PROMETHEUS_YML_TEMPLATE,
    )

    session = root / "session_1"
    grafana = session / "metrics" / "grafana"
    (session / PROVISIONING_FILE.parent.relative_to("session_latest")).mkdir(parents=True)
    (session / "metrics" / "prometheus").mkdir(parents=True)
    (root / "session_latest").symlink_to(session)
    (root / PROVISIONING_FILE).write_text(DASHBOARD_PROVISIONING_TEMPLATE.format(
        dashboard_output_folder=grafana / "dashboards"))
    (root / GRAFANA_INI).write_text(GRAFANA_INI_TEMPLATE.format(grafana_provisioning_folder=grafana / "provisioning"))
    (root / PROMETHEUS_CONFIG).write_text(PROMETHEUS_YML_TEMPLATE.format(
        prom_metrics_service_discovery_file_path=session / "prom_metrics_service_discovery.json"))
    return session


def test_start_refuses_without_a_ray_session_or_a_binary(tmp_path, capsys, monkeypatch):
    assert sslp(["dashboards", "start", "--ray-temp-dir", str(tmp_path)]) == 2
    assert "start Ray with its dashboard on this node first" in capsys.readouterr().err

    _ray_session_files(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert sslp(["dashboards", "start", "--ray-temp-dir", str(tmp_path)]) == 2
    assert "prometheus is not installed on this node" in capsys.readouterr().err
    assert (tmp_path / "session_1/metrics/grafana/dashboards" / DASHBOARD.name).is_file()  # installed first


def test_start_runs_grafana_with_rays_configuration_and_reports_its_failure(tmp_path, capsys, monkeypatch):
    """Prometheus (real, Debian's) starts on Ray's generated configuration; Grafana is a stand-in that
    records its command line and exits 1 (Debian has no Grafana): the command names it and its log."""
    if shutil.which("prometheus") is None:
        pytest.fail("this test needs Prometheus: `apt-get install prometheus` (Debian's package; .ci/run installs it)")
    session = _ray_session_files(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "grafana").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/grafana.args\necho no web server\nexit 1\n')
    (bin_dir / "grafana").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    prom_port, grafana_port = free_ports(2)
    try:
        code = sslp(["dashboards", "start", "--ray-temp-dir", str(tmp_path), "--prometheus-port", str(prom_port),
                     "--grafana-port", str(grafana_port)])
        out, err = capsys.readouterr()
        assert code == 2 and f"started prometheus (pid {(tmp_path / 'prometheus.pid').read_text()})" in out
        assert "grafana did not start (exited 1" in err and "no web server" in err
        assert (tmp_path / "grafana.args").read_text().split() == [
            "server", "--homepath", "/usr/share/grafana", "--config", str(session / "metrics/grafana/grafana.ini"),
            f"cfg:default.paths.data={tmp_path / 'grafana'}", f"cfg:default.paths.logs={tmp_path / 'grafana'}",
            "cfg:default.server.http_addr=127.0.0.1", f"cfg:default.server.http_port={grafana_port}"]
        config = (tmp_path / "prometheus.yml").read_text()
        assert str(session / "prom_metrics_service_discovery.json") in config  # Ray's scrape targets
    finally:
        stop(str(tmp_path))

"""The cluster launchers in clusters/ are checked here the way their tools would check them,
without a cloud account or a Kubernetes cluster: every `ray up` YAML against the JSON schema Ray
ships and through Ray's own config preparation and validation (what `ray up` does before it
calls the cloud); every KubeRay manifest for the fields the operator needs; the images and
rayVersion against the installed Ray; and every `sslp` command they run or quote (RayJob
entrypoints, the commands in their header comments) against the real command line, presets,
config schema and sweeps, so a renamed preset or key breaks a test rather than a cluster job.
No Ray instance is started.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ssl_platform import methods
from ssl_platform.cli import build_parser
from ssl_platform.config import ConfigError, load_config
from ssl_platform.tune.spec import load_sweep

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
RAY_UP = ("aws.yaml", "gcp.yaml", "onprem.yaml")
KUBERAY = ("kuberay/raycluster.yaml", "kuberay/rayjob-pretrain.yaml", "kuberay/rayjob-sweep.yaml")
RAY_CPU_IMAGE = f"rayproject/ray:{ray.__version__}-py311-cpu"  # the project image's base; the RayJob submitters
# The image clusters/Dockerfile builds: every node and Ray pod runs it.
PROJECT_IMAGE = f"YOUR-REGISTRY/ssl-platform:0.1.0-ray{ray.__version__}-py311-gpu"
A2_HIGHGPU_8G_ALLOCATABLE_GI = 600  # 680 GB = 633 GiB, less the kubelet's reservations and eviction threshold
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def ray_resource(name: str) -> dict:
    """The one ray.io/v1 object of a KubeRay file (the sweep's file also holds its volume claim)."""
    docs = [d for d in yaml.safe_load_all((CLUSTERS / name).read_text()) if d]
    ours = [d for d in docs if d.get("apiVersion") == "ray.io/v1"]
    assert len(ours) == 1, f"{name}: expected one ray.io/v1 object, found {len(ours)}"
    return ours[0]


def cluster_spec(obj: dict) -> dict:
    return obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterSpec"]


# ----------------------------------------------------------------------------- ray up

@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_yaml_passes_rays_schema_and_validator(name):
    raw = load(name)
    jsonschema.validate(raw, SCHEMA)  # as written
    # What `ray up` does before it asks the cloud for anything: merge the provider's defaults,
    # the setup commands and per-type worker limits (on-prem: its single node type), then validate.
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_the_schema_check_rejects_misspelt_keys():
    raw = load("aws.yaml")
    typo = copy.deepcopy(raw)
    typo["head_start_ray_command"] = typo.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_command"):
        jsonschema.validate(typo, SCHEMA)
    typo = copy.deepcopy(raw)
    typo["available_node_types"]["gpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(typo))
    typo = copy.deepcopy(raw)
    typo["head_node_type"] = "haed"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(typo))


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_nodes_run_the_project_image_with_token_auth_and_a_local_dashboard(name):
    raw = load(name)
    text = (CLUSTERS / name).read_text()
    assert raw["docker"]["image"] == PROJECT_IMAGE
    assert not {"head_image", "worker_image"} & set(raw["docker"])
    head = " ".join(raw["head_start_ray_commands"])
    worker = " ".join(raw["worker_start_ray_commands"])
    for flag in ("--head", "--dashboard-host=127.0.0.1", "--metrics-export-port=8080", "--num-cpus=0"):
        assert flag in head, f"{name}: head start command lacks {flag}"
    assert "0.0.0.0" not in head  # opting in is the operator's edit, not the default
    assert "--metrics-export-port=8080" in worker and "$RAY_HEAD_IP" in worker
    # Nothing heavy at boot: the image holds everything, no node pip-installs anything.
    types = raw.get("available_node_types", {}).values()
    boot = [*raw.get("setup_commands", []), *raw.get("head_setup_commands", []), *raw.get("worker_setup_commands", []),
            *(c for t in types for c in t.get("worker_setup_commands", []))]
    assert not [c for c in boot if "pip install" in c or "conda install" in c], boot
    assert not [local for local in raw["file_mounts"].values() if local == "."], "the checkout is not shipped"
    # Token authentication: the mode in every container's environment, the token where Ray looks.
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
    assert raw["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    assert "ray get-auth-token --generate" in text and f"ray up clusters/{name}" in text
    assert "--gpus all" not in text  # Ray adds --runtime=nvidia, never --gpus


def test_aws_head_can_pass_the_workers_role():
    types = load("aws.yaml")["available_node_types"]
    assert types["head"]["node_config"]["IamInstanceProfile"]["Arn"].endswith("/YOUR-HEAD-PROFILE")
    for name in ("gpu", "cpu"):
        assert "IamInstanceProfile" in types[name]["node_config"]
    readme = (CLUSTERS / "README.md").read_text()
    assert '"iam:PassRole"' in readme and "YOUR-WORKER-ROLE" in readme


def test_gcp_gpu_nodes_wait_for_the_nvidia_driver_before_the_container_starts():
    raw = load("gcp.yaml")
    for name, t in raw["available_node_types"].items():
        waits = " ".join(t.get("initialization_commands", []))
        if t["resources"].get("GPU"):
            assert {"key": "install-nvidia-driver", "value": "True"} in t["node_config"]["metadata"]["items"]
            assert re.search(r"timeout \d+ bash -c 'until nvidia-smi", waits), name
        else:  # a CPU node would wait out the timeout and fail its setup
            assert "nvidia-smi" not in waits, name
    assert raw["initialization_commands"] == []


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_clusters_have_an_idle_head_and_autoscaling_gpu_and_cpu_groups(name):
    raw = load(name)
    types = raw["available_node_types"]
    head = types.pop(raw["head_node_type"])
    assert head["resources"]["CPU"] == 0  # no training or data task ever lands on the head
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu = [t for t in types.values() if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0]
    assert gpu and cpu, f"{name}: needs a GPU worker group and a CPU worker group"
    for group in gpu + cpu:
        assert group["min_workers"] == 0 < group["max_workers"] <= raw["max_workers"]


# ----------------------------------------------------------------------------- KubeRay

@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_carries_what_the_operator_requires(name):
    obj = ray_resource(name)
    assert obj["kind"] in ("RayCluster", "RayJob")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    spec = cluster_spec(obj)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    # KubeRay's rayStartParams is map[string]string: a bare number or boolean is refused.
    assert all(isinstance(v, str) for v in params.values()), params
    # 0.0.0.0: the head service (port-forward, the operator, Prometheus) reaches the dashboard; the
    # service is ClusterIP and every request needs the token the operator generates.
    assert params["dashboard-host"] == "0.0.0.0" and params["metrics-export-port"] == "8080"
    assert spec["authOptions"] == {"mode": "token"}
    assert params["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]

    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert isinstance(g["replicas"], int) and 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
        assert g["rayStartParams"]["metrics-export-port"] == "8080"
        assert g["template"]["spec"]["containers"][0]["image"]
    mounts = [m["name"] for c in _containers(spec) for m in c.get("volumeMounts", [])]
    volumes = [v["name"] for t in _templates(spec) for v in t["spec"].get("volumes", [])]
    assert set(mounts) <= set(volumes), f"{name}: a volumeMount names no volume"

    # Every Ray pod: /dev/shm in memory (Kubernetes' default is 64 MB), sized within the pod's memory.
    for template in _templates(spec):
        shm = [v for v in template["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory", f"{name}: a pod without a memory /dev/shm"
        container = template["spec"]["containers"][0]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        memory = container["resources"]["requests"]["memory"]
        assert memory == container["resources"]["limits"]["memory"]
        assert _gi(shm[0]["emptyDir"]["sizeLimit"]) < _gi(memory) / 2
        if "nvidia.com/gpu" in container["resources"]["limits"]:
            assert _gi(memory) <= A2_HIGHGPU_8G_ALLOCATABLE_GI, f"{name}: a GPU pod no a2-highgpu-8g can hold"

    if obj["kind"] == "RayJob":
        job = obj["spec"]
        assert isinstance(job["entrypoint"], str) and job["entrypoint"].startswith("sslp ")
        assert job["shutdownAfterJobFinishes"] is True
        assert isinstance(job["backoffLimit"], int) and job["backoffLimit"] >= 1
        assert isinstance(job["activeDeadlineSeconds"], int) and job["activeDeadlineSeconds"] > 0
        submitter = job["submitterPodTemplate"]["spec"]
        assert submitter["restartPolicy"] == "Never"
        assert [c["image"] for c in submitter["containers"]] == [RAY_CPU_IMAGE]  # no CUDA torch to run `ray job submit`
        text = (CLUSTERS / name).read_text()
        assert "Re-applying" not in text and "kubectl delete" in text  # an ended RayJob is not re-run by apply
    assert f"kubectl apply -f clusters/{name}" in (CLUSTERS / name).read_text()


def _gi(quantity: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "Ti": 1024.0}
    return float(quantity[:-2]) * units[quantity[-2:]]


def _templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _containers(spec: dict) -> list[dict]:
    return [c for t in _templates(spec) for c in t["spec"]["containers"]]


def test_raycluster_has_gpu_and_cpu_worker_groups():
    groups = {g["groupName"]: g for g in cluster_spec(ray_resource("kuberay/raycluster.yaml"))["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu_limits = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) > 0 and "nvidia.com/gpu" not in cpu_limits
    for g in groups.values():
        assert g["minReplicas"] == 0 < g["maxReplicas"]  # the autoscaler adds pods on demand


def test_sweep_job_mounts_one_shared_volume_where_its_runs_dir_points():
    docs = [d for d in yaml.safe_load_all((CLUSTERS / "kuberay/rayjob-sweep.yaml").read_text()) if d]
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    job = ray_resource("kuberay/rayjob-sweep.yaml")
    spec = cluster_spec(job)
    runs_dir = next(a.split("=", 1)[1] for a in shlex.split(job["spec"]["entrypoint"]) if a.startswith("runs_dir="))
    for template in _templates(spec):
        volumes = template["spec"]["volumes"]
        claim = [v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v]
        assert claim and claims[claim[0]]["spec"]["accessModes"] == ["ReadWriteMany"]
        mount = [m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"] if m["name"] == "shared"]
        assert mount and runs_dir.startswith(mount[0] + "/"), "every pod must see the sweep's runs_dir"


def test_images_and_ray_versions_agree():
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    # One CUDA stack: Ray's CPU image, CUDA from torch's wheel; Ray pinned to the installed version.
    assert re.findall(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M) == [ray.__version__]
    *monitoring, base = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert base == "rayproject/ray:${RAY_VERSION}-py311-cpu"
    # Prometheus and Grafana come from their release images, for `sslp dashboards start` on the head.
    assert [m.split(":")[0] for m in monitoring] == ["prom/prometheus", "grafana/grafana-oss"]
    assert "COPY --from=prometheus" in dockerfile and "COPY --from=grafana" in dockerfile
    assert '"ray[default,data,train,tune]==${RAY_VERSION}"' in dockerfile
    assert "NVIDIA_VISIBLE_DEVICES=all" in dockerfile  # the NVIDIA runtime exposes GPUs only when asked
    project_images = {c["image"] for name in KUBERAY for c in _containers(cluster_spec(ray_resource(name)))}
    project_images |= {load(name)["docker"]["image"] for name in RAY_UP}
    assert project_images == {PROJECT_IMAGE}, f"the cluster files use different images: {project_images}"
    assert f"-t {PROJECT_IMAGE} ." in dockerfile  # the build command makes the image the cluster files pull


# ----------------------------------------------------------------------------- sslp commands

def sslp_commands(name: str) -> list[list[str]]:
    """Every `sslp run|sweep|submit ...` a file runs or quotes: RayJob entrypoints, command lines
    in comments (README: in code blocks); a trailing backslash continues on the next line."""
    text = (CLUSTERS / name).read_text()
    lines, joined, fenced = [], "", False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        quoted = fenced if name.endswith(".md") else line.lstrip().startswith("#")
        if not quoted:
            joined = ""
            continue
        body = line.strip().removeprefix("#").strip() if not name.endswith(".md") else line.strip()
        joined = f"{joined} {body}".strip() if joined else body
        if joined.endswith("\\"):
            joined = joined[:-1].rstrip()
            continue
        lines.append(joined)
        joined = ""
    commands = [shlex.split(c, comments=True) for c in lines if re.match(r"sslp (run|sweep|submit|jobs) ", c)]
    if name.endswith(".yaml"):
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "RayJob":
                commands.append(shlex.split(doc["spec"]["entrypoint"]))
    return commands


def check_sslp_command(argv: list[str]) -> None:
    """Raise (SystemExit from the parser, ConfigError from the config) unless ``argv`` is a command
    the platform runs: `sslp`'s own parser takes it, and its preset or sweep loads with its overrides."""
    assert argv[0] == "sslp"
    args = build_parser().parse_args(argv[1:])
    if args.command == "jobs":  # sslp jobs list|status|logs|stop: the parser is the whole check
        return
    if args.command == "submit":  # sslp submit [--address URL] [--sweep] PRESET_OR_YAML [key=value ...]
        target, sweep = args.target, args.sweep
    else:
        target, sweep = (args.sweep, True) if args.command == "sweep" else (args.preset, False)
    load_target(target, tuple(args.overrides), sweep)


@functools.cache  # several files quote the same run; building ResNet-50 once is enough
def load_target(target: str, overrides: tuple[str, ...], sweep: bool) -> None:
    if sweep:
        load_sweep(target, overrides)
    else:
        methods.validate(load_config(target, overrides))


def _target(argv: list[str]) -> str:
    if argv[1] == "jobs":
        return argv[2]
    return next(a for i, a in enumerate(argv[2:]) if not a.startswith("-") and argv[1 + i] != "--address")


COMMANDS = [(name, argv) for name in RAY_UP + KUBERAY + ("Dockerfile", "README.md") for argv in sslp_commands(name)]


def test_every_file_quotes_an_sslp_command():
    quoted = {name for name, _ in COMMANDS}
    assert set(RAY_UP + KUBERAY) <= quoted
    entrypoints = {argv[1] for name, argv in COMMANDS if name.startswith("kuberay/rayjob")}
    assert {"run", "sweep"} <= entrypoints


@pytest.mark.parametrize("name,argv", COMMANDS, ids=[f"{n}:{a[1]}-{_target(a)}" for n, a in COMMANDS])
def test_sslp_command_is_real(name, argv):
    check_sslp_command(argv)


@pytest.mark.parametrize("command,error", [
    ("sslp run simclr-resnet50-imagene data.path=s3://b/x", ConfigError),         # no such preset
    ("sslp run simclr-resnet50-imagenet trian.max_steps=10", ConfigError),         # no such key
    ("sslp run simclr-resnet50-imagenet --retries 3", SystemExit),               # no such flag
    ("sslp sweep simclr-digits num_sample=4", ConfigError),                        # no such sweep key
    ("sslp submit --address http://h:8265 --sweep simclr-digits runs_dir=s3://b/r",
     ConfigError),  # a sweep needs a path
    ("sslp submit --address http://h:8265 simclr-digits --sweeps", SystemExit),     # no such flag
])
def test_a_wrong_command_is_caught(command, error):
    with pytest.raises(error):
        check_sslp_command(shlex.split(command))


# ----------------------------------------------------------------------------- monitoring

@pytest.mark.parametrize("name", RAY_UP)
def test_the_head_starts_prometheus_and_grafana_and_points_rays_dashboard_at_them(name):
    raw = load(name)
    *start_ray, monitoring = raw["head_start_ray_commands"]
    argv = shlex.split(monitoring)
    args = build_parser().parse_args(argv[1:])  # the real command line takes it
    assert (args.command, args.dashboards_command, args.cluster_label) == ("dashboards", "start", raw["cluster_name"])
    start = next(c for c in start_ray if "ray start --head" in c)
    assert f"RAY_PROMETHEUS_HOST=http://127.0.0.1:{args.prometheus_port}" in start
    assert f"RAY_GRAFANA_HOST=http://127.0.0.1:{args.grafana_port}" in start
    assert "RAY_GRAFANA_IFRAME_HOST=http://localhost:3000" in start and args.host == "127.0.0.1"
    assert "--include-dashboard=false" not in start  # Ray's dashboard writes the scrape targets and configurations


def test_podmonitors_scrape_ports_every_ray_pod_names():
    monitors = [d for d in yaml.safe_load_all((CLUSTERS / "kuberay/podmonitor.yaml").read_text()) if d]
    ports = {m["spec"]["selector"]["matchLabels"]["ray.io/node-type"]:
             [e["port"] for e in m["spec"]["podMetricsEndpoints"]] for m in monitors}
    assert ports == {"worker": ["metrics"], "head": ["metrics", "as-metrics", "dash-metrics"]}
    for m in monitors:  # the dashboards' Cluster filter
        assert all(e["relabelings"][0]["targetLabel"] == "ray_io_cluster" for e in m["spec"]["podMetricsEndpoints"])
    for name in KUBERAY:
        spec = cluster_spec(ray_resource(name))
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert {p["name"] for p in head["ports"]} >= set(ports["head"]), name
        env = {e["name"]: e["value"] for e in head.get("env", [])}
        assert {"RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST"} <= set(env), name
        for group in spec.get("workerGroupSpecs", []):
            assert "metrics" in {p["name"] for p in group["template"]["spec"]["containers"][0]["ports"]}, name

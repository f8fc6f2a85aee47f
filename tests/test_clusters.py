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
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"  # the base of every node and pod
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
def test_ray_up_nodes_run_the_project_with_dashboard_and_metrics(name):
    raw = load(name)
    assert raw["docker"]["image"] == RAY_IMAGE
    head = " ".join(raw["head_start_ray_commands"])
    worker = " ".join(raw["worker_start_ray_commands"])
    for flag in ("--head", "--dashboard-host=0.0.0.0", "--metrics-export-port=8080", "--num-cpus=0"):
        assert flag in head, f"{name}: head start command lacks {flag}"
    assert "--metrics-export-port=8080" in worker and "$RAY_HEAD_IP" in worker
    # The checkout ships to every node (`ray up` from the repository root) and is installed there.
    remote = [r for r, local in raw["file_mounts"].items() if local == "."]
    assert len(remote) == 1, f"{name}: file_mounts should map one remote path to the checkout '.'"
    assert any(re.search(rf"pip install .*-e {re.escape(remote[0])}\b", c) for c in raw["setup_commands"])
    assert f"ray up clusters/{name}" in (CLUSTERS / name).read_text()


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
    assert params["dashboard-host"] == "0.0.0.0" and params["metrics-export-port"] == "8080"
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

    if obj["kind"] == "RayJob":
        assert isinstance(obj["spec"]["entrypoint"], str) and obj["spec"]["entrypoint"].startswith("sslp ")
        assert obj["spec"]["shutdownAfterJobFinishes"] is True
    assert f"kubectl apply -f clusters/{name}" in (CLUSTERS / name).read_text()


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
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == [RAY_IMAGE]
    project_images = {c["image"] for name in KUBERAY for c in _containers(cluster_spec(ray_resource(name)))}
    assert len(project_images) == 1, f"the KubeRay manifests use different images: {project_images}"
    image = project_images.pop()
    assert f"ray{ray.__version__}-py311" in image.rsplit(":", 1)[1]
    assert f"-t {image} ." in dockerfile  # the build command makes the image the manifests pull


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
    commands = [shlex.split(c, comments=True) for c in lines if re.match(r"sslp (run|sweep|submit) ", c)]
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

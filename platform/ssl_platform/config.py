"""Typed experiment configuration: dataclasses are the schema, YAML holds presets only.

A config is built in three steps, each of which can reject bad input before Ray starts:

    cfg = load_config("simclr-digits", ["train.max_steps=200", "method.temperature=0.2"])

1. the preset (a name shipped in ``ssl_platform/presets/`` or a path to a YAML file) is read;
2. ``key=value`` overrides are applied on top, values parsed as YAML scalars;
3. every key is checked against the dataclasses below: unknown keys (with the closest valid
   key suggested), wrong types and out-of-range values raise :class:`ConfigError`, one line
   naming the key and what is allowed.

Each field's ``metadata`` carries its constraints (``min``, ``max``, ``choices``) and a help
string; ``sslp run --help-config`` prints them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A user-caused configuration problem; the message is one line saying what to change."""


def _f(default: Any, help: str, **constraints: Any) -> Any:
    """A dataclass field with a help string and constraints (min, max, choices)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **constraints})
    return field(default=default, metadata={"help": help, **constraints})


# Built-in corpora (offline on a fresh machine) and the kinds/formats of a user's data.path.
BUILTIN_KINDS = {"digits": "image", "digit-captions": "image-caption", "python-docs": "text", "spoken-digits": "audio"}
BUILTIN_CORPORA = tuple(BUILTIN_KINDS)
# The kind of corpus each method trains on.
METHOD_KINDS = {"simclr": "image", "byol": "image", "barlow_twins": "image", "vicreg": "image",
                "clip": "image-caption", "cpc": "audio", "bert": "text", "gpt": "text"}
CORPUS_KINDS = ("image", "text", "audio", "image-caption")
CORPUS_FORMATS = ("auto", "folder", "parquet", "webdataset", "csv", "tsv", "txt", "jsonl")


@dataclass
class DataConfig:
    corpus: str = _f("digits", "built-in corpus (ignored when data.path is set)", choices=BUILTIN_CORPORA)
    path: str = _f("", "a corpus of your own: local path or URI (s3://, gs://); overrides data.corpus")
    kind: str = _f("image", "what data.path holds", choices=CORPUS_KINDS)
    format: str = _f("auto", "file format of data.path (auto: from the path)", choices=CORPUS_FORMATS)
    channels: int = _f(3, "image channels of a data.path corpus (1 grayscale, 3 RGB)", choices=(1, 3))
    strict: bool = _f(False, "fail on the first bad record (naming it) instead of skipping and counting it")
    image_size: int = _f(32, "side of the square images fed to the encoder", min=8, max=1024)
    val_fraction: float = _f(0.2, "held-out fraction for evaluation (stratified, fixed seed)", min=0.05, max=0.9)
    crop_scale_min: float = _f(0.08, "lower bound of the random-resized-crop area fraction (SimCLR: 0.08)", min=0.01, max=1.0)
    jitter_strength: float = _f(0.5, "colour/intensity jitter strength s (SimCLR appendix A)", min=0.0, max=2.0)
    jitter_prob: float = _f(0.8, "probability of applying colour jitter to a view", min=0.0, max=1.0)
    blur_prob: float = _f(0.5, "probability of Gaussian blur per view", min=0.0, max=1.0)
    flip_prob: float = _f(0.0, "probability of a horizontal flip (0 for digits: flips change the class)", min=0.0, max=1.0)
    transform_batch_size: int = _f(256, "records per map_batches call on the CPU workers", min=1)
    prefetch_batches: int = _f(2, "batches prefetched by each train worker", min=0, max=64)


@dataclass
class MethodConfig:
    name: str = _f("simclr", "method from ssl_models.METHODS", choices=("simclr",))
    temperature: float = _f(0.2, "NT-Xent softmax temperature", min=1e-3, max=10.0)
    gather_distributed: bool = _f(True, "score each anchor against the negatives of all workers")


@dataclass
class ModelConfig:
    encoder_widths: list = _f([32, 64, 128], "channels of the ResNet stages (one int per stage)")
    blocks_per_stage: int = _f(1, "BasicBlocks per ResNet stage", min=1, max=8)
    projector_width: int = _f(512, "hidden width of the MLP projector", min=1)
    projector_dim: int = _f(128, "output dimension of the projector", min=1)


@dataclass
class TrainConfig:
    max_steps: int = _f(300, "optimizer steps in the whole run", min=1)
    batch_size: int = _f(256, "global batch size (pairs), split evenly across workers", min=2)
    optimizer: str = _f("lars", "optimizer", choices=("lars", "adamw", "sgd"))
    lr: float = _f(0.3, "base learning rate for a global batch of 256 (scaled linearly)", min=0.0, max=100.0)
    weight_decay: float = _f(1e-6, "weight decay (not applied to biases and norm weights)", min=0.0, max=1.0)
    warmup_steps: int = _f(30, "linear warmup steps before the cosine decay (capped at half of max_steps)", min=0)
    grad_clip: float = _f(0.0, "max gradient norm; 0 disables clipping", min=0.0)
    checkpoint_every: int = _f(100, "steps between checkpoints (one is always written at the end)", min=1)
    keep_checkpoints: int = _f(2, "newest checkpoints kept on storage", min=1)
    log_every: int = _f(10, "steps between progress lines and metrics.jsonl rows", min=1)
    seed: int = _f(0, "seed for model init, splits and the supervised baseline", min=0)


@dataclass
class ScalingConfig:
    num_workers: int = _f(2, "Ray Train workers (data-parallel ranks)", min=1)
    use_gpu: bool = _f(False, "one GPU per worker, NCCL backend")
    cpus_per_worker: Optional[float] = _f(None, "CPUs held by each train worker; empty = sized automatically", min=0.0)
    data_cpus: float = _f(1.0, "CPUs always left free for the Ray Data pipeline", min=0.0)
    placement_strategy: str = _f("PACK", "placement group strategy", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


@dataclass
class EvalConfig:
    enabled: bool = _f(True, "evaluate the frozen encoder at the end of the run")
    knn_k: int = _f(20, "neighbours of the weighted kNN classifier", min=1)
    knn_temperature: float = _f(0.07, "temperature of the kNN vote weights", min=1e-4)
    supervised_epochs: int = _f(15, "epochs of the supervised baseline (0 skips it)", min=0)


@dataclass
class ExperimentConfig:
    name: str = _f("simclr-digits", "run name: the run directory is RUNS_DIR/NAME; re-using it resumes")
    runs_dir: str = _f("runs", "where run directories are written (local path)")
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        """Where this run's config, metrics, checkpoints and report live: RUNS_DIR/NAME."""
        return Path(self.runs_dir).expanduser().resolve() / self.name

    def method_kwargs(self, in_channels: int) -> dict:
        """Keyword arguments of ``ssl_models.build_method(self.method.name, ...)``."""
        return dict(
            in_channels=in_channels,
            encoder_widths=tuple(self.model.encoder_widths),
            blocks_per_stage=self.model.blocks_per_stage,
            projector_width=self.model.projector_width,
            projector_dim=self.model.projector_dim,
            temperature=self.method.temperature,
            gather_distributed=self.method.gather_distributed,
        )


# ----------------------------------------------------------------------------- presets

PRESETS_PACKAGE = "ssl_platform.presets"


def list_presets() -> dict[str, str]:
    """Preset name -> its first comment line (the description), for ``sslp presets``."""
    out = {}
    for entry in sorted(resources.files(PRESETS_PACKAGE).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            first = entry.read_text().splitlines()[0] if entry.read_text() else ""
            out[entry.name[: -len(".yaml")]] = first.lstrip("# ").strip()
    return out


def _read_preset(preset: str) -> dict:
    """A preset name or a YAML path -> its raw mapping."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {preset!r} does not exist; give a preset name ({', '.join(list_presets())}) or a YAML path")
        text = path.read_text()
    else:
        names = list_presets()
        if preset not in names:
            close = difflib.get_close_matches(preset, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown preset {preset!r}{hint}; known presets: {', '.join(names)}, or give a YAML path")
        text = resources.files(PRESETS_PACKAGE).joinpath(preset + ".yaml").read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{preset}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{preset}: a config must be a YAML mapping of sections, got {type(raw).__name__}")
    return raw


# ----------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[str, Any]:
    """``"train.max_steps=200"`` -> ``("train.max_steps", 200)``; values are YAML scalars."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. train.max_steps=200)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- validation

def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in _hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _allowed(f: dataclasses.Field, hint: Any) -> str:
    md = f.metadata
    if "choices" in md:
        return "one of " + ", ".join(map(str, md["choices"]))
    lo, hi = md.get("min"), md.get("max")
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    name = getattr(args[0] if args else hint, "__name__", str(hint))
    name = {"int": "an int", "float": "a float", "str": "a string", "bool": "true or false", "list": "a list"}.get(name, name)
    if lo is not None and hi is not None:
        return f"{name} in [{lo}, {hi}]"
    if lo is not None:
        return f"{name} >= {lo}"
    return name


def _convert(key: str, value: Any, hint: Any, f: dataclasses.Field) -> Any:
    """Check (and lightly convert) one value against its type hint and constraints."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required, expected {_allowed(f, hint)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected {_allowed(f, int)}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected {_allowed(f, float)}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected {_allowed(f, str)}")
    elif hint is list:
        if isinstance(value, (int, str)):
            value = [value] if isinstance(value, int) else [v for v in str(value).split(",") if v]
        if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
            raise ConfigError(f"{key}={value!r}: expected a non-empty list of positive ints, e.g. [32,64,128]")
    md = f.metadata
    if "choices" in md and value not in md["choices"]:
        close = difflib.get_close_matches(str(value), list(map(str, md["choices"])), n=1)
        hint_txt = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, md['choices']))}{hint_txt}")
    if "min" in md and value < md["min"] or "max" in md and value > md["max"]:
        raise ConfigError(f"{key}={value!r}: expected {_allowed(f, hint)}")
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        key = prefix + str(name)
        if name not in fields:
            valid = _all_keys(ExperimentConfig)
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys in this section: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        hint_type = hints[name]
        if dataclasses.is_dataclass(hint_type):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; set its keys instead (e.g. {key}.{dataclasses.fields(hint_type)[0].name}=...)")
            kwargs[name] = _build(hint_type, value, key + ".")
        else:
            kwargs[name] = _convert(key, value, hint_type, fields[name])
    return cls(**kwargs)


def _check_consistency(cfg: ExperimentConfig) -> None:
    """Constraints that span fields."""
    t, s = cfg.train, cfg.scaling
    if t.batch_size % s.num_workers:
        raise ConfigError(
            f"train.batch_size={t.batch_size} does not split evenly over scaling.num_workers={s.num_workers}; "
            f"use a multiple of {s.num_workers}"
        )
    if len(cfg.model.encoder_widths) > 1 and cfg.data.image_size < 2 ** len(cfg.model.encoder_widths):
        raise ConfigError(f"data.image_size={cfg.data.image_size} is too small for {len(cfg.model.encoder_widths)} stride-2 stages")
    wanted = METHOD_KINDS[cfg.method.name]
    d = cfg.data
    if d.path and d.kind != wanted:
        raise ConfigError(f"data.kind={d.kind} but method.name={cfg.method.name} trains on {wanted} corpora; "
                          f"set data.kind={wanted} (and point data.path at one)")
    if not d.path and BUILTIN_KINDS[d.corpus] != wanted:
        fits = [c for c, k in BUILTIN_KINDS.items() if k == wanted]
        raise ConfigError(f"data.corpus={d.corpus} is a {BUILTIN_KINDS[d.corpus]} corpus but method.name={cfg.method.name} "
                          f"trains on {wanted}; use data.corpus={' or '.join(fits)} or data.path=...")
    if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        raise ConfigError(f"name={cfg.name!r}: a run name must be a non-empty file name (no '/')")


def from_dict(raw: dict) -> ExperimentConfig:
    """Validate a raw mapping (e.g. a saved ``config.yaml``) into an ExperimentConfig."""
    cfg = _build(ExperimentConfig, raw)
    _check_consistency(cfg)
    return cfg


def load_config(preset: str, overrides: list[str] = ()) -> ExperimentConfig:
    """Preset name or YAML path + ``key=value`` overrides -> a validated ExperimentConfig."""
    raw = _read_preset(preset)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def describe_keys() -> str:
    """Every config key with its default, constraint and help, for ``--help-config``."""
    lines = []

    def walk(cls: type, obj: Any, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], value, prefix + f.name + ".")
            else:
                lines.append(f"  {prefix + f.name:<28} {value!s:<14} {f.metadata.get('help', '')} ({_allowed(f, hints[f.name])})")

    walk(ExperimentConfig, ExperimentConfig(), "")
    return "\n".join(lines)


def save_yaml(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

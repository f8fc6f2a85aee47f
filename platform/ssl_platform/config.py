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

import collections.abc
import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-caused configuration problem; the message is one line saying what to change."""


def _f(default: Any, help: str, **constraints: Any) -> Any:
    """A dataclass field with a help string and constraints (min, max, choices)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **constraints})
    return field(default=default, metadata={"help": help, **constraints})


ELASTIC_ALLOWED = "an int >= 0 (0: local mode), or [MIN, MAX] with 1 <= MIN <= MAX (an elastic run)"

# Built-in corpora (offline on a fresh machine) and the kinds/formats of a user's data.path.
BUILTIN_KINDS = {"digits": "image", "digits-m": "image", "digit-captions": "image-caption",
                 "digits-m-captions": "image-caption", "python-docs": "text", "python-stdlib": "text",
                 "spoken-digits": "audio"}
BUILTIN_CORPORA = tuple(BUILTIN_KINDS)
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
    image_column: str = _f("image", "parquet/CSV column holding image bytes (or a path, for captions)")
    path_column: str = _f("path", "parquet column holding image paths (image corpora)")
    label_column: str = _f("label", "parquet column holding integer labels (image corpora)")
    caption_column: str = _f("caption", "parquet/CSV column holding the captions")
    image_size: int = _f(32, "side of the square images fed to the encoder", min=8, max=1024)
    val_fraction: float = _f(0.2, "held-out fraction for evaluation (stratified, fixed seed)", min=0.05, max=0.9)
    # Image augmentation; empty = the method paper's recipe (ssl_platform.views.recipe).
    crop_scale_min: float | None = _f(None, "lower bound of the random-resized-crop area fraction (full-size "
                                   "views; multi-crop's local views keep their recipe's)", min=0.01, max=1.0)
    jitter_strength: float | None = _f(None, "colour/intensity jitter strength s (SimCLR appendix A)", min=0.0, max=2.0)
    jitter_prob: float | None = _f(None, "probability of applying colour jitter to a view", min=0.0, max=1.0)
    blur_prob: float | None = _f(None, "probability of Gaussian blur per view", min=0.0, max=1.0)
    flip_prob: float | None = _f(None, "probability of a horizontal flip (0 for digits: flips change the class)",
                               min=0.0, max=1.0)
    augment_on: str = _f("auto", "where an image view's colour jitter, grayscale, blur and solarize run: on the "
                                 "Ray Data CPU workers, or batched on the train worker's device (the crop always "
                                 "runs on the CPUs; both give the same views); auto: device with GPUs, else cpu",
                         choices=("auto", "cpu", "device"))
    transform_batch_size: int | None = _f(None, "records per map_batches call (one Ray Data task) on the CPU "
                                          "workers; empty = by the image side: 2048 at 32 px and less, "
                                          "fewer as the pixels grow (512 at 64 px), 256 from 91 px and for "
                                          "text and audio",
                                          min=1)
    prefetch_batches: int = _f(2, "batches prefetched by each train worker", min=0, max=64)
    # text (BERT, GPT)
    text_unit: str = _f("document", ".txt corpora: one document per blank-line block, or per line",
                        choices=("document", "line"))
    text_field: str = _f("text", ".jsonl key / parquet column holding the text")
    tokenizer: str = _f("auto", "tokenizer trained on the corpus (auto: wordpiece for bert, bpe for gpt)",
                        choices=("auto", "wordpiece", "bpe"))
    vocab_size: int = _f(4096, "tokenizer vocabulary size (an upper bound on a small corpus)", min=16, max=1_000_000)
    max_len: int = _f(128, "tokens per sequence (BERT pair) or block (GPT); the model's max_len", min=8, max=65_536)
    mask_prob: float = _f(0.15, "BERT: fraction of non-special tokens selected for masking", min=0.0, max=1.0)
    mask_token_frac: float = _f(0.8, "BERT: of the selected tokens, the fraction replaced by [MASK]", min=0.0, max=1.0)
    random_token_frac: float = _f(0.1, "BERT: of the selected tokens, the fraction replaced by a random token",
                                  min=0.0, max=1.0)
    next_prob: float = _f(0.5, "BERT: fraction of NSP pairs whose second segment is the true next one",
                          min=0.0, max=1.0)
    # audio (CPC)
    sample_rate: int = _f(16_000, "audio is resampled to this rate (Hz)", min=4_000, max=96_000)
    crop_seconds: float = _f(0.5, "length of the random audio crops (shorter clips are zero-padded)",
                             min=0.05, max=60.0)
    normalize_audio: bool = _f(True, "zero mean, unit variance per crop over its real samples")
    max_audio_seconds: float = _f(30.0, "evaluation and embed split longer recordings into several records "
                                        "(pretraining reads each file as one record)", min=0.1)
    # --- driver (issue 5, train/trainer.py) ---
    seed: int | None = _f(None, "seed of the data order and of every record's views, crops and masks (a function "
                              "of seed, epoch and record); empty = train.seed", min=0)


@dataclass
class MethodConfig:
    """``method.name`` picks the method; every other key of the ``method`` section is one of its
    objective's hyperparameters (``method.temperature``), and the ``model`` section holds its
    architecture (``model.projector_width``). Both are keyword arguments of the method's
    constructor in ``ssl_models``: which keys exist, their types and defaults are read from its
    signature (see :func:`check_method`), so a new method needs no change here. Which names exist,
    and what each trains on, is the method's own declaration (``ssl_models``' ``spec``), checked
    by ``ssl_platform.methods.validate``: this module imports neither torch nor ``ssl_models``."""

    name: str = _f("simclr", "method from ssl_models.METHODS (sslp presets lists one preset each)")
    options: dict = field(default_factory=dict)  # the objective's hyperparameters (method.* but name)


# Which optimizers' recipes quote their rate for a batch of 256 and scale it linearly (Goyal et al.
# 2017; SimCLR, BYOL, Barlow Twins, VICReg with LARS): train.lr_scaling=auto follows them. AdamW
# recipes (BERT, GPT, CLIP, wav2vec) quote the rate they train at, whatever the batch.
LINEAR_SCALING_BY_DEFAULT = {"lars": True, "sgd": True, "adamw": False}


@dataclass
class TrainConfig:
    max_steps: int = _f(300, "optimizer steps in the whole run", min=1)
    batch_size: int = _f(256, "global batch size (pairs), split evenly across workers", min=2)
    optimizer: str = _f("lars", "optimizer", choices=("lars", "adamw", "sgd"))
    lr: float = _f(0.3, "learning rate; with train.lr_scaling=linear, the rate for a global batch of 256",
                   min=0.0, max=100.0)
    lr_scaling: str = _f("auto", "how train.lr depends on the global batch: linear trains at lr x batch_size / 256 "
                                 "(Goyal et al. 2017; the SimCLR/BYOL LARS and SGD recipes), none at lr itself (AdamW "
                                 "recipes quote the rate they train at); auto: linear for lars and sgd, none for adamw",
                         choices=("auto", "linear", "none"))
    weight_decay: float = _f(1e-6, "weight decay (not applied to biases and norm weights)", min=0.0, max=1.0)
    warmup_steps: int = _f(30, "linear warmup steps before the cosine decay (capped at half of max_steps)", min=0)
    grad_clip: float = _f(0.0, "max gradient norm; 0 disables clipping", min=0.0)
    adam_beta2: float = _f(0.999, "AdamW's second-moment decay (beta2); BERT and RoBERTa recipes use 0.98, which "
                                  "adapts faster when the gradient scale changes", min=0.5, max=0.99999)
    checkpoint_every: int = _f(100, "steps between checkpoints (one is always written at the end)", min=1)
    keep_checkpoints: int = _f(2, "newest checkpoints kept on storage", min=1)
    log_every: int = _f(10, "steps between progress lines and metrics.jsonl rows", min=1)
    seed: int = _f(0, "seed for model init, splits and the supervised baseline", min=0)
    resume: str = _f("exact", "exact: a resumed run continues mid-epoch on exactly the records, order and views the "
                              "uninterrupted run would have seen, and refuses a checkpoint whose data, seed or "
                              "batch size differ; steps_only: accept such a checkpoint and go on from its step with "
                              "a fresh epoch",
                   choices=("exact", "steps_only"))
    # --- per-worker loop (issue 5, train/loop.py) ---
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step; the global batch stays train.batch_size "
                                  "(see train.grad_accum_mode)", min=1)
    grad_accum_mode: str = _f("exact", "how micro-batches combine: exact takes the loss over all of them, so the "
                                       "step equals one big batch's (GradCache for coupled losses: SimCLR, CLIP, "
                                       "SigLIP, Barlow Twins, VICReg, CPC; a second forward per micro-batch; BERT "
                                       "falls back to independent; BatchNorm statistics stay per micro-batch); "
                                       "independent: each micro-batch its own negatives and batch statistics",
                              choices=("exact", "independent"))
    precision: str = _f("auto", "auto: bf16 autocast on GPU, fp32 on CPU; bf16: autocast on CPU too; fp32: none; "
                                "fp64: model and inputs in float64 (slow; for checking that runs agree beyond "
                                "float32's rounding, see README Resume)", choices=("auto", "bf16", "fp32", "fp64"))
    compile: bool = _f(False, "torch.compile the wrapped model (the first steps are slow while it compiles)")

    def effective_lr(self) -> tuple[float, str]:
        """(the peak rate the run trains at, how train.lr became it: the run header's words)."""
        linear = LINEAR_SCALING_BY_DEFAULT[self.optimizer] if self.lr_scaling == "auto" else self.lr_scaling == "linear"
        why = f"train.lr_scaling={self.lr_scaling}" + (f", {self.optimizer}" if self.lr_scaling == "auto" else "")
        if linear:
            rate = self.lr * self.batch_size / 256
            return rate, f"{self.lr:g} x {self.batch_size}/256 = {rate:.4g} (linear scaling: {why})"
        return self.lr, f"{self.lr:g} (not scaled with the batch: {why})"


@dataclass
class ScalingConfig:
    num_workers: int | list = _f(  # noqa: RUF009 (_f returns a field; the default is an int)
        2, "Ray Train workers (data-parallel ranks); 0: local mode, the loop runs in the driver process as the only "
           "rank (no worker processes: quick checks, a debugger's breakpoints; Ray Data still streams the batches); "
           "[MIN, MAX]: elastic, as many workers as the cluster holds, only counts that split train.batch_size "
           "(README Elastic runs)", min=0, allowed=ELASTIC_ALLOWED)
    use_gpu: bool = _f(False, "one GPU per worker, NCCL backend")
    cpus_per_worker: float | None = _f(None, "CPUs held by each train worker; empty = sized automatically", min=0.0)
    data_cpus: float = _f(1.0, "CPUs always left free for the Ray Data pipeline", min=0.0)
    placement_strategy: str = _f("PACK", "placement group strategy",
                                 choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    # --- per-worker loop (issue 5, train/loop.py) ---
    strategy: str = _f("ddp", "data parallelism: ddp replicates the model on every worker; fsdp shards parameters, "
                              "gradients and optimizer state (torch FSDP2)", choices=("ddp", "fsdp"))
    sync_batchnorm: bool | None = _f(None, "BatchNorm statistics over the global batch (every worker's samples), "
                                           "as the papers train, so a step does not depend on the number of "
                                           "workers; false: each worker's own statistics; empty: on wherever the "
                                           "method's networks have BatchNorm (true for one without is refused)")
    # --- driver (issue 5, train/resources.py) ---
    autoscale: bool = _f(False, "the cluster adds nodes on demand (ray up / KubeRay autoscaling): ask the autoscaler "
                                "for the workers' resources and wait for them instead of refusing a cluster that is "
                                "still too small")
    wait_for_resources_s: float = _f(300.0, "seconds to wait for CPUs/GPUs that other jobs hold (or the autoscaler "
                                            "adds) before giving up",
                                     min=0.0)
    resize_check_s: float = _f(60.0, "elastic runs: seconds between checks for room for more workers (a bigger "
                                     "worker group takes over at the next checkpoint)", min=0.0)

    @property
    def elastic(self) -> bool:
        """``num_workers=[MIN, MAX]``: Ray Train picks the worker count from what the cluster holds."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if self.elastic else self.num_workers

    @property
    def ranks(self) -> int:
        """Data-parallel ranks: the workers, or the driver alone in local mode (``num_workers=0``);
        an elastic run's smallest count (see :func:`worker_counts` for the others)."""
        return max(1, self.min_workers)


def worker_counts(cfg: ExperimentConfig) -> list[int]:
    """The worker counts a run may use: ``scaling.num_workers`` itself, or of an elastic range
    [MIN, MAX] the counts N that split the global batch into equal worker micro-batches
    (``train.batch_size`` divisible by ``N * train.grad_accum_steps``), so every N trains on the
    same global batch. Empty when none does (refused by the config check)."""
    s, t = cfg.scaling, cfg.train
    if not s.elastic:
        return [s.num_workers]
    return [n for n in range(s.min_workers, s.max_workers + 1) if t.batch_size % (n * t.grad_accum_steps) == 0]


@dataclass
class EvalConfig:
    enabled: bool = _f(True, "evaluate the frozen encoder at the end of the run")
    knn_k: int = _f(20, "neighbours of the weighted kNN classifier", min=1)
    knn_temperature: float = _f(0.07, "temperature of the kNN vote weights", min=1e-4)
    supervised_epochs: int = _f(15, "epochs of the supervised baseline (0 skips it)", min=0)
    batch_size: int = _f(256, "examples per batch of feature extraction (Ray Data batch inference)", min=1)
    actors: int = _f(1, "model replicas (Ray actors) extracting features in parallel", min=1)
    sample_tokens: int = _f(40, "tokens generated per prompt for GPT's samples", min=1)
    online_every: int = _f(0, "steps between online evaluations on rank 0 (and at every checkpoint); 0: off",
                           min=0)
    online_examples: int = _f(512, "held-out examples of the online evaluation", min=16)
    data: str = _f("", "a labelled corpus of your own to evaluate on (image, caption and audio methods): an image or "
                       "audio folder with a sub-folder per class, parquet/CSV with data.label_column; split by "
                       "data.val_fraction. Empty: the built-in corpus's held-out split")
    format: str = _f("auto", "file format of eval.data (auto: from the path)", choices=CORPUS_FORMATS)
    probe_stages: str = _f("last", "image encoders: a linear probe on the encoder's output (last), or also on the "
                                   "pooled features of its stem and every stage (all; the RotNet paper's per-layer "
                                   "table)", choices=("last", "all"))


@dataclass
class ExperimentConfig:
    name: str = _f("simclr-digits", "run name: the run directory is RUNS_DIR/NAME; re-using it resumes")
    runs_dir: str = _f("runs", "where run directories are written: a local path or a URI (s3://, gs://, file://)")
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: dict = field(default_factory=dict)  # architecture: keyword arguments of the method's constructor
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["method"] = {"name": self.method.name, **self.method.options}
        return out

    def run_location(self) -> str:
        """Where this run's config, metrics, checkpoints and report live: RUNS_DIR/NAME, an
        absolute local path or a URI (s3://, gs://, file://)."""
        if "://" in self.runs_dir:
            return f"{self.runs_dir.rstrip('/')}/{self.name}"
        return str(Path(self.runs_dir).expanduser().resolve() / self.name)

    def augment_placement(self) -> str:
        """Where image views get their per-pixel ops: ``data.augment_on``, with auto -> the
        device on GPU runs (the CPUs then only decode and crop), the CPU workers otherwise."""
        if self.data.augment_on != "auto":
            return self.data.augment_on
        return "device" if self.scaling.use_gpu else "cpu"

    def method_kwargs(self, **derived: Any) -> dict:
        """Keyword arguments of ``ssl_models.build_method(self.method.name, ...)``: the values the
        data side determines (``in_channels``, ``vocab_size``, ...) plus ``method.*`` and ``model.*``."""
        return {**derived, **self.method.options, **self.model}


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
    return read_yaml_mapping(preset, "preset", list_presets(),
                             lambda name: resources.files(PRESETS_PACKAGE).joinpath(name + ".yaml").read_text())


def read_yaml_mapping(source: str, what: str, shipped: Mapping[str, str], read_shipped) -> dict:
    """A YAML path, or the name of a shipped ``what`` (a preset, a sweep) -> its raw mapping, or a
    ConfigError saying what exists (and the closest name for a typo)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{what} file {source!r} does not exist; give a {what} name ({', '.join(shipped)}) "
                              f"or a YAML path")
        text = path.read_text()
    else:
        if source not in shipped:
            close = difflib.get_close_matches(source, list(shipped), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown {what} {source!r}{hint}; shipped {what}s: {', '.join(shipped)}, or give a "
                              f"YAML path")
        text = read_shipped(source)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a {what} must be a YAML mapping, got {type(raw).__name__}")
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


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw["train"]["lr"]`` from ``"train.lr"`` in a config's nested mapping."""
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
        if name == "options":
            continue
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_TYPE_NAMES = {int: "an int", float: "a float", str: "a string", bool: "true or false", list: "a list"}


def _type_name(hint: Any) -> str:
    if _is_int_sequence(hint):
        return "a list of ints"
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    return " or ".join(_TYPE_NAMES.get(a, getattr(a, "__name__", str(a))) for a in args)


def _allowed(md: Mapping, hint: Any) -> str:
    if "allowed" in md:  # a key whose forms the constraints below cannot say (scaling.num_workers)
        return md["allowed"]
    if "choices" in md:
        return "one of " + ", ".join(map(str, md["choices"]))
    lo, hi, name = md.get("min"), md.get("max"), _type_name(hint)
    if lo is not None and hi is not None:
        return f"{name} in [{lo}, {hi}]"
    if lo is not None:
        return f"{name} >= {lo}"
    return name


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _is_int_sequence(hint: Any) -> bool:
    """``list`` (our own list keys) or ``Sequence[int]`` (a method constructor's)."""
    return hint is list or (typing.get_origin(hint) in (list, tuple, collections.abc.Sequence)
                            and typing.get_args(hint)[:1] == (int,))


def _convert(key: str, value: Any, hint: Any, md: Mapping = types.MappingProxyType({})) -> Any:
    """Check (and lightly convert) one value against its type hint and constraints (``md``)."""
    if _is_union(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        for arg in args:  # the first alternative that accepts the value (int | str: 5 or "all")
            try:
                return _convert(key, value, arg, md)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {_allowed(md, hint)}")
    if value is None:
        raise ConfigError(f"{key}: a value is required, expected {_allowed(md, hint)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected {_allowed(md, int)}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected {_allowed(md, float)}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected {_allowed(md, str)}")
    elif _is_int_sequence(hint):
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            value = ([value] if isinstance(value, int)
                     else [int(v) for v in str(value).split(",") if v.strip().isdigit()])
        if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
            raise ConfigError(f"{key}={value!r}: expected a non-empty list of positive ints, e.g. [32,64,128]")
    if "choices" in md and value not in md["choices"]:
        close = difflib.get_close_matches(str(value), list(map(str, md["choices"])), n=1)
        hint_txt = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, md['choices']))}{hint_txt}")
    if isinstance(value, list):  # min and max bound a scalar
        return value
    if ("min" in md and value < md["min"]) or ("max" in md and value > md["max"]):
        raise ConfigError(f"{key}={value!r}: expected {_allowed(md, hint)}")
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        key = prefix + str(name)
        if name not in fields or (cls is MethodConfig and name == "options"):
            if cls is MethodConfig:  # the objective's hyperparameters, checked by check_method
                kwargs.setdefault("options", {})[name] = value
                continue
            valid = _all_keys(ExperimentConfig)
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys in this section: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        hint_type = hints[name]
        if dataclasses.is_dataclass(hint_type) or hint_type is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; set its keys instead (e.g. {key}.name=...)")
            kwargs[name] = _build(hint_type, value, key + ".") if hint_type is not dict else dict(value)
        else:
            kwargs[name] = _convert(key, value, hint_type, fields[name].metadata)
    return cls(**kwargs)


def check_method(cfg: ExperimentConfig, params: Mapping[str, tuple[Any, Any]], derived: Mapping[str, str],
                 objective_keys: Collection[str]) -> None:
    """Check ``method.*`` and ``model.*`` against the method's constructor and convert their values.

    Args:
        params: constructor parameter -> (type hint, default), read from its signature.
        derived: parameters the platform sets from the data (``in_channels``, ``vocab_size``,
            ...) -> where the user sets them instead.
        objective_keys: the parameters that belong in ``method.*`` (the method's spec); every
            other one is architecture (``model.*``).
    """
    name = cfg.method.name
    for section, values in (("method", cfg.method.options), ("model", cfg.model)):
        for key in list(values):
            full = f"{section}.{key}"
            if key in derived:
                raise ConfigError(f"{full} is set by the platform from {derived[key]}; remove it")
            if key not in params:
                close = difflib.get_close_matches(key, list(params), n=1, cutoff=0.6)
                hint = f"did you mean {section}.{close[0]}?" if close else "its keys: " + ", ".join(
                    f"{'method' if k in objective_keys else 'model'}.{k}" for k in params if k not in derived)
                raise ConfigError(f"unknown config key {full!r} for method {name}; {hint}")
            right = "method" if key in objective_keys else "model"
            if section != right:
                raise ConfigError(f"{full}: {key} is {'an objective' if right == 'method' else 'an architecture'} "
                                  f"setting; set {right}.{key} instead")
            values[key] = _convert(full, values[key], params[key][0])


def _check_consistency(cfg: ExperimentConfig) -> None:
    """Constraints that span fields."""
    t, s = cfg.train, cfg.scaling
    if s.elastic:
        _check_elastic(cfg)
    elif t.batch_size % s.ranks:
        raise ConfigError(
            f"train.batch_size={t.batch_size} does not split evenly over scaling.num_workers={s.num_workers}; "
            f"use a multiple of {s.num_workers}"
        )
    if not s.elastic and t.batch_size % (s.ranks * t.grad_accum_steps):
        raise ConfigError(f"train.batch_size={t.batch_size} does not split into scaling.num_workers={s.num_workers} x "
                          f"train.grad_accum_steps={t.grad_accum_steps} equal micro-batches; use a multiple of "
                          f"{s.ranks * t.grad_accum_steps}")
    d = cfg.data
    if d.mask_token_frac + d.random_token_frac > 1:
        raise ConfigError(f"data.mask_token_frac={d.mask_token_frac} + data.random_token_frac={d.random_token_frac} "
                          f"exceeds 1; lower one of them")
    if not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        raise ConfigError(f"name={cfg.name!r}: a run name must be a non-empty file name (no '/')")


def _check_elastic(cfg: ExperimentConfig) -> None:
    """An elastic range: two ints, 1 <= MIN <= MAX, and at least one count in it splits the global batch."""
    s, t = cfg.scaling, cfg.train
    n = s.num_workers
    if len(n) != 2 or not 1 <= n[0] <= n[1]:
        raise ConfigError(f"scaling.num_workers={n}: expected {ELASTIC_ALLOWED}")
    if not worker_counts(cfg):
        k = t.grad_accum_steps
        split = f"train.batch_size={t.batch_size}" + (f" into train.grad_accum_steps={k} micro-batches"
                                                      if k > 1 else "")
        fits = [m for m in range(1, t.batch_size // k + 1) if t.batch_size % (m * k) == 0]
        below = [m for m in fits if m < n[0]]
        above = [m for m in fits if m > n[1]]
        near = " or ".join(f"{m}" for m in (below[-1:] + above[:1]))
        raise ConfigError(f"scaling.num_workers={n}: no worker count from {n[0]} to {n[1]} splits {split} evenly "
                          f"(each worker takes batch/N); widen the range to include {near or 'a divisor'} or "
                          f"change train.batch_size")


def check_data_kind(cfg: ExperimentConfig, wanted: str) -> None:
    """Check that the corpus, and the evaluation's labelled data, fit a method that trains on
    ``wanted`` corpora (its spec's ``data_kind``; ``ssl_platform.methods.validate`` calls this)."""
    d = cfg.data
    if d.path and d.kind != wanted:
        raise ConfigError(f"data.kind={d.kind} but method.name={cfg.method.name} trains on {wanted} corpora; "
                          f"set data.kind={wanted} (and point data.path at one)")
    if not d.path and BUILTIN_KINDS[d.corpus] != wanted:
        fits = [c for c, k in BUILTIN_KINDS.items() if k == wanted]
        raise ConfigError(f"data.corpus={d.corpus} is a {BUILTIN_KINDS[d.corpus]} corpus but "
                          f"method.name={cfg.method.name} trains on {wanted}; use data.corpus={' or '.join(fits)} "
                          f"or data.path=...")
    # Text corpora hold their own held-out split; the image, caption and audio protocols need
    # labels: a built-in corpus's, or a labelled corpus of the user's (eval.data).
    evaluating = [key for key, on in (("eval.enabled", cfg.eval.enabled), ("eval.online_every", cfg.eval.online_every))
                  if on]
    if cfg.eval.data and wanted == "text":
        raise ConfigError(f"eval.data={cfg.eval.data}: {cfg.method.name} is evaluated on the held-out split of the "
                          f"corpus it trains on; remove eval.data")
    if evaluating and d.path and wanted != "text" and not cfg.eval.data:
        raise ConfigError(f"{evaluating[0]}: evaluating a {wanted} method needs labelled data, and "
                          f"data.path={d.path} has none; set eval.data=PATH to a labelled {wanted} corpus (see "
                          f"--help-config), or eval.enabled=false eval.online_every=0")


def from_dict(raw: dict) -> ExperimentConfig:
    """Validate a raw mapping (e.g. a saved ``config.yaml``) into an ExperimentConfig."""
    cfg = _build(ExperimentConfig, raw)
    _check_consistency(cfg)
    return cfg


def load_config(preset: str, overrides: list[str] = ()) -> ExperimentConfig:
    """Preset name or YAML path + ``key=value`` overrides -> a validated ExperimentConfig."""
    return with_overrides(_read_preset(preset), overrides)


def with_overrides(raw: dict, overrides: list[str] = ()) -> ExperimentConfig:
    """A raw mapping (a preset, a checkpoint's config) + ``key=value`` overrides -> a validated config."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return from_dict(raw)


def describe_keys(params: Mapping[str, tuple[Any, Any]] | None = None, derived: Mapping[str, str] = {},
                  objective_keys: Collection[str] = ()) -> str:
    """Every config key with its default, constraint and help, for ``--help-config``; with
    ``params`` (a method's constructor, see :func:`check_method`) also its ``method.*`` and
    ``model.*`` keys."""
    lines = []

    def walk(cls: type, obj: Any, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], value, prefix + f.name + ".")
            elif hints[f.name] is not dict:
                lines.append(f"  {prefix + f.name:<28} {value!s:<14} {f.metadata.get('help', '')} "
                             f"({_allowed(f.metadata, hints[f.name])})")

    walk(ExperimentConfig, ExperimentConfig(), "")
    for key, (hint, default) in (params or {}).items():
        if key not in derived:
            section = "method" if key in objective_keys else "model"
            lines.append(f"  {section + '.' + key:<28} {default!s:<14} constructor argument ({_type_name(hint)})")
    return "\n".join(lines)


def save_yaml(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

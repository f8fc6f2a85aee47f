"""A sweep YAML, parsed and checked before Ray starts.

A sweep names a base preset, config keys fixed for every trial, the metric ASHA optimises and a
search space over any config key::

    # SimCLR on digits: temperature, batch size, projector width.
    name: simclr-digits-sweep        # the sweep directory is RUNS_DIR/NAME; re-using it resumes
    preset: simclr-digits            # a preset name or a config YAML path
    overrides:                       # config keys fixed for every trial
      train.max_steps: 300
      eval.online_every: 50
    metric: val_knn_top1             # default: the method's online metric (or loss without online eval)
    mode: max
    num_samples: 8                   # trials = num_samples x the product of the grid sizes
    max_concurrent_trials: auto      # auto: as many trials as the cluster holds at once
    scheduler: {grace_period: 100, reduction_factor: 2}   # ASHA on the reported "step", rungs below max_steps
    space:
      method.temperature: {loguniform: [0.05, 0.5]}
      train.batch_size: {choice: [128, 256, 512]}
      model.projector_width: {grid: [128, 512]}

Search-space forms: ``choice`` and ``grid`` (lists of values; a grid runs every value in every
sample), ``uniform`` and ``loguniform`` ([low, high] floats), ``randint`` ([low, high) ints).

Command-line ``key=value`` overrides go to the sweep when the key's first part is a sweep key
(``num_samples=4``, ``scheduler.grace_period=10``, ``space.train.lr={grid: [0.1, 1.0]}``) and
to every trial's config otherwise (``train.max_steps=40``, ``runs_dir=/data/runs``). Every
trial config the space can produce is checked up front (each sampled value of each key, with
the first sample of the others) by :func:`ssl_platform.config.from_dict` and
:func:`ssl_platform.methods.validate`, so a bad key or value fails here, not in a Ray trial.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ssl_platform.config import (
    ConfigError,
    ExperimentConfig,
    from_dict,
    load_config,
    parse_override,
    read_yaml_mapping,
    set_dotted,
)

SWEEPS_PACKAGE = "ssl_platform.presets"  # shipped sweeps live in presets/sweeps/*.yaml
SWEEP_KEYS = ("name", "preset", "overrides", "metric", "mode", "num_samples", "max_concurrent_trials",
              "scheduler", "space")
CONFIG_SECTIONS = ("data", "method", "model", "train", "scaling", "eval", "runs_dir")
SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
SCHEDULER_KEYS = ("grace_period", "reduction_factor")
# Metrics every run reports (at each checkpoint) whatever its online evaluation does.
LOWER_IS_BETTER = ("loss", "val_loss", "val_perplexity", "val_bits_per_token")


@dataclass(frozen=True)
class Param:
    """One swept config key: ``kind`` in SPACE_KINDS, ``values`` the choices or (low, high)."""

    key: str
    kind: str
    values: tuple

    def samples(self) -> list:
        """Values that stand for the whole range when checking configs: every choice, both ends."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        low, high = self.values
        return [low, high - 1] if self.kind == "randint" else [low, high]

    def domain(self):
        """The Ray Tune search-space object."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        sample = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind]
        return sample(*self.values)

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"


@dataclass
class SweepSpec:
    name: str
    preset: str
    overrides: dict[str, Any]  # config key -> value, for every trial
    metric: str
    mode: str
    num_samples: int
    max_concurrent_trials: int | str  # an int >= 1 or "auto"
    grace_period: int
    reduction_factor: float
    space: list[Param]
    base: ExperimentConfig = field(repr=False)  # the preset with the fixed overrides
    max_steps: int = 0  # ASHA's max_t: the longest trial's train.max_steps

    @property
    def num_trials(self) -> int:
        grid = math.prod(len(p.values) for p in self.space if p.kind == "grid")
        return self.num_samples * grid

    def param_space(self) -> dict:
        return {p.key: p.domain() for p in self.space}

    def to_dict(self) -> dict:
        """The resolved sweep (CLI overrides applied), saved in the sweep directory."""
        return {
            "name": self.name, "preset": self.preset, "overrides": self.overrides, "metric": self.metric,
            "mode": self.mode, "num_samples": self.num_samples, "max_concurrent_trials": self.max_concurrent_trials,
            "scheduler": {"grace_period": self.grace_period, "reduction_factor": self.reduction_factor},
            "space": {p.key: {p.kind: list(p.values)} for p in self.space},
        }


# ----------------------------------------------------------------------------- shipped sweeps

def _sweeps_dir():
    return resources.files(SWEEPS_PACKAGE).joinpath("sweeps")


def list_sweeps() -> dict[str, str]:
    """Shipped sweep name -> its first comment line (the description), for ``sslp sweep --list``."""
    out = {}
    folder = _sweeps_dir()
    if not folder.is_dir():
        return out
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            lines = entry.read_text().splitlines()
            out[entry.name[: -len(".yaml")]] = lines[0].lstrip("# ").strip() if lines else ""
    return out


def read_sweep(source: str) -> dict:
    """A shipped sweep name or a sweep YAML path -> its raw mapping."""
    raw = read_yaml_mapping(source, "sweep", list_sweeps(),
                            lambda name: _sweeps_dir().joinpath(name + ".yaml").read_text())
    if "preset" not in raw and "space" not in raw and any(k in raw for k in CONFIG_SECTIONS):
        raise ConfigError(f"{source} is a run config, not a sweep; a sweep YAML has preset: (this config), "
                          f"space: and metric: keys (`sslp presets` lists the shipped sweeps)")
    return raw


# ----------------------------------------------------------------------------- overrides

def split_overrides(overrides: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Command-line ``key=value`` -> (sweep overrides, config overrides), each dotted key -> value.
    The first part of the key decides: a sweep key (SWEEP_KEYS) or a config section."""
    sweep, config = {}, {}
    for text in overrides:
        key, value = parse_override(text)
        top = key.split(".", 1)[0]
        if top in SWEEP_KEYS:
            sweep[key] = value
        elif top in CONFIG_SECTIONS:
            config[key] = value
        else:
            close = difflib.get_close_matches(top, SWEEP_KEYS + CONFIG_SECTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"override {text!r}: {top!r} is neither a sweep key ({', '.join(SWEEP_KEYS)}) nor a "
                              f"config section ({', '.join(CONFIG_SECTIONS)}){hint}")
    return sweep, config


def _apply_sweep_override(raw: dict, key: str, value: Any) -> None:
    """``scheduler.grace_period=10`` sets raw["scheduler"]["grace_period"]; ``space.train.lr=...`` and
    ``overrides.train.lr=...`` keep the config key after the first dot whole."""
    top, _, rest = key.partition(".")
    if not rest:
        raw[top] = value
        return
    section = raw.setdefault(top, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{key}: {top} is a value, not a section")
    section[rest] = value


# ----------------------------------------------------------------------------- parsing

def _param(key: str, raw: Any) -> Param:
    top = key.split(".", 1)[0]
    if top not in CONFIG_SECTIONS[:-1] or "." not in key:
        raise ConfigError(f"space.{key}: a searched key is a config key such as method.temperature or "
                          f"train.batch_size (sections: {', '.join(CONFIG_SECTIONS[:-1])})")
    if key == "method.name" or top == "scaling":
        raise ConfigError(f"space.{key}: the method and the resources of a trial are fixed per sweep (set them in "
                          f"overrides); search the method's hyperparameters")
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in SPACE_KINDS:
        raise ConfigError(f"space.{key}={raw!r}: expected one of {{choice: [...]}}, {{grid: [...]}}, "
                          f"{{uniform: [low, high]}}, {{loguniform: [low, high]}}, {{randint: [low, high]}}")
    kind, values = next(iter(raw.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"space.{key}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("choice", "grid"):
        return Param(key, kind, tuple(values))
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"space.{key}.{kind}: expected [low, high] numbers, got {values!r}")
    low, high = values
    if kind == "randint":
        if not all(isinstance(v, int) for v in values) or high <= low:
            raise ConfigError(f"space.{key}.randint: expected ints [low, high) with high > low, got {values!r}")
    elif not low < high:
        raise ConfigError(f"space.{key}.{kind}: expected low < high, got {values!r}")
    elif kind == "loguniform" and low <= 0:
        raise ConfigError(f"space.{key}.loguniform: the bounds must be positive, got {values!r}")
    else:
        low, high = float(low), float(high)
    return Param(key, kind, (low, high))


def _int(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r}: expected an int >= {low}")
    return value


def _default_metric(cfg: ExperimentConfig) -> tuple[str, str]:
    """The method's online metric when online evaluation is on, else the training loss."""
    if cfg.eval.online_every > 0:
        from ssl_platform.methods import method_spec  # imported lazily: ssl_models and torch

        spec = method_spec(cfg.method.name)
        return spec.online_metric, spec.online_mode
    return "loss", "min"


def _mode_of(metric: str) -> str | None:
    if metric in LOWER_IS_BETTER:
        return "min"
    from ssl_platform.methods import method_specs

    return {spec.online_metric: spec.online_mode for spec in method_specs().values()}.get(metric)


def trial_raw(base: ExperimentConfig | dict, values: dict[str, Any], **top: Any) -> dict:
    """The raw config of one trial: ``base`` (a config or its ``to_dict()``) with the trial's
    ``values`` (dotted keys) and top-level keys (``name``, ``runs_dir``) set."""
    raw = copy.deepcopy(base if isinstance(base, dict) else base.to_dict())
    for key, value in values.items():
        set_dotted(raw, key, value)
    raw.update(top)
    return raw


def check_trial(base: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    """The validated config of one trial; a bad key or value raises ConfigError naming the trial values."""
    from ssl_platform import methods  # ssl_models and torch, not Ray

    try:
        return methods.validate(from_dict(trial_raw(base, values)))
    except ConfigError as e:
        where = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ConfigError(f"trial with {where}: {e}") from None


def load_sweep(source: str, overrides: list[str] = (), *, check_trials: bool = True) -> SweepSpec:
    """Sweep name or YAML path + command-line overrides -> a checked SweepSpec (no Ray)."""
    raw = read_sweep(source)
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), SWEEP_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: unknown sweep key {unknown[0]!r}{hint}; sweep keys: {', '.join(SWEEP_KEYS)}")
    sweep_over, config_over = split_overrides(list(overrides))
    for key, value in sweep_over.items():
        _apply_sweep_override(raw, key, value)

    if not isinstance(raw.get("name"), str) or not raw["name"] or "/" in raw["name"]:
        raise ConfigError(f"{source}: name: the sweep needs a name (a file name, the sweep directory is RUNS_DIR/NAME)")
    if "preset" not in raw:
        raise ConfigError(f"{source}: preset: name the base preset (or config YAML) every trial starts from")
    fixed = raw.get("overrides") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{source}: overrides: expected a mapping of config keys to values, "
                          f"e.g. train.max_steps: 300")
    fixed = {**{str(k): v for k, v in fixed.items()}, **config_over}
    for key in fixed:
        if key.split(".", 1)[0] not in CONFIG_SECTIONS:
            raise ConfigError(f"overrides.{key}: expected a config key such as train.max_steps "
                              f"(sections: {', '.join(CONFIG_SECTIONS)}); name is the sweep's own")
    preset = str(raw["preset"])
    beside = Path(source).parent / preset  # a config YAML next to the sweep file
    if Path(preset).suffix in (".yaml", ".yml") and not Path(preset).exists() and beside.is_file():
        preset = str(beside.resolve())
    base_raw = load_config(preset).to_dict()
    for key, value in fixed.items():
        set_dotted(base_raw, key, value)
    try:
        base = from_dict(base_raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: overrides: {e}") from None
    if "://" in base.runs_dir:
        raise ConfigError(f"runs_dir={base.runs_dir}: a sweep writes its table and plots to a local (or shared) "
                          f"directory; set runs_dir to a path")
    if base.scaling.num_workers == 0:
        raise ConfigError("scaling.num_workers=0 (local mode) trains in the driver process, and a trial is not "
                          "one: set scaling.num_workers=1 or more")
    if base.scaling.elastic:
        raise ConfigError(f"scaling.num_workers={base.scaling.num_workers}: a sweep reserves each trial's "
                          f"resources up front, so an elastic range cannot resize; give one worker count")

    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict) or not space_raw:
        raise ConfigError(f"{source}: space: give at least one searched key, e.g. method.temperature: "
                          f"{{loguniform: [0.05, 0.5]}}")
    space = [_param(str(k), v) for k, v in space_raw.items()]
    clash = [p.key for p in space if p.key in fixed]
    if clash:
        raise ConfigError(f"{clash[0]} is both searched (space) and fixed (overrides); keep one")

    sched = raw.get("scheduler") or {}
    if not isinstance(sched, dict) or any(k not in SCHEDULER_KEYS for k in sched):
        raise ConfigError(f"scheduler: expected a mapping with {', '.join(SCHEDULER_KEYS)} (ASHA on the step), "
                          f"got {sched!r}")

    metric, mode = raw.get("metric"), raw.get("mode")
    if metric is None:
        metric, default_mode = _default_metric(base)
        mode = mode or default_mode
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"metric={metric!r}: expected a reported metric name such as loss or val_knn_top1")
    if metric.startswith("val_") and base.eval.online_every == 0:
        raise ConfigError(f"metric={metric} is an online-evaluation metric but eval.online_every=0; set "
                          f"overrides: eval.online_every: N (steps between online evaluations)")
    mode = mode or _mode_of(metric)
    if mode not in ("min", "max"):
        raise ConfigError(f"mode={mode!r}: expected min or max (whether a lower or a higher {metric} is better)")

    num_samples = _int("num_samples", raw.get("num_samples", 1), 1)
    concurrent = raw.get("max_concurrent_trials", "auto")
    if concurrent != "auto":
        concurrent = _int("max_concurrent_trials", concurrent, 1)

    spec = SweepSpec(name=raw["name"], preset=preset, overrides=fixed, metric=metric, mode=mode,
                     num_samples=num_samples, max_concurrent_trials=concurrent, grace_period=0,
                     reduction_factor=0.0, space=space, base=base)
    spec.max_steps = max([base.train.max_steps] + [int(v) for p in space if p.key == "train.max_steps"
                                                   for v in p.samples() if isinstance(v, (int, float))])
    spec.grace_period = _int("scheduler.grace_period", sched.get("grace_period", max(1, spec.max_steps // 4)), 1)
    if spec.grace_period >= spec.max_steps:
        raise ConfigError(f"scheduler.grace_period={spec.grace_period} is not below train.max_steps={spec.max_steps}: "
                          f"no trial could be stopped early; lower it")
    rf = sched.get("reduction_factor", 2)
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 1:
        raise ConfigError(f"scheduler.reduction_factor={rf!r}: expected a number > 1 (2 keeps the better half "
                          f"at each rung)")
    spec.reduction_factor = float(rf)
    if check_trials:
        check_space(spec)
    return spec


def check_space(spec: SweepSpec) -> int:
    """Validate the trial config for every sampled value of every key (the other keys at their
    first sample). Returns how many configs were checked."""
    first = {p.key: p.samples()[0] for p in spec.space}
    checked = 0
    seen = set()
    for p in spec.space:
        for value in p.samples():
            values = {**first, p.key: value}
            marker = repr(sorted(values.items(), key=lambda kv: kv[0]))
            if marker in seen:
                continue
            seen.add(marker)
            check_trial(spec.base, values)
            checked += 1
    return checked


# ----------------------------------------------------------------------------- resources

def trial_resources(cpus_per_worker: float, num_workers: int, use_gpu: bool, data_cpus: float) -> dict[str, float]:
    """What one trial holds while it trains: its train workers plus the data pipeline's CPUs
    (the trial's own driver and the Train controller hold no CPU)."""
    return {"CPU": num_workers * cpus_per_worker + data_cpus, "GPU": float(num_workers if use_gpu else 0)}


def concurrent_trials(per_trial: dict[str, float], cluster: dict[str, float], requested: int | str = "auto") -> int:
    """``max_concurrent_trials``: "auto" = how many trials fit in the cluster at once (CPUs, and
    GPUs when trials use them), at least 1; an int is taken as given."""
    if requested != "auto":
        return int(requested)
    fits = []
    for resource in ("CPU", "GPU"):
        need = per_trial.get(resource, 0.0)
        if need > 0:
            fits.append(math.floor(cluster.get(resource, 0.0) / need + 1e-9))
    return max(1, min(fits) if fits else 1)

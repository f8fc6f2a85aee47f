"""Config schema, presets, overrides, and the errors a user sees for bad input."""

import subprocess
import sys

import pytest

from ssl_platform import methods
from ssl_platform.config import ConfigError, from_dict, list_presets, worker_counts
from ssl_platform.config import load_config as load_raw


def load_config(preset: str, overrides: list[str] = ()):
    """What the CLI does: the schema, then the method's own keys and constructor."""
    return methods.validate(load_raw(preset, overrides))


def test_preset_loads_with_typed_overrides():
    cfg = load_config("simclr-digits", ["train.max_steps=7", "method.temperature=0.3", "model.encoder_widths=[8,16]",
                                        "scaling.cpus_per_worker=0.25", "eval.enabled=false"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.method.options["temperature"] == 0.3
    assert cfg.model["encoder_widths"] == [8, 16]
    assert cfg.scaling.cpus_per_worker == 0.25
    assert cfg.eval.enabled is False


def test_int_is_accepted_for_float_and_saved_config_round_trips():
    cfg = load_config("simclr-digits", ["train.lr=1"])
    assert isinstance(cfg.train.lr, float)
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, expected", [
    ("train.max_step=3", "did you mean 'train.max_steps'"),
    ("trian.lr=0.1", "did you mean 'train.lr'"),
    ("train.lr=fast", "train.lr='fast': expected a float"),
    ("train.max_steps=0", "train.max_steps=0: expected an int >= 1"),
    ("train.max_steps=2.5", "expected an int"),
    ("method.temperature=0", "method simclr: temperature must be positive, got 0.0"),
    ("method.temperature=cold", "method.temperature='cold': expected a float"),
    ("method.projector_width=64", "projector_width is an architecture setting; set model.projector_width instead"),
    ("model.projector_widht=64", ("unknown config key 'model.projector_widht' for method simclr; did you mean "
                                 "model.projector_width?")),
    ("model.in_channels=3", "model.in_channels is set by the platform from the corpus"),
    ("train.optimizer=adam", "expected one of lars, adamw, sgd"),
    ("scaling.use_gpu=yes please", "expected true or false"),
    ("scaling.num_workers=3", "use a multiple of 3"),
    ("train.grad_accum_steps=3", "does not split into scaling.num_workers=2 x train.grad_accum_steps=3 equal"),
    ("train.grad_accum_mode=exactly", "train.grad_accum_mode='exactly': expected one of exact, independent"),
    ("model.encoder_widths=[0,4]", "list of positive ints"),
    ("train", "not of the form section.key=value"),
])
def test_bad_overrides_name_the_key_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config("simclr-digits", [override])
    assert expected in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_an_elastic_range_parses_and_keeps_only_the_worker_counts_that_split_the_global_batch():
    cfg = load_config("simclr-digits", ["scaling.num_workers=[1,6]", "train.batch_size=64"])
    assert cfg.scaling.num_workers == [1, 6] and cfg.scaling.elastic
    assert (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 6)
    assert worker_counts(cfg) == [1, 2, 4]  # 3, 5 and 6 do not divide 64: never used
    with_accum = load_config("simclr-digits", ["scaling.num_workers=[2,8]", "train.batch_size=96",
                                               "train.grad_accum_steps=4"])
    assert worker_counts(with_accum) == [2, 3, 4, 6, 8]  # 96 / (N x 4) micro-batches of equal size
    assert from_dict(cfg.to_dict()) == cfg  # the saved config.yaml resumes the same range
    assert worker_counts(load_config("simclr-digits", ["scaling.num_workers=4"])) == [4]


@pytest.mark.parametrize("override, expected", [
    ("scaling.num_workers=[0,4]", ("scaling.num_workers=[0, 4]: expected an int >= 0 (0: local mode), or [MIN, MAX] "
                                  "with 1 <= MIN <= MAX (an elastic run)")),
    ("scaling.num_workers=[4,2]", "scaling.num_workers=[4, 2]: expected an int >= 0"),
    ("scaling.num_workers=[1,2,4]", "scaling.num_workers=[1, 2, 4]: expected an int >= 0"),
    ("scaling.num_workers=[5,7]", ("scaling.num_workers=[5, 7]: no worker count from 5 to 7 splits "
                                  "train.batch_size=64 evenly (each worker takes batch/N); widen the range to include "
                                  "4 or 8 or change train.batch_size")),
])
def test_an_elastic_range_no_worker_count_of_which_splits_the_batch_is_refused_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config("simclr-digits", [override, "train.batch_size=64"])
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="did you mean 'simclr-digits'"):
        load_config("simclr-digit")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/config.yaml")


def test_yaml_file_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ntrain:\n  max_steps: 11\n")
    cfg = load_config(str(path), ["train.batch_size=64"])
    assert (cfg.name, cfg.train.max_steps, cfg.train.batch_size) == ("mine", 11, 64)
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


def test_list_presets_has_descriptions():
    presets = list_presets()
    assert presets["simclr-digits"].startswith("SimCLR")


@pytest.mark.parametrize("args, expected", [
    (["run", "simclr-digits", "train.max_step=3"], "did you mean 'train.max_steps'"),
    (["run", "simclr-digits", "method.temperature=-1"], "temperature must be positive, got -1.0"),
    (["run", "missing.yaml"], "does not exist"),
])
def test_cli_config_errors_exit_nonzero_before_ray_starts(args, expected):
    # The check that ray was never imported proves the error came before any cluster start; a
    # typo in a key is caught before torch loads, too (0.2 s instead of 2+).
    before_torch = "'torch' not in sys.modules" if "max_step=" in args[-1] else "True"
    code = ("import sys; from ssl_platform.cli import main; rc = main(sys.argv[1:]); "
            f"assert 'ray' not in sys.modules, 'ray was imported'; assert {before_torch}, 'torch was imported'; "
            "sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr


def test_cli_dry_run_prints_layout():
    done = subprocess.run([sys.executable, "-m", "ssl_platform.cli", "run", "simclr-digits", "--dry-run",
                           "train.batch_size=128"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "global batch 128 = 2 x 64 per worker" in done.stdout


@pytest.mark.parametrize("overrides, expected", [
    (["data.corpus=python-docs"], "data.corpus=python-docs is a text corpus but method.name=simclr trains on image"),
    (["data.path=/data/x", "data.kind=audio"], "set data.kind=image"),
])
def test_corpus_must_fit_the_method(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("simclr-digits", overrides)


def test_user_corpus_keys():
    cfg = load_config("simclr-digits", ["data.path=s3://bucket/images", "data.format=webdataset", "data.strict=true",
                                        "eval.enabled=false", "eval.online_every=0"])
    assert (cfg.data.path, cfg.data.kind, cfg.data.format, cfg.data.strict) == ("s3://bucket/images", "image",
                                                                                 "webdataset", True)


def test_evaluation_needs_a_labelled_split():
    # An image folder has no labelled held-out split: refused up front, at either evaluation.
    with pytest.raises(ConfigError, match=r"eval.enabled: .*set eval.data=PATH .*, or eval.enabled=false "
                                          r"eval.online_every=0"):
        load_config("simclr-digits", ["data.path=/data/images"])
    with pytest.raises(ConfigError, match=r"eval.online_every: "):
        load_config("simclr-digits", ["data.path=/data/images", "eval.enabled=false", "eval.online_every=10"])
    # Every method evaluates on its built-in corpus, and text methods on a user corpus's held-out split.
    for preset in ("clip-digit-captions", "cpc-spoken-digits", "bert-python-docs", "gpt-python-docs"):
        assert load_config(preset, ["eval.enabled=true", "eval.online_every=10"]).eval.enabled
    assert load_config("gpt-python-docs", ["data.path=/data/text", "data.kind=text", "eval.enabled=true"]).eval.enabled


def test_sync_batchnorm_is_refused_for_a_method_without_batchnorm():
    """Only an explicit true: the default (empty) means "wherever there is BatchNorm"."""
    assert load_config("clip-digit-captions").scaling.sync_batchnorm is None
    with pytest.raises(ConfigError, match=r"^scaling\.sync_batchnorm=true: CLIP has no BatchNorm layer") as e:
        load_config("clip-digit-captions", ["scaling.sync_batchnorm=true"])
    assert "\n" not in str(e.value)
    load_config("clip-digit-captions", ["scaling.sync_batchnorm=false"])
    load_config("clip-digit-captions", ["scaling.sync_batchnorm=true", "model.image_tower=resnet",
                                        "data.image_size=32"])  # its ResNet tower has BatchNorm
    assert load_config("simclr-digits", ["scaling.sync_batchnorm=true"]).scaling.sync_batchnorm is True


def test_unknown_method_fails_at_config_time_naming_it():
    with pytest.raises(ConfigError, match=r"method.name='simclrr': unknown method \(did you mean 'simclr'\?\); "
                                          r"expected one of .*simclr"):
        load_config("simclr-digits", ["method.name=simclrr"])


def test_a_method_whose_spec_is_missing_or_incomplete_fails_at_config_time(monkeypatch):
    """A method registered without its declaration, or with one that lacks a field its data kind
    needs, stops the config in one line naming the method and what is missing."""
    import dataclasses

    import ssl_models

    class Undeclared(ssl_models.SimCLR):
        spec = None

    class NoViews(ssl_models.SimCLR):
        spec = dataclasses.replace(ssl_models.SimCLR.spec, views=(), derived=("in_channels", "sample_rate"))

    monkeypatch.setitem(ssl_models.METHODS, "undeclared", Undeclared)
    monkeypatch.setitem(ssl_models.METHODS, "no_views", NoViews)
    with pytest.raises(ConfigError, match=r"^method undeclared \(Undeclared\) declares itself incompletely: "
                                          r"Undeclared has no spec") as e:
        load_config("simclr-digits", ["method.name=undeclared"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^method no_views \(NoViews\) declares itself incompletely: spec.views "
                                          r"is empty; spec.derived names sample_rate, which the constructor does "
                                          r"not take"):
        load_config("simclr-digits", ["method.name=no_views"])


def test_config_module_needs_neither_torch_nor_ssl_models():
    # A bad key is refused before torch loads; the method's own checks (its spec) come after.
    code = ("import sys; from ssl_platform.config import load_config; load_config('simclr-digits', ['train.lr=1']); "
            "assert not {'torch', 'ssl_models'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

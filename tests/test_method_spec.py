"""Every method declares itself (ssl_models.spec): complete specs, the interface, no torch in the spec."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import ssl_models
from ssl_models.protocol import Method
from ssl_models.spec import MethodSpec, spec_problems


@pytest.mark.parametrize("name", sorted(ssl_models.METHODS))
def test_every_method_has_a_complete_spec_and_the_interface(name):
    cls = ssl_models.METHODS[name]
    assert spec_problems(cls) == []
    assert isinstance(cls.spec, MethodSpec)
    assert all(callable(getattr(cls, hook, None)) for hook in ("forward", "embed"))
    # encode_* exist for the modalities the spec says it embeds only where evaluation needs them,
    # but every encode_* a method has is one of its modalities.
    assert {m for m in ("image", "text", "audio") if hasattr(cls, f"encode_{m}")} <= set(cls.spec.embeds)


def test_a_built_method_satisfies_the_protocol():
    method = ssl_models.build_method("simclr", in_channels=1, encoder_widths=[8, 16], projector_width=16)
    assert isinstance(method, Method)


def test_incomplete_or_missing_specs_are_named():
    class NoSpec:
        def __init__(self, width: int = 1): ...

    class Incomplete(NoSpec):
        spec = MethodSpec(display_name="X", data_kind="image", batch_keys=("view1",), embeds=("image", "smell"),
                          online_metric="knn", online_mode="up", objective_keys=frozenset({"temperature"}))

    assert spec_problems(NoSpec) == ["NoSpec has no spec (a MethodSpec class attribute, see ssl_models.spec)"]
    problems = spec_problems(Incomplete)
    assert "spec.views is empty" in problems  # an image method needs its views recipe
    assert "spec.online_mode='up' is not one of max, min" in problems
    assert "spec.online_metric='knn' does not start with val_" in problems
    assert any("smell" in p for p in problems)
    assert "spec.objective_keys names temperature, which the constructor does not take" in problems


def test_views_a_method_or_a_config_cannot_build_fail_at_config_time(monkeypatch):
    """Multi-crop is data: a third, local view is one more mapping and one more batch key. A spec
    whose keys do not match its views, or a data.image_size its smallest view cannot be cut
    from, is a ConfigError naming the method before anything starts."""
    from ssl_models.methods.simclr import SimCLR
    from ssl_platform import methods
    from ssl_platform.config import ConfigError, load_config

    local = {"size_frac": 0.25, "crop_scale_min": 0.05, "crop_scale_max": 0.3}
    views = (*SimCLR.spec.views, local)

    class Mismatched(SimCLR):
        spec = dataclasses.replace(SimCLR.spec, views=views)  # batch_keys still view1, view2

    class MultiCrop(SimCLR):
        spec = dataclasses.replace(SimCLR.spec, views=views, batch_keys=("view1", "view2", "view3"))

    assert any("do not match spec.views" in p and "view3" in p for p in spec_problems(Mismatched))
    monkeypatch.setitem(ssl_models.METHODS, "mismatched", Mismatched)
    with pytest.raises(ConfigError, match=r"method mismatched \(Mismatched\) declares itself incompletely"):
        methods.validate(load_config("simclr-digits", ["method.name=mismatched"]))
    monkeypatch.setitem(ssl_models.METHODS, "multicrop", MultiCrop)
    with pytest.raises(ConfigError, match=r"method multicrop's views \(spec.views\) at data.image_size=16: "
                                          r"a view's side is 4 pixels"):
        methods.validate(load_config("simclr-digits", ["method.name=multicrop", "data.image_size=16"]))
    methods.validate(load_config("simclr-digits", ["method.name=multicrop", "data.image_size=32"]))  # 8 pixels


def test_the_spec_module_needs_no_torch():
    # The spec is data: read it (and check it) without torch, e.g. from a docs build.
    path = Path(ssl_models.__file__).parent / "spec.py"
    code = (f"import sys, importlib.util; spec = importlib.util.spec_from_file_location('s', {str(path)!r}); "
            "m = sys.modules['s'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string literal in ``path`` that is code, not a docstring."""
    import ast

    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_the_platform_never_names_a_method():
    # What the platform knows about a method it reads from the method's spec: no per-method
    # table, no `== "bert"` branch. The one name allowed is method.name's default.
    root = Path(__file__).parents[1] / "platform" / "ssl_platform"
    found = [f"{path.relative_to(root)}:{line}: {value!r}" for path in sorted(root.rglob("*.py"))
             for line, value in _string_constants(path) if value in ssl_models.METHODS]
    assert [f for f in found if not (f.startswith("config.py:") and f.endswith("'simclr'"))] == []
    assert len(found) <= 1


def test_help_config_lists_the_methods(capsys):
    from ssl_platform import cli

    assert cli.main(["run", "simclr-digits", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "method.temperature" in out and "model.projector_width" in out
    assert "method.name: one of " + ", ".join(ssl_models.METHODS) in out

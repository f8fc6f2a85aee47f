"""Every method declares itself (ssl_models.spec): complete specs, the interface, no torch in the spec."""

from __future__ import annotations

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


def test_the_spec_module_needs_no_torch():
    # The spec is data: read it (and check it) without torch, e.g. from a docs build.
    path = Path(ssl_models.__file__).parent / "spec.py"
    code = (f"import sys, importlib.util; spec = importlib.util.spec_from_file_location('s', {str(path)!r}); "
            "m = sys.modules['s'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

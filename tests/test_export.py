"""``sslp export``: the README's own snippet, run in a fresh interpreter that never imports
ssl_platform or ssl_models, gives the embeddings ``ssl_platform.load`` gives, to 1e-5."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from test_pretrained import TEXTS, make_run

import ssl_platform
from ssl_platform.cli import main as sslp
from ssl_platform.export import export, modeling_source

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

# Appended to the README snippet: embed the test's inputs, save them, and prove nothing of the
# platform was imported. ``python -I`` keeps the repository and PYTHONPATH off sys.path.
CHECK = '''
import pickle
import sys as _sys

_inputs = pickle.load(open(_sys.argv[1], "rb"))
_out = {name: globals()[name](*args).numpy() for name, args in _inputs.items()}
pickle.dump(_out, open(_sys.argv[2], "wb"))
_leaked = sorted(m for m in _sys.modules if m.split(".")[0] in ("ssl_platform", "ssl_models"))
assert not _leaked, _leaked
'''


def run_readme(directory: Path, inputs: dict, tmp_path: Path) -> dict[str, np.ndarray]:
    """Run the README's Python block in ``directory`` with ``python -I``, calling each
    ``inputs[function] = args``; returns the outputs."""
    import pickle

    code = (directory / "README.md").read_text().split("```python\n")[1].split("```")[0]
    (tmp_path / "in.pkl").write_bytes(pickle.dumps(inputs))
    result = subprocess.run([sys.executable, "-I", "-c", code + CHECK, str(tmp_path / "in.pkl"),
                             str(tmp_path / "out.pkl")], cwd=directory, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return pickle.loads((tmp_path / "out.pkl").read_bytes())


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-runs")


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    from ssl_platform.data.builtin import load_digits_splits

    return load_digits_splits(image_size=16)["val"].images[:6]  # uint8 (6, 1, 16, 16)


@pytest.mark.parametrize("method_name", ["simclr", "rotnet", "dino"])  # the latter two: ssl_models code only
def test_image_export_matches_load_in_a_fresh_process(root, digits, tmp_path, method_name):
    import torch

    run_dir, method = make_run(root, method_name)
    out = export(run_dir, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "modeling.py"]
    assert set(load_file(out / "model.safetensors")) == set(method.encoder.state_dict())  # no projector
    config = json.loads((out / "config.json").read_text())
    assert config["preprocessing"]["image_size"] == 16 and config["preprocessing"]["channels"] == 1
    expected = ssl_platform.load(run_dir).embed_images(digits.transpose(0, 2, 3, 1))
    got = run_readme(out, {"embed_images": (torch.from_numpy(digits),)}, tmp_path)
    np.testing.assert_allclose(got["embed_images"], expected, atol=1e-5)


def test_clip_export_matches_load_with_open_clip_alone(root, digits, tmp_path):
    import torch

    run_dir, method = make_run(root, "clip")
    out = export(run_dir, tmp_path / "export")
    assert not (out / "modeling.py").exists()  # open_clip's own towers
    weights = load_file(out / "model.safetensors")
    assert "logit_scale" in weights and set(weights) == set(method.towers.state_dict())
    captions = ["a handwritten 3", "the digit seven", "zero"]
    pretrained = ssl_platform.load(run_dir)
    got = run_readme(out, {"embed_images": (torch.from_numpy(digits),), "embed_texts": (captions,)}, tmp_path)
    np.testing.assert_allclose(got["embed_images"], pretrained.embed_images(digits.transpose(0, 2, 3, 1)), atol=1e-5)
    np.testing.assert_allclose(got["embed_texts"], pretrained.embed_texts(captions), atol=1e-5)


@pytest.mark.parametrize("method_name", ["bert", "gpt"])
def test_text_export_matches_load_with_its_tokenizer(root, tmp_path, method_name):
    run_dir, method = make_run(root, method_name)
    out = export(run_dir, tmp_path / "export")
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert set(load_file(out / "model.safetensors")) == set(method.transformer.state_dict())  # no LM/MLM head
    texts = [*TEXTS, ""]
    got = run_readme(out, {"embed_texts": (texts,)}, tmp_path)
    np.testing.assert_allclose(got["embed_texts"], ssl_platform.load(run_dir).embed_texts(texts), atol=1e-5)


def test_cpc_export_matches_load(root, tmp_path):
    run_dir, _ = make_run(root, "cpc")
    out = export(run_dir, tmp_path / "export")
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.3 + 0.1 for n in (2000, 4100, 3000)]
    got = run_readme(out, {"embed_audio": (clips,)}, tmp_path)
    np.testing.assert_allclose(got["embed_audio"], ssl_platform.load(run_dir).embed_audio(clips, 16_000), atol=1e-5)


def test_sslp_export_refuses_a_missing_run_and_a_non_empty_out_unless_forced(tmp_path, capsys):
    run_dir, _ = make_run(tmp_path / "runs", "simclr")
    assert sslp(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "a")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    assert sslp(["export", str(run_dir), "--out", str(tmp_path / "b")]) == 2
    assert "not empty" in capsys.readouterr().err and not (tmp_path / "b" / "model.safetensors").exists()
    assert sslp(["export", str(run_dir), "--out", str(tmp_path / "b"), "--force"]) == 0
    assert (tmp_path / "b" / "model.safetensors").is_file() and (tmp_path / "b" / "notes.txt").is_file()


def test_modeling_is_the_ssl_models_source_and_refuses_a_module_with_platform_imports():
    import ssl_models.transformer

    source = modeling_source(("ssl_models.transformer",))
    assert Path(ssl_models.transformer.__file__).read_text() in source  # verbatim
    with pytest.raises(ValueError, match=r"imports ssl_models.encoders"):
        modeling_source(("ssl_models.methods.simclr",))

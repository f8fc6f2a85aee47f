"""`sslp data inspect` through the CLI: a built-in corpus, and a path that does not exist."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray


def sslp(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl_platform.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_inspect_builtin_text_corpus_counts_and_draws_the_masks(tmp_path):
    done = sslp("data", "inspect", "python-docs", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "python-docs (text): 79 usable records; skipped 0 records" in done.stdout
    assert (tmp_path / "out" / "text_masks.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_missing_path_names_it_and_exits_2(tmp_path):
    done = sslp("data", "inspect", str(tmp_path / "nope"), "--kind", "audio", cwd=tmp_path)
    assert done.returncode == 2 and "nope" in done.stderr.strip().splitlines()[-1]

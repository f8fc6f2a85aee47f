"""`sslp data inspect` through the CLI: a built-in corpus on the session's Ray head, and a path
that does not exist (refused before Ray starts, so tested in-process)."""

import pytest
from conftest import show

from ssl_platform import cli
from ssl_platform.data.python_docs import python_docs_documents


@pytest.mark.ray
def test_inspect_builtin_text_corpus_counts_and_draws_the_masks(sslp, tmp_path):
    done = sslp("data", "inspect", "python-docs", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, show(done)
    # The interpreter's own pydoc topics: their number depends on the Python version.
    records = len(python_docs_documents())
    assert records > 50
    assert f"python-docs (text): {records} usable records; skipped 0 records" in done.stdout
    assert (tmp_path / "out" / "text_masks.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_missing_path_names_it_and_exits_2_before_ray(tmp_path, capsys, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a path that does not exist")

    monkeypatch.setattr(ray, "init", no_ray)
    assert cli.main(["data", "inspect", str(tmp_path / "nope"), "--kind", "audio"]) == cli.EXIT_USAGE
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"sslp: data: corpus '{tmp_path / 'nope'}' does not exist; check the path (or URI) and try again"

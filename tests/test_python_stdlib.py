"""The built-in text corpus python-stdlib: prose only, no test suites, deterministic, cached, split by
module, and a ``data.corpus`` value for BERT's and GPT's data paths."""

import textwrap

import numpy as np
import pytest

from ssl_platform.data.python_stdlib import (
    build_documents,
    cache_path,
    cached_documents,
    module_prose,
    python_stdlib_documents,
    stdlib_modules,
)
from ssl_platform.data.text_corpora import load_text_corpus

MODULE = textwrap.dedent('''\
    #!/usr/bin/env python3
    # Copyright 2001 Someone. All Rights Reserved.
    """A parser for the frobnication format, used by the mail tools.

    >>> frobnicate("abc")
    'cba'

    Usage: frob [-v] FILE
    """
    import os

    # The table is built once at import time, because reading it again is slow.
    # Keep it sorted so that lookups can bisect.
    TABLE = {"a": 1}  # x = y + 1
    NAMES = [
        "not a docstring: an item of a list, even if it reads like a sentence",
    ]


    class Frob:
        """Frobnicate a stream of records, one record at a time."""

        limit = 3
        """The most records a single call will ever read from the stream."""

        def run(self, x):
            r"""Return the records of x, in the order they were read."""
            return f"{x}"  # if x > 0: return x
    ''')


def fake_stdlib(root):
    """A standard library in miniature: modules, a package, and what must be left out."""
    files = {"frob.py": MODULE, "pkg/__init__.py": '"""The package that groups the tools for the mail system."""\n',
             "pkg/sub.py": '"""Helpers of the package that read and write the mail headers."""\n',
             "test/test_frob.py": '"""Tests for the frobnication format and its parser."""\n',
             "pkg/tests/helper.py": '"""A helper that the tests of the package share with each other."""\n',
             "idlelib/idle_test/mock.py": '"""A mock of the editor window used by every test."""\n',
             "site-packages/thing/__init__.py": '"""A third-party package that someone installed here."""\n',
             "test_top.py": '"""A test module at the top of the library, not a module."""\n',
             "codeonly.py": "x = 1\n", "broken.py": '"""An unterminated docstring that never ends and'}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_modules_are_prose_only_without_test_suites_and_deterministic(tmp_path):
    root = fake_stdlib(tmp_path / "lib")
    assert [name for name, _ in stdlib_modules(root)] == ["broken", "codeonly", "frob", "pkg", "pkg.sub"]
    docs = build_documents(root)
    assert [name for name, _ in docs] == ["python-stdlib:frob", "python-stdlib:pkg", "python-stdlib:pkg.sub"]
    assert docs == build_documents(root)
    assert module_prose(MODULE).split("\n\n") == [
        "A parser for the frobnication format, used by the mail tools.",
        ("The table is built once at import time, because reading it again is slow. Keep it sorted so that lookups "
         "can bisect."),
        "Frobnicate a stream of records, one record at a time.",
        "The most records a single call will ever read from the stream.",
        "Return the records of x, in the order they were read."]


def test_the_cache_is_written_once_read_back_and_optional(tmp_path, monkeypatch):
    root = fake_stdlib(tmp_path / "lib")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = cached_documents(root)
    assert cache_path(root).is_file() and cached_documents(root) == built == build_documents(root)
    cache_path(root).write_bytes(b"not gzip")  # a corrupt cache is rebuilt, not trusted
    assert cached_documents(root) == built
    (tmp_path / "readonly").write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "readonly"))
    assert cached_documents(root) == built  # cannot be cached: built in memory


def test_the_interpreters_stdlib_is_a_few_mb_of_prose_held_out_by_module():
    docs = python_stdlib_documents()
    names = [d.name.split(":", 1)[1] for d in docs]
    assert len(docs) >= 300 and sum(len(d.text) for d in docs) > 1_000_000 and names == sorted(set(names))
    assert {"json", "asyncio.tasks", "email.message"} <= set(names)
    assert not [n for n in names if {"test", "tests", "idle_test"} & set(n.split("."))]
    assert not [d.name for d in docs if ">>>" in d.text or "::=" in d.text]
    splits = load_text_corpus("python-stdlib", val_fraction=0.2, seed=0)
    train, val = ({d.name for d in splits[s]} for s in ("train", "val"))
    assert not train & val and len(train | val) == len(docs) and abs(len(val) - 0.2 * len(docs)) <= 1
    assert [d.name for d in load_text_corpus("python-stdlib", 0.2, 0)["val"]] == [d.name for d in splits["val"]]
    assert {d.name for d in load_text_corpus("python-stdlib", 0.2, 1)["val"]} != val


@pytest.mark.parametrize("preset", ["bert-python-docs", "gpt-python-docs"])
def test_bert_and_gpt_data_paths_read_it(ray_session, tmp_path, preset):
    """The run's own data builder on python-stdlib: a small training split (val_fraction 0.9) keeps it seconds."""
    from ssl_platform.bench_train import builtin_corpus
    from ssl_platform.config import load_config

    cfg = load_config(preset, ["data.corpus=python-stdlib", "data.val_fraction=0.9", "data.max_len=32",
                               "data.vocab_size=300"])
    corpus = builtin_corpus(cfg, tmp_path)
    rows = corpus.rows(slice(0, 4))
    assert rows["input_ids"].shape == (4, 32) and rows["input_ids"].min() >= 0 and rows["input_ids"].max() < 300
    assert ("mlm_labels" in rows) == preset.startswith("bert") and np.unique(rows["input_ids"]).size > 10

"""Built-in text corpus ``python-stdlib``: the docstrings and comments of the interpreter's own standard library.

Every interpreter ships its standard library as source (``sysconfig.get_paths()["stdlib"]``).
Each module (``json.decoder``, ``asyncio.tasks``, a package's ``__init__``) is one document: its
docstrings (module, classes, functions, and bare strings used as attribute docs) and its comment
blocks, in source order, keeping only the paragraphs that read as English prose (the filter of
``python-docs``: no doctest sessions, no code-like, table-like or heading lines). Test suites
(``test/``, ``tests/``, ``idlelib/idle_test``, ``test_*.py``), installed packages
(``site-packages``) and ``pydoc_data`` (the ``python-docs`` corpus) are left out, and so are
licence headers. On CPython 3.11 that is 669 documents (of 728 modules), ~2.6 million characters
(~420,000 words, ~33,000 sentences; seven times ``python-docs``), ~640,000 WordPiece tokens in the
training split at ``data.vocab_size=2048``; the exact numbers follow the interpreter's version,
like ``python-docs``. Nothing is downloaded.

Reading and tokenising the ~730 source files took 4 s (15 s with the 2 cores loaded 30 deep), so
the documents are cached once per interpreter in ``$XDG_CACHE_HOME/ssl-platform`` (``~/.cache``),
keyed by the interpreter's version, the stdlib's path and :data:`BUILD_VERSION` (800 kB, read
back in 0.04 s). The cache is only a speed-up: where it cannot be written, the corpus is built in
memory.

The train/val split is by module (a whole module is held out), fixed by the seed, like ``python-docs``.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import inspect
import io
import json
import os
import re
import sys
import sysconfig
import tokenize
from pathlib import Path

from ssl_platform.data.python_docs import TextDocument, prose_paragraph, split_documents
from ssl_platform.data.text import split_sentences

CORPUS_NAME = "python-stdlib"
BUILD_VERSION = 1  # bump when what is extracted changes, so stale caches are rebuilt
# Directories never read: test suites, installed third-party packages, the python-docs topics, build output.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "pydoc_data",
                           "__pycache__", "__phello__"})
_OPENS_LINE = frozenset({tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING})
_COMMENT_MARK = re.compile(r"^#+:?\s?")
_LICENCE = re.compile(r"copyright|all rights reserved|licensed to psf", re.IGNORECASE)  # headers, not prose


def stdlib_modules(root: str | Path) -> list[tuple[str, Path]]:
    """``(dotted module name, path)`` of every non-test ``.py`` file under ``root``, sorted by name."""
    root = Path(root)
    found = []
    for directory, dirs, files in os.walk(root):
        # Prune in place: test suites and site-packages are never walked (site-packages can hold thousands of files).
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and d.isidentifier()]
        for f in files:
            if f.endswith(".py") and not f.startswith("test_") and f[:-3].isidentifier():
                parts = (Path(directory) / f).relative_to(root).with_suffix("").parts
                name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                found.append((name, Path(directory) / f))
    return sorted(found)


def source_texts(source: str) -> list[str]:
    """A module's docstrings and comment blocks, in source order.

    A docstring is any statement that is a bare string literal (module, class and function
    docstrings, and the strings written under attributes as their docs); consecutive comment
    lines make one block (a comment after code on its line is a block of its own). One pass of
    ``tokenize``, without parsing the module: on the loaded 2-core machine ``ast.parse`` of the
    stdlib took 18 s and ``tokenize`` 8 s.
    """
    texts, comment, last_comment_line = [], [], -2
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    previous, pending = tokenize.NEWLINE, None  # pending: a string literal that opened a logical line
    try:
        for tok in tokens:
            if tok.type == tokenize.COMMENT:  # a comment neither opens nor closes a statement
                inline = bool(tok.line[:tok.start[1]].strip())  # after code on its line: a block of its own
                if (inline or tok.start[0] != last_comment_line + 1) and comment:
                    texts.append("\n".join(comment))
                    comment = []
                comment.append(_COMMENT_MARK.sub("", tok.string).strip())
                last_comment_line = -2 if inline else tok.start[0]
                continue
            if pending is not None and tok.type == tokenize.NEWLINE:
                texts.append(docstring_value(pending))  # the string was the whole statement: a docstring
            pending = tok.string if tok.type == tokenize.STRING and previous in _OPENS_LINE else None
            previous = tok.type
    except (tokenize.TokenError, SyntaxError):  # a file the interpreter would not compile either: what was read stays
        pass
    if comment:
        texts.append("\n".join(comment))
    return [text for text in texts if text]


def docstring_value(literal: str) -> str:
    """A string literal's value, cleaned as ``help()`` shows a docstring ("" for bytes and f-strings)."""
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError):
        return ""
    return inspect.cleandoc(value) if isinstance(value, str) else ""


def module_prose(source: str) -> str:
    """A module's prose paragraphs (docstrings and comments), separated by blank lines ("" if none)."""
    paragraphs = []
    for text in source_texts(source):
        for block in re.split(r"\n\s*\n", text):
            lines = [line for line in block.split("\n") if line.strip()]
            # A doctest anywhere in the paragraph makes it code, not only at its start; licence headers are dropped.
            if lines and not any(">>>" in line for line in lines):
                prose = prose_paragraph(lines)
                if prose and not _LICENCE.search(prose):
                    paragraphs.append(prose)
    return "\n\n".join(paragraphs)


def build_documents(root: str | Path) -> list[tuple[str, str]]:
    """``(document name, prose)`` of every module under ``root`` with prose, sorted by module name."""
    docs = []
    for name, path in stdlib_modules(root):
        text = module_prose(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            docs.append((f"{CORPUS_NAME}:{name}", text))
    return docs


def cache_path(root: str | Path) -> Path:
    """Where the documents of the stdlib at ``root`` are cached for this interpreter."""
    key = hashlib.sha256(f"{BUILD_VERSION}|{sys.version}|{Path(root).resolve()}".encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ssl-platform" / f"{CORPUS_NAME}-{sys.version_info.major}.{sys.version_info.minor}-{key}.json.gz"


def cached_documents(root: str | Path) -> list[tuple[str, str]]:
    """:func:`build_documents` of ``root``, read from the cache when it is there, else built and cached."""
    path = cache_path(root)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [(name, text) for name, text in json.load(f)]
    except (OSError, ValueError, EOFError):  # absent or unreadable: build it again
        pass
    docs = build_documents(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with gzip.open(partial, "wt", encoding="utf-8") as f:
            json.dump(docs, f)
        os.replace(partial, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError:
        pass  # a read-only home: the corpus still works, built each time
    return docs


@functools.cache
def python_stdlib_documents() -> list[TextDocument]:
    """Every module of this interpreter's standard library with prose, sorted by module name."""
    return [TextDocument(name, text, tuple(split_sentences(text)))
            for name, text in cached_documents(sysconfig.get_paths()["stdlib"])]


def load_python_stdlib(val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[TextDocument]]:
    """``{"train": [...], "val": [...]}``: modules held out whole, at least one each side."""
    return split_documents(python_stdlib_documents(), val_fraction, seed)

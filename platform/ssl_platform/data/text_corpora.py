"""The built-in text corpora by name: their documents, split by document, as lists or as Ray Datasets.

``python-docs`` (:mod:`ssl_platform.data.python_docs`): the ~80 help topics bundled with the
interpreter, ~350k characters. ``python-stdlib`` (:mod:`ssl_platform.data.python_stdlib`): the
docstrings and comments of the interpreter's standard library, one document per module, ~2.6M
characters. Both exist offline on every machine, and both hold out whole documents, fixed by the seed.
"""

from __future__ import annotations

from collections.abc import Callable

from ssl_platform.data.python_docs import TextDocument, documents_dataset, python_docs_documents, split_documents
from ssl_platform.data.python_stdlib import python_stdlib_documents

# built-in name -> every document of the corpus, sorted by name (the names must be those of config.BUILTIN_KINDS)
TEXT_CORPORA: dict[str, Callable[[], list[TextDocument]]] = {
    "python-docs": python_docs_documents,
    "python-stdlib": python_stdlib_documents,
}


def corpus_documents(name: str) -> list[TextDocument]:
    """Every document of a built-in text corpus, sorted by name."""
    if name not in TEXT_CORPORA:
        raise ValueError(f"unknown built-in text corpus {name!r}; use one of {', '.join(TEXT_CORPORA)}")
    return TEXT_CORPORA[name]()


def load_text_corpus(name: str, val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[TextDocument]]:
    """``{"train": [...], "val": [...]}`` of a built-in text corpus: documents held out whole."""
    return split_documents(corpus_documents(name), val_fraction, seed)


def text_corpus_dataset(name: str, split: str | None = "train", *, val_fraction: float = 0.1, seed: int = 0,
                        num_blocks: int = 8):
    """One split of a built-in text corpus (or, with ``split=None``, all of it) as a Ray Dataset of
    ``{"text", "source"}`` rows."""
    if split is None:
        return documents_dataset(corpus_documents(name), num_blocks)
    splits = load_text_corpus(name, val_fraction, seed)
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    return documents_dataset(splits[split], num_blocks)

"""Built-in text corpus ``python-docs``: English prose from the Python docs bundled with the stdlib.

``pydoc_data.topics.topics`` (what ``help("if")`` prints) maps ~80 topics (statements,
operators, data model, built-in types) to reStructuredText rendered as plain text. Each topic
is one document. Only its prose is kept: heading underlines, grammar productions (``::=``),
interactive sessions (``>>>``), tables and code-like paragraphs are dropped, because BERT's
next-sentence pairs and GPT's samples are meant to be English. On CPython 3.11 that is ~79
documents, ~1,700 paragraphs, ~350,000 characters (~55,000 words, ~3,500 sentences); the
exact numbers follow the interpreter's version. It exists offline on every machine.

The train/val split is by document (a whole topic is held out), fixed by the seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ssl_platform.data.text import split_sentences

CORPUS_NAME = "python-docs"
_UNDERLINE = re.compile(r"^\s*([*=\-~^#\"])\1{2,}\s*$")  # "*****", "=====" under a heading
_NOT_PROSE = re.compile(r"(>>>|\.\.\.|Traceback|[+|])")  # sessions, tracebacks, table rows
_ENDS_SENTENCE = re.compile(r"([.:?!)]|\[\d+\])$")  # "." or a footnote mark such as "[1]"


@dataclass(frozen=True)
class TextDocument:
    """One document: its name (the record key), prose paragraphs joined by blank lines, its sentences."""

    name: str
    text: str
    sentences: tuple[str, ...]


def prose_paragraph(lines: list[str]) -> str | None:
    """A paragraph's lines joined into one line if it reads as English prose, else None."""
    joined = " ".join(line.strip() for line in lines)
    if "::=" in joined or _NOT_PROSE.match(joined):
        return None
    words = joined.split()
    letters = sum(c.isalpha() or c.isspace() for c in joined) / len(joined)
    # Prose ends a sentence and is mostly letters; code, signatures and headings do not.
    if (_ENDS_SENTENCE.search(joined) and len(words) >= 4 and letters > 0.75) or (len(words) >= 8 and letters >= 0.85):
        return joined
    return None


def topic_prose(text: str) -> str:
    """A topic's prose paragraphs, separated by blank lines ("" if it has none)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.split("\n") if line.strip() and not _UNDERLINE.match(line)]
        prose = prose_paragraph(lines) if lines else None
        if prose:
            paragraphs.append(prose)
    return "\n\n".join(paragraphs)


def python_docs_documents() -> list[TextDocument]:
    """Every topic with prose, sorted by topic name."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        text = topic_prose(topics[name])
        if text:
            docs.append(TextDocument(f"{CORPUS_NAME}:{name}", text, tuple(split_sentences(text))))
    return docs


def split_documents(docs: list[TextDocument], val_fraction: float = 0.1,
                    seed: int = 0) -> dict[str, list[TextDocument]]:
    """``{"train": [...], "val": [...]}``: documents held out whole, fixed by the seed, at least one each side."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    val = set(order[:n_val].tolist())
    return {"train": [d for i, d in enumerate(docs) if i not in val],
            "val": [d for i, d in enumerate(docs) if i in val]}


def load_python_docs(val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[TextDocument]]:
    """``{"train": [...], "val": [...]}``: topics held out whole, at least one each side."""
    return split_documents(python_docs_documents(), val_fraction, seed)


def documents_dataset(documents: list[TextDocument], num_blocks: int = 8):
    """In-memory documents as a Ray Dataset of ``{"text", "source"}`` rows, like a text corpus read from files."""
    import ray.data

    return ray.data.from_items([{"text": d.text, "source": d.name} for d in documents],
                               override_num_blocks=max(1, min(num_blocks, len(documents))))


def corpus_stats(documents: list[TextDocument]) -> dict[str, int]:
    """Size of a list of documents: documents, sentences, words, characters."""
    return {"documents": len(documents), "sentences": sum(len(d.sentences) for d in documents),
            "words": sum(len(d.text.split()) for d in documents), "characters": sum(len(d.text) for d in documents)}


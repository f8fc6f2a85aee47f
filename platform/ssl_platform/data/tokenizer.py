"""Subword tokenizers trained offline on the corpus with Hugging Face ``tokenizers``, saved with the run.

Two kinds:

- ``"wordpiece"`` (BERT; Devlin et al. 2019): lower-cased, accent-stripped BERT normalisation,
  split on whitespace and punctuation, ``##`` marks a word-internal piece. Special tokens
  ``[PAD] [UNK] [CLS] [SEP] [MASK]`` get ids 0..4. [SEP] doubles as the end-of-text token.
- ``"bpe"`` (GPT-2; Radford et al. 2019): byte-level BPE, so any text encodes without an
  unknown token and decodes back exactly. One special token, ``<|endoftext|>`` (id 0), which
  separates documents and also pads.

Training streams the corpus (a Ray Dataset's ``iter_batches``, or any re-iterable of strings);
it is never held whole. It is deterministic: the same corpus gives the same ``tokenizer.json``
byte for byte, whatever the order the texts arrive in. (HF's WordPiece trainer numbers its
``##x`` pieces in hash-map order, which breaks ties differently from run to run; a first pass
collects the corpus's characters so those pieces get fixed ids before training.)

A directory holds ``tokenizer.json`` (HF's own format) and ``special_ids.json``:

    tok = train_tokenizer(ds, TokenizerConfig(kind="wordpiece", vocab_size=4096))
    tok.save(run_dir / "tokenizer")
    tok = TextTokenizer.load(run_dir / "tokenizer")
    tok.encode_batch(["Hello world."])  # [[...ids, no [CLS]/[SEP] added...]]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_IDS_FILE = "special_ids.json"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
EOT = "<|endoftext|>"
KINDS = ("wordpiece", "bpe")
BYTE_ALPHABET = 256  # byte-level BPE starts from every byte


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = "wordpiece"  # "wordpiece" for BERT, "bpe" (byte-level) for GPT
    vocab_size: int = 4096  # upper bound; a small corpus may give fewer tokens
    min_frequency: int = 2  # a merge must be seen this often to enter the vocabulary

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {self.kind!r}; use 'wordpiece' (BERT) or 'bpe' (GPT)")
        floor = BYTE_ALPHABET + 1 if self.kind == "bpe" else len(BERT_SPECIALS) + 1
        if self.vocab_size <= floor:
            raise ValueError(f"tokenizer vocab_size must be above {floor} for {self.kind}, got {self.vocab_size}")
        if self.min_frequency < 0:
            raise ValueError(f"tokenizer min_frequency must be >= 0, got {self.min_frequency}")


class TextTokenizer:
    """A trained HF tokenizer plus the special ids the batchers need. Picklable (sent to Ray tasks).

    ``pad_id``, ``cls_id``, ``sep_id``, ``mask_id``, ``unk_id`` are None where the kind has no
    such token (byte-level BPE has no [CLS]/[SEP]/[MASK]); ``eot_id`` is always set.
    """

    def __init__(self, tokenizer, kind: str):
        self.tokenizer = tokenizer
        self.kind = kind
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if kind == "wordpiece":
            self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in BERT_SPECIALS)
            self.eot_id = self.sep_id
        else:
            self.eot_id = vocab[EOT]
            self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = self.eot_id, None, None, None, None

    @property
    def vocab_size(self) -> int:
        """Ids are in [0, vocab_size): the model's embedding table size."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids never masked and never drawn as random replacements."""
        return tuple(sorted({i for i in (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id,
                                         self.eot_id) if i is not None}))

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (the batchers add [CLS]/[SEP]/eot)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """The token string of each id (``##lo``, ``Ġworld``), for showing masks."""
        return [self.tokenizer.id_to_token(int(i)) for i in ids]

    def special_ids_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "pad": self.pad_id, "unk": self.unk_id,
                "cls": self.cls_id, "sep": self.sep_id, "mask": self.mask_id, "eot": self.eot_id}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / TOKENIZER_FILE))
        (directory / SPECIAL_IDS_FILE).write_text(json.dumps(self.special_ids_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> TextTokenizer:
        from tokenizers import Tokenizer

        directory = Path(directory)
        if not (directory / TOKENIZER_FILE).is_file() or not (directory / SPECIAL_IDS_FILE).is_file():
            raise ValueError(f"no tokenizer in {str(directory)!r} (expected {TOKENIZER_FILE} and {SPECIAL_IDS_FILE}); "
                             f"train one with train_tokenizer(...).save(directory)")
        kind = json.loads((directory / SPECIAL_IDS_FILE).read_text())["kind"]
        return cls(Tokenizer.from_file(str(directory / TOKENIZER_FILE)), kind)

    def __getstate__(self) -> dict:
        return {"json": self.tokenizer.to_str(), "kind": self.kind}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.__init__(Tokenizer.from_str(state["json"]), state["kind"])


def as_tokenizer(tokenizer: TextTokenizer | str | Path) -> TextTokenizer:
    """A tokenizer object, or a directory to load one from."""
    return tokenizer if isinstance(tokenizer, TextTokenizer) else TextTokenizer.load(tokenizer)


# ----------------------------------------------------------------------------- training


def corpus_texts(corpus, batch_size: int = 256) -> Callable[[], Iterator[str]]:
    """A re-startable stream of texts: from a Ray Dataset with a "text" column (batch by batch),
    a zero-argument callable returning an iterable, or a re-iterable such as a list."""
    if hasattr(corpus, "iter_batches"):
        def from_dataset() -> Iterator[str]:
            for batch in corpus.iter_batches(batch_size=batch_size, batch_format="numpy"):
                yield from (str(t) for t in batch["text"])
        return from_dataset
    if callable(corpus):
        return lambda: iter(corpus())
    if iter(corpus) is corpus:
        raise TypeError("train_tokenizer needs to read the corpus twice: pass a Dataset, a list, or a function "
                        "returning a fresh iterator, not a one-shot iterator")
    return lambda: iter(corpus)


def _wordpiece(texts: Callable[[], Iterator[str]], cfg: TokenizerConfig):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    chars: set[str] = set()  # pass 1: the alphabet, so every ##x piece gets a fixed id (see module doc)
    for text in texts():
        chars.update(tok.normalizer.normalize_str(text))
    pieces = ["##" + c for c in sorted(chars) if not c.isspace()]
    trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                        special_tokens=[*BERT_SPECIALS, *pieces], show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    # The ##x pieces were registered as special tokens only to fix their ids: rebuild the
    # tokenizer from the trained vocabulary so that only the five real ones are special.
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    out = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    out.normalizer, out.pre_tokenizer, out.decoder = tok.normalizer, tok.pre_tokenizer, decoders.WordPiece()
    out.add_special_tokens(list(BERT_SPECIALS))
    return out


def _byte_bpe(texts: Callable[[], Iterator[str]], cfg: TokenizerConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    return tok


def train_tokenizer(corpus, cfg: TokenizerConfig = TokenizerConfig()) -> TextTokenizer:
    """Train a tokenizer on a corpus (see :func:`corpus_texts` for what ``corpus`` may be)."""
    stream, seen = corpus_texts(corpus), [0]

    def texts() -> Iterator[str]:
        seen[0] = 0
        for text in stream():
            seen[0] += 1
            yield text

    tok = _wordpiece(texts, cfg) if cfg.kind == "wordpiece" else _byte_bpe(texts, cfg)
    if seen[0] == 0:
        raise ValueError("the text corpus has no document to train a tokenizer on; check the corpus path and "
                         "text field")
    return TextTokenizer(tok, cfg.kind)


def load_or_train_tokenizer(directory: str | Path, corpus, cfg: TokenizerConfig = TokenizerConfig()) -> TextTokenizer:
    """The run's tokenizer: loaded from ``directory`` if a previous attempt saved one (resume),
    else trained on ``corpus`` and saved there. A saved tokenizer of another kind is an error."""
    directory = Path(directory)
    if (directory / TOKENIZER_FILE).is_file():
        tok = TextTokenizer.load(directory)
        if tok.kind != cfg.kind:
            raise ValueError(f"the tokenizer saved in {str(directory)!r} is {tok.kind}, not {cfg.kind}; "
                             f"use a new run name or the same tokenizer kind")
        return tok
    tok = train_tokenizer(corpus, cfg)
    tok.save(directory)
    return tok

"""BERT masking and next-sentence pairs (the evaluation's batcher and the ordered chunks' transform), GPT
packing, and the trained tokenizers. No Ray needed."""

import pickle
import random

import numpy as np
import pytest
import torch

from ssl_platform.data.masking import (
    IGNORE_INDEX,
    IS_NEXT,
    NOT_NEXT,
    BertBatcher,
    GptBlocks,
    encode_pairs,
    mask_tokens,
    masked_pairs,
    nsp_pairs,
    pack_blocks,
    pair_from_chunk,
    truncate_pair,
)
from ssl_platform.data.ordered_text import BertChunkPairs, bert_chunks
from ssl_platform.data.python_docs import python_docs_documents
from ssl_platform.data.randomness import record_rng
from ssl_platform.data.tokenizer import EOT, TextTokenizer, TokenizerConfig, train_tokenizer


@pytest.fixture(scope="module")
def docs():
    return [d.text for d in python_docs_documents()]


@pytest.fixture(scope="module")
def wordpiece(docs):
    return train_tokenizer(docs, TokenizerConfig(kind="wordpiece", vocab_size=1500))


@pytest.fixture(scope="module")
def bpe(docs):
    return train_tokenizer(docs, TokenizerConfig(kind="bpe", vocab_size=800))


# ----------------------------------------------------------------------------- mask_tokens


def _masking_case(rng_seed=0, shape=(200, 500), vocab=1000, specials=(0, 1, 2, 3, 4)):
    rng = np.random.default_rng(rng_seed)
    ids = rng.integers(len(specials), vocab, size=shape)
    ids[:, 0] = 2  # [CLS]
    ids[rng.random(shape) < 0.05] = 3  # scattered [SEP]s
    lengths = rng.integers(shape[1] // 2, shape[1] + 1, size=shape[0])
    padding = np.arange(shape[1])[None] >= lengths[:, None]
    ids[padding] = 0
    special = np.isin(ids, specials) | padding
    return ids, special


def test_mask_tokens_statistics_match_bert():
    ids, special = _masking_case()
    out, labels = mask_tokens(ids, special, vocab_size=1000, mask_id=4, rng=np.random.default_rng(1),
                              special_ids=(0, 1, 2, 3, 4))
    selected = labels != IGNORE_INDEX
    eligible = ~special
    assert eligible.sum() > 50_000
    assert abs(selected.sum() / eligible.sum() - 0.15) < 0.005
    masked = selected & (out == 4)
    kept = selected & (out == ids)
    replaced = selected & ~masked & ~kept
    n = selected.sum()
    assert abs(masked.sum() / n - 0.8) < 0.01
    assert abs(replaced.sum() / n - 0.1) < 0.01
    assert abs(kept.sum() / n - 0.1) < 0.01


def test_mask_tokens_never_selects_special_or_padding_and_labels_only_selected():
    ids, special = _masking_case(rng_seed=2, shape=(64, 128), vocab=40)
    out, labels = mask_tokens(ids, special, vocab_size=40, mask_id=4, rng=np.random.default_rng(3),
                              mask_prob=0.5, mask_token_frac=0.2, random_token_frac=0.6, special_ids=(0, 1, 2, 3, 4))
    selected = labels != IGNORE_INDEX
    assert not (selected & special).any()
    assert np.array_equal(out[special], ids[special])  # special and padding tokens untouched
    assert np.array_equal(out[~selected], ids[~selected])
    assert np.array_equal(labels[selected], ids[selected])  # the label is the original token
    assert (labels[~selected] == IGNORE_INDEX).all()
    replaced = selected & (out != 4) & (out != ids)
    assert replaced.sum() > 500 and not np.isin(out[replaced], [0, 1, 2, 3, 4]).any()  # random ids are never special
    assert labels.dtype == np.int64 and out.dtype == ids.dtype


def test_mask_tokens_rejects_impossible_fractions():
    ids, special = _masking_case(shape=(2, 8))
    with pytest.raises(ValueError, match="mask_token_frac"):
        mask_tokens(ids, special, vocab_size=1000, mask_id=4, rng=np.random.default_rng(), mask_token_frac=0.95)


def test_ignore_index_and_nsp_convention_match_ssl_models():
    from ssl_models.losses.tokens import IGNORE_INDEX as MODEL_IGNORE
    from ssl_models.methods.bert import NSPHead

    assert IGNORE_INDEX == MODEL_IGNORE
    assert "class 1 = \"sentence B follows sentence A\"" in NSPHead.__doc__ and IS_NEXT == 1 and NOT_NEXT == 0


# ----------------------------------------------------------------------------- NSP pairs


def test_truncate_pair_is_longest_first():
    rng = random.Random(0)
    for _ in range(500):
        la, lb, budget = rng.randint(0, 40), rng.randint(0, 40), rng.randint(2, 50)
        a, b = np.arange(la), np.arange(100, 100 + lb)
        x, y = len(a), len(b)
        while x + y > budget:  # the reference: one token at a time from the longer (B on ties)
            if x > y:
                x -= 1
            else:
                y -= 1
        ta, tb = truncate_pair(a, b, budget)
        assert (len(ta), len(tb)) == (x, y)
        assert np.array_equal(ta, a[la - x:]) and np.array_equal(tb, b[:y])  # A loses its start, B its end


def _synthetic_documents(n_docs, seed=0):
    """Token id = doc * 10_000 + position, so contiguity and provenance can be read off the ids."""
    rng = np.random.default_rng(seed)
    documents = []
    for d in range(n_docs):
        lengths = rng.integers(1, 16, size=rng.integers(1, 25))
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        documents.append([d * 10_000 + np.arange(bounds[i], bounds[i + 1]) for i in range(len(lengths))])
    return documents


def test_nsp_pairs_half_true_half_random_and_true_pairs_are_consecutive():
    documents = _synthetic_documents(600)
    max_len = 48
    labels = []
    for i in range(len(documents)):
        for a, b, label in nsp_pairs(documents, i, max_len=max_len, rng=np.random.default_rng(i)):
            assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= max_len - 3
            assert (a // 10_000 == i).all()
            assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()  # segments are contiguous text
            if label == IS_NEXT:
                assert b[0] == a[-1] + 1 and b[0] // 10_000 == i  # B really continues A
            else:
                assert label == NOT_NEXT and (b // 10_000 != i).all()  # B from another document
            labels.append(label)
    labels = np.array(labels)
    assert len(labels) > 2000
    assert abs((labels == IS_NEXT).mean() - 0.5) < 0.05


def test_nsp_pairs_cover_the_document_and_a_lone_document_is_unlabelled():
    documents = _synthetic_documents(1, seed=3)
    pairs = nsp_pairs(documents, 0, max_len=32, rng=np.random.default_rng(0))
    assert pairs and all(label == IGNORE_INDEX for _, _, label in pairs)
    covered = np.concatenate([np.concatenate([a, b]) for a, b, _ in pairs])
    total = sum(len(s) for s in documents[0])
    assert len(np.unique(covered)) > 0.8 * total  # true continuations walk the whole document


def test_encode_pairs_layout():
    enc = encode_pairs([(np.array([10, 11]), np.array([20, 21, 22]), IS_NEXT)], max_len=10, cls_id=2, sep_id=3,
                       pad_id=0)
    assert enc["input_ids"].tolist() == [[2, 10, 11, 3, 20, 21, 22, 3, 0, 0]]
    assert enc["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 0, 0]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]]
    assert enc["nsp_labels"].tolist() == [IS_NEXT]


# ----------------------------------------------------------------------------- GPT blocks


def test_pack_blocks_fixed_length_with_eot_between_documents():
    documents = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]  # 3 + 1 + 2 + 1 + 4 + 1 = 12 tokens
    out = pack_blocks(documents, block_size=5, eot_id=0, pad_id=1)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 8], [9, 0, 10, 11, 12], [13, 0, 1, 1, 1]]
    assert out["attention_mask"].tolist() == [[1] * 5, [1] * 5, [1, 1, 0, 0, 0]]
    dropped = pack_blocks(documents, block_size=5, eot_id=0, pad_id=1, tail="drop")
    assert dropped["input_ids"].shape == (2, 5) and dropped["attention_mask"].all()
    exact = pack_blocks([[5, 6, 7], [8]], block_size=3, eot_id=0, pad_id=1)
    assert exact["input_ids"].tolist() == [[5, 6, 7], [0, 8, 0]] and exact["attention_mask"].all()


# ----------------------------------------------------------------------------- tokenizers


def test_wordpiece_tokenizer_specials_roundtrip_and_determinism(wordpiece, docs, tmp_path):
    specials = (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id, wordpiece.mask_id)
    assert specials == (0, 1, 2, 3, 4)
    assert wordpiece.eot_id == wordpiece.sep_id and 1000 < wordpiece.vocab_size <= 1500
    text = "The assert statement raises an exception."
    ids = wordpiece.encode_batch([text])[0]
    assert wordpiece.decode(ids) == text.lower()  # the WordPiece decoder re-joins ## pieces and punctuation
    assert 2 not in ids and 3 not in ids  # no [CLS]/[SEP] added by encode
    loaded = TextTokenizer.load(wordpiece.save(tmp_path / "tok"))
    assert loaded.encode_batch(docs[:5]) == wordpiece.encode_batch(docs[:5])
    assert loaded.special_ids == wordpiece.special_ids == (0, 1, 2, 3, 4)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    again = train_tokenizer(shuffled, TokenizerConfig(kind="wordpiece", vocab_size=1500))
    assert again.tokenizer.to_str() == wordpiece.tokenizer.to_str()  # same corpus -> same tokenizer, any order
    assert pickle.loads(pickle.dumps(wordpiece)).encode_batch([text]) == [ids]


def test_bpe_tokenizer_is_lossless_and_deterministic(bpe, docs, tmp_path):
    assert bpe.eot_id == bpe.pad_id == 0 and bpe.mask_id is None and bpe.vocab_size == 800
    text = "Hello, wörld!\n\tcafé"
    assert bpe.decode(bpe.encode_batch([text])[0]) == text  # byte-level: exact round trip, no [UNK]
    loaded = TextTokenizer.load(bpe.save(tmp_path / "bpe"))
    assert loaded.encode_batch(docs[:3]) == bpe.encode_batch(docs[:3]) and loaded.kind == "bpe"
    again = train_tokenizer(docs, TokenizerConfig(kind="bpe", vocab_size=800))
    assert again.tokenizer.to_str() == bpe.tokenizer.to_str()


def test_tokenizer_errors_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="wordpiece"):
        TokenizerConfig(kind="sentencepiece")
    with pytest.raises(ValueError, match="no document"):
        train_tokenizer([], TokenizerConfig(kind="bpe", vocab_size=300))
    with pytest.raises(ValueError, match="no tokenizer in"):
        TextTokenizer.load(tmp_path)
    with pytest.raises(TypeError, match="twice"):
        train_tokenizer(iter(["a b"]))


# ----------------------------------------------------------------------------- map_batches callables


def _doc_batch(docs, n=12):
    return {"text": np.array(docs[:n], dtype=object), "source": np.array([f"doc{i}" for i in range(n)], dtype=object)}


def test_bert_batcher_rows_feed_the_bert_model(wordpiece, docs):
    import ssl_models

    batch = BertBatcher(wordpiece, max_len=64, seed=0)(_doc_batch(docs))
    n = len(batch["nsp_labels"])
    assert n > 40
    for k in ("input_ids", "token_type_ids", "attention_mask", "mlm_labels"):
        assert batch[k].shape == (n, 64) and batch[k].dtype == np.int64
    assert set(batch["nsp_labels"].tolist()) == {IS_NEXT, NOT_NEXT}
    ids, labels = batch["input_ids"], batch["mlm_labels"]
    assert (ids[:, 0] == wordpiece.cls_id).all()
    assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (labels[np.isin(ids, [wordpiece.cls_id, wordpiece.sep_id, wordpiece.pad_id])] == IGNORE_INDEX).all()
    model = ssl_models.build_method("bert", vocab_size=wordpiece.vocab_size, max_len=64, dim=32, depth=1, heads=2)
    out = model({k: torch.from_numpy(v) for k, v in batch.items()})
    assert torch.isfinite(out["loss"]) and "nsp_acc" in out


def test_bert_batcher_is_deterministic_per_seed_epoch_and_record(wordpiece, docs):
    docs_batch = _doc_batch(docs)
    a = BertBatcher(wordpiece, max_len=64, seed=1, epoch=0)(docs_batch)
    b = BertBatcher(wordpiece, max_len=64, seed=1, epoch=0)(docs_batch)
    c = BertBatcher(wordpiece, max_len=64, seed=1, epoch=1)(docs_batch)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["input_ids"].shape != c["input_ids"].shape or not np.array_equal(a["mlm_labels"], c["mlm_labels"])
    reversed_batch = {k: v[::-1].copy() for k, v in docs_batch.items()}
    r = BertBatcher(wordpiece, max_len=64, seed=1, epoch=0)(reversed_batch)

    def rows(x):
        rows = np.concatenate([x["input_ids"], x["mlm_labels"], x["nsp_labels"][:, None]], axis=1)
        return sorted(map(tuple, rows.tolist()))
    assert rows(r) == rows(a)  # the same documents in another order give the same rows
    fresh1, fresh2 = (BertBatcher(wordpiece, max_len=64)(docs_batch) for _ in range(2))
    assert not np.array_equal(fresh1["mlm_labels"], fresh2["mlm_labels"]) or \
        fresh1["mlm_labels"].shape != fresh2["mlm_labels"].shape


def test_bert_batcher_needs_a_wordpiece_tokenizer_and_handles_empty_batches(bpe, wordpiece):
    with pytest.raises(ValueError, match="wordpiece"):
        BertBatcher(bpe)(_doc_batch(["a b c. D e f."], 1))
    out = BertBatcher(wordpiece, max_len=16, seed=0)({"text": np.array([], dtype=object)})
    assert out["input_ids"].shape == (0, 16) and out["nsp_labels"].shape == (0,)


def _chunk_pairs_reference(tok, table, ids, max_len, seed, epoch, next_prob, **mask_args):
    """BertChunkPairs' rows made the plain way: each chunk on its own, pair_from_chunk + masked_pairs."""
    bounds, first, count = table["bounds"], table["first"], table["sentences"]
    chunks = np.empty(len(first), dtype=object)
    chunks[:] = [tuple(table["tokens"][bounds[s]:bounds[s + 1]] for s in range(f, f + k))
                 for f, k in zip(first, count, strict=True)]
    rows = []
    for i in ids:
        pair_rng, donor_rng, mask_rng = record_rng(seed, epoch, str(table["key"][i])).spawn(3)
        lo, hi = int(table["doc_lo"][i]), int(table["doc_hi"][i])
        donors = [j for j in range(len(chunks)) if not lo <= j < hi]  # every chunk but its document's
        pair, _ = pair_from_chunk(list(chunks[i]), chunks, donors, max_len - 3, pair_rng, donor_rng, next_prob)
        rows.append(masked_pairs([pair], tok, max_len, mask_rng, mask_args))
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("max_len, n_docs, next_prob, mask_args", [
    (64, 12, 0.5, {}),
    (24, 12, 0.3, {"mask_prob": 0.4, "mask_token_frac": 0.5, "random_token_frac": 0.3}),
    (5, 3, 0.5, {}),  # budget 2: every pair truncated
    (48, 1, 0.5, {}),  # one document: no random B, every label IGNORE_INDEX
])
def test_bert_chunk_pairs_equal_the_per_chunk_reference_bit_for_bit(wordpiece, docs, max_len, n_docs, next_prob,
                                                                    mask_args):
    records, shared = bert_chunks(wordpiece, docs[:n_docs], [f"doc{i}" for i in range(n_docs)], max_len)
    table = {**records, **shared}
    ids = np.random.default_rng(max_len).permutation(len(records["key"]))[:150]
    for seed, epoch in ((0, 0), (7, 3)):
        got = BertChunkPairs(wordpiece, max_len, seed, epoch, next_prob, **mask_args)(ids, table)
        want = _chunk_pairs_reference(wordpiece, table, ids, max_len, seed, epoch, next_prob, **mask_args)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    assert n_docs > 1 or (got["nsp_labels"] == IGNORE_INDEX).all()


def test_gpt_blocks_feed_the_gpt_model(bpe, docs, tmp_path):
    bpe.save(tmp_path / "tok")
    batch = GptBlocks(str(tmp_path / "tok"), block_size=32)(_doc_batch(docs, 5))
    ids = batch["input_ids"]
    assert ids.shape[1] == 32 and ids.shape[0] > 10
    assert (ids[batch["attention_mask"] == 1] == bpe.eot_id).sum() == 5  # one end-of-text after each document
    assert batch["attention_mask"][:-1].all()  # only the last block may be padded
    text = bpe.decode(ids[batch["attention_mask"] == 1])
    assert text.startswith(docs[0]) and f"{EOT}{docs[1][:50]}" in text
    import ssl_models

    model = ssl_models.build_method("gpt", vocab_size=bpe.vocab_size, max_len=32, dim=32, depth=1, heads=2)
    assert torch.isfinite(model({k: torch.from_numpy(v) for k, v in batch.items()})["loss"])

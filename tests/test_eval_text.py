"""BERT and GPT evaluation: the scoring functions against the models' own losses, the unigram
baseline against its closed form, and the whole protocol on tiny checkpoints trained here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ssl_models.methods.bert import BERT
from ssl_models.methods.gpt import GPT
from ssl_platform import methods
from ssl_platform.config import load_config
from ssl_platform.data.masking import IGNORE_INDEX, BertBatcher, GptBlocks
from ssl_platform.data.python_docs import load_python_docs
from ssl_platform.data.tokenizer import TokenizerConfig, train_tokenizer
from ssl_platform.evaluate import evaluate_run  # what `sslp run` and `sslp eval` call
from ssl_platform.evaluate.text import (
    PAIR,
    CountDocumentTokens,
    CountPairs,
    TopicChunks,
    bigram_nll,
    context_tokens,
    most_frequent_token_accuracy,
    score_bert,
    score_gpt,
    target_tokens,
    topic_split,
    unigram_nll,
)
from ssl_platform.train.checkpoint import TrainState, rng_state, save_state

SMALL = dict(vocab_size=50, max_len=12, dim=16, depth=1, heads=2, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


# ----------------------------------------------------------------------------- unigram baseline


def test_unigram_nll_matches_the_closed_form():
    # Training tokens 0 0 0 1 over a vocabulary of 3: add-one gives p = (4/7, 2/7, 1/7).
    counts = np.bincount([0, 0, 0, 1], minlength=3)
    held_out = [0, 2, 0, 1]
    expected = -(2 * math.log(4 / 7) + math.log(1 / 7) + math.log(2 / 7)) / 4
    assert unigram_nll(counts, held_out) == pytest.approx(expected, rel=1e-12)
    # No training tokens at all: add-one is the uniform model, perplexity = V.
    assert math.exp(unigram_nll(np.zeros(5), [0, 3, 4])) == pytest.approx(5.0)


@pytest.mark.parametrize("counts, targets, match", [
    (np.ones(3), [0, 3], r"\[0, 3\)"),
    (np.ones(3), [], "no target tokens"),
    (-np.ones(3), [0], "non-negative"),
])
def test_unigram_nll_rejects_bad_input(counts, targets, match):
    with pytest.raises(ValueError, match=match):
        unigram_nll(counts, targets)


def test_bigram_nll_matches_the_closed_form_and_sums_to_one():
    # Training tokens 0 1 0 1 0 2 (V = 3): c(0,1)=2, c(0,2)=1, c(1,0)=2; c(0)=3, T(0)=2; c(1)=2, T(1)=1;
    # add-one unigram p = (4/9, 3/9, 2/9).
    ids = np.array([[0, 1, 0, 1, 0, 2]])
    batch = CountPairs(3)({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    unigram = np.bincount(ids.ravel(), minlength=3)
    expected = [(2 + 2 * 3 / 9) / (3 + 2),  # after 0, a seen pair
                (0 + 1 * 2 / 9) / (2 + 1),  # after 1, an unseen pair: the unigram's share
                4 / 9]  # after 2, a context training never saw: the unigram
    nll = bigram_nll(batch["pair"], batch["count"], unigram, [0, 1, 2], [1, 2, 0])
    assert nll == pytest.approx(-np.mean(np.log(expected)), rel=1e-12)
    for context in range(3):  # a distribution over the next token after every context
        total = sum(math.exp(-bigram_nll(batch["pair"], batch["count"], unigram, [context], [t])) for t in range(3))
        assert total == pytest.approx(1.0, rel=1e-12)
    # Pairs counted in several batches add up.
    half = CountPairs(3)({"input_ids": ids[:, :3], "attention_mask": np.ones((1, 3))})
    rest = CountPairs(3)({"input_ids": ids[:, 2:], "attention_mask": np.ones((1, 4))})
    split = bigram_nll(np.concatenate([half["pair"], rest["pair"]]), np.concatenate([half["count"], rest["count"]]),
                       unigram, [0, 1, 2], [1, 2, 0])
    assert split == pytest.approx(nll, rel=1e-12)


def test_context_tokens_precede_the_targets_and_pairs_skip_padding():
    ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    attention = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert context_tokens(ids, attention).tolist() == [5, 6, 7, 9]
    pairs = CountPairs(11)({"input_ids": ids, "attention_mask": attention})
    assert sorted(zip((pairs["pair"] // 11).tolist(), (pairs["pair"] % 11).tolist(), strict=True)) == [
        (5, 6), (6, 7), (7, 8), (9, 10)]


def test_most_frequent_token_baseline_counts_document_tokens_without_specials():
    texts = [d.text for d in load_python_docs(0.1, 0)["train"][:20]]
    tok = train_tokenizer(texts, TokenizerConfig(kind="wordpiece", vocab_size=200))
    counts = CountDocumentTokens(tok)({"text": np.array(texts, dtype=object)})["counts"][0]
    assert counts.shape == (tok.vocab_size,) and counts.sum() == sum(len(ids) for ids in tok.encode_batch(texts))
    assert all(counts[i] == 0 for i in tok.special_ids)
    commonest = int(np.argmax(counts))
    others = [i for i in range(tok.vocab_size) if i != commonest][:2]
    assert most_frequent_token_accuracy(counts, [commonest, commonest, *others]) == (0.5, commonest)
    with pytest.raises(ValueError, match="no masked position"):
        most_frequent_token_accuracy(counts, [])


def test_target_tokens_skip_the_first_token_and_padding():
    ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    attention = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert target_tokens(ids, attention).tolist() == [6, 7, 8, 10]


# ----------------------------------------------------------------------------- scoring functions


# LOGIT_BUDGET 1: the vocabulary projection runs one row (one masked token) at a time.
@pytest.mark.parametrize("budget", [2**26, 1])
def test_score_gpt_sums_to_the_models_own_loss(budget, monkeypatch):
    monkeypatch.setattr("ssl_platform.evaluate.text.LOGIT_BUDGET", budget)
    torch.manual_seed(0)
    gpt = GPT(**SMALL).eval()
    ids = torch.randint(1, 50, (3, 12))
    attention = torch.ones(3, 12, dtype=torch.long)
    attention[1, 7:] = 0  # a padded tail, as GptBlocks makes for a batch's last block
    batch = {"input_ids": ids, "attention_mask": attention}
    with torch.no_grad():
        scores = score_gpt(gpt, batch)
        loss = gpt(batch)["loss"]
    assert scores["tokens"].tolist() == [11, 6, 11]
    assert float(scores["nll"].sum() / scores["tokens"].sum()) == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.parametrize("budget", [2**26, 1])
def test_score_bert_counts_masked_tokens_like_the_models_accuracy(budget, monkeypatch):
    monkeypatch.setattr("ssl_platform.evaluate.text.LOGIT_BUDGET", budget)
    torch.manual_seed(0)
    bert = BERT(**SMALL).eval()
    ids = torch.randint(5, 50, (4, 12))
    labels = torch.full((4, 12), IGNORE_INDEX)
    labels[:, 1::3] = ids[:, 1::3]
    labels[2] = IGNORE_INDEX  # a sequence with nothing masked counts 0 of 0
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mlm_labels": labels,
             "nsp_labels": torch.tensor([0, 1, 1, 0])}
    with torch.no_grad():
        scores = score_bert(bert, batch)
        out = bert(batch)
    assert scores["mlm_count"].tolist() == [4, 4, 0, 4]
    assert float(scores["mlm_correct"].sum() / scores["mlm_count"].sum()) == pytest.approx(float(out["mlm_acc"]))
    nsp = float((scores["nsp_pred"] == batch["nsp_labels"]).float().mean())
    assert nsp == pytest.approx(float(out["nsp_acc"]))


def test_topic_split_uses_documents_with_enough_chunks_even_and_odd():
    sources = np.array(["b", "a", "a", "c", "b", "a", "b", "a", "b", "", ""])
    chunks = np.array([0, 0, 1, 0, 1, 2, 2, 3, 3, PAIR, PAIR])  # two masked NSP pairs, not probed
    labels, train_idx, test_idx, classes = topic_split(sources, chunks, min_chunks=4)
    assert classes == ["a", "b"]  # "c" has one chunk
    assert labels.tolist() == [1, 0, 0, -1, 1, 0, 1, 0, 1, -1, -1]
    assert sorted(chunks[train_idx] % 2) == [0] * 4 and sorted(chunks[test_idx] % 2) == [1] * 4
    # In (class, chunk) order whatever the rows' order, so the probe's sums (and the table) are the same.
    assert [(labels[i], chunks[i]) for i in train_idx] == [(0, 0), (0, 2), (1, 0), (1, 2)]
    order = np.random.default_rng(0).permutation(len(sources))
    _, shuffled_train, shuffled_test, _ = topic_split(sources[order], chunks[order], min_chunks=4)
    assert sources[order][shuffled_train].tolist() == sources[train_idx].tolist() == ["a", "a", "b", "b"]
    assert chunks[order][shuffled_test].tolist() == chunks[test_idx].tolist() == [1, 3, 1, 3]
    # A cap on the classes keeps the documents with the most chunks ("b" has 4, "a" 4, "c" 1; ties by name).
    assert topic_split(sources, chunks, min_chunks=1, max_classes=1)[3] == ["a"]
    assert topic_split(sources, chunks, min_chunks=1, max_classes=2)[3] == ["a", "b"]


def test_topic_chunks_are_cls_text_sep_rows_labelled_by_document():
    tok = train_tokenizer(["The cat sat on the mat. The dog sat on the log."] * 20,
                          TokenizerConfig("wordpiece", vocab_size=64))
    text = " ".join(["The cat sat on the mat."] * 10)
    out = TopicChunks(tok, max_len=16)({"text": np.array([text, "Tiny."], dtype=object),
                                        "source": np.array(["doc", "short"], dtype=object)})
    assert set(out["source"]) == {"doc"}  # "Tiny." is below the minimum chunk length
    assert out["input_ids"].shape[1] == 16 and (out["input_ids"][:, 0] == tok.cls_id).all()
    real = out["attention_mask"].sum(axis=1)
    assert (out["input_ids"][np.arange(len(real)), real - 1] == tok.sep_id).all()
    assert out["chunk"].tolist() == list(range(len(out["chunk"])))
    assert (out["mlm_labels"] == IGNORE_INDEX).all() and (out["nsp_labels"] == IGNORE_INDEX).all()


# ----------------------------------------------------------------------------- whole protocol


def save_checkpoint(directory, method, optimizer, cfg, tokenizer, steps):
    """A checkpoint laid out as the trainer writes it: state.pt beside the run's tokenizer/."""
    directory.mkdir(parents=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_state(directory, model_state=method.state_dict(), optimizer_state=optimizer.state_dict(),
               scheduler=scheduler, state=TrainState(step=steps), rng=[rng_state()], config=cfg.to_dict())
    tokenizer.save(directory / "tokenizer")
    return directory


def train_tiny(cfg, make_rows, steps: int, lr: float):
    """Train the method of ``cfg`` in-process with plain torch on rows of the python-docs training
    split (what the Ray pipeline would feed), AdamW, fixed seed. Returns (method, optimizer, tokenizer)."""
    kind = "wordpiece" if cfg.method.name == "bert" else "bpe"
    docs = load_python_docs(cfg.data.val_fraction, cfg.train.seed)["train"]
    tokenizer = train_tokenizer([d.text for d in docs], TokenizerConfig(kind, cfg.data.vocab_size))
    rows = make_rows(tokenizer, {"text": np.array([d.text for d in docs], dtype=object),
                                 "source": np.array([d.name for d in docs], dtype=object)})
    torch.manual_seed(cfg.train.seed)
    method = methods.build(cfg, vocab_size=tokenizer.vocab_size, max_len=cfg.data.max_len)
    optimizer = torch.optim.AdamW(method.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    n = len(next(iter(rows.values())))
    for _ in range(steps):
        idx = torch.randint(0, n, (32,), generator=g).numpy()
        loss = method({k: torch.from_numpy(v[idx]) for k, v in rows.items()})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return method, optimizer, tokenizer


TINY_TEXT = ["data.vocab_size=512", "data.max_len=32", "model.dim=32", "model.depth=1", "model.heads=2",
             "eval.batch_size=128", "eval.sample_tokens=8"]


def test_gpt_protocol_beats_random_init_and_unigram(ray_session, tmp_path):
    cfg = load_config("gpt-python-docs", TINY_TEXT)
    method, optimizer, tok = train_tiny(cfg, lambda tok, docs: GptBlocks(tok, cfg.data.max_len)(docs), 150, 3e-3)
    checkpoint = save_checkpoint(tmp_path / "run" / "checkpoint_000150", method, optimizer, cfg, tok, 150)

    rows = {r["encoder"]: r for r in evaluate_run(cfg, checkpoint, tmp_path / "run")}
    trained, random_init = rows["GPT (this run)"], rows["random init"]
    unigram = next(r for name, r in rows.items() if name.startswith("unigram"))
    bigram = next(r for name, r in rows.items() if name.startswith("bigram"))
    for row in rows.values():
        assert 1 < row["perplexity"] < 3 * tok.vocab_size
        assert row["bits_per_token"] == pytest.approx(math.log2(row["perplexity"]))
    assert random_init["perplexity"] > 0.5 * tok.vocab_size  # untrained: about uniform
    assert trained["perplexity"] < unigram["perplexity"] < random_init["perplexity"]
    assert bigram["perplexity"] < unigram["perplexity"]  # which token follows which is worth something here
    print(f"tiny GPT {trained['perplexity']:.0f}, bigram {bigram['perplexity']:.0f}, "
          f"unigram {unigram['perplexity']:.0f}")  # figures, not assertions: this GPT trains 150 steps

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [s["kind"] for s in results["samples"]].count("few-shot") == 1
    assert all(s["completion"].strip() for s in results["samples"])
    markdown = (tmp_path / "run" / "results.md").read_text()
    assert "few-shot" in markdown and results["samples"][0]["completion"] in markdown


def test_bert_protocol_beats_random_init(ray_session, tmp_path):
    cfg = load_config("bert-python-docs", TINY_TEXT)

    def pairs(tok, docs):  # training's dynamic masks, fixed here so the test is repeatable
        return BertBatcher(tok, cfg.data.max_len, seed=123)(docs)

    method, optimizer, tok = train_tiny(cfg, pairs, 150, 3e-3)
    checkpoint = save_checkpoint(tmp_path / "run" / "checkpoint_000150", method, optimizer, cfg, tok, 150)

    rows = {r["encoder"]: r for r in evaluate_run(cfg, checkpoint, tmp_path / "run")}
    trained, random_init = rows.pop("BERT (this run)"), rows.pop("random init")
    [(frequent_name, frequent)] = rows.items()  # the third row: the most frequent token's
    assert frequent_name.startswith("most frequent token") and set(frequent) == {"encoder", "mlm_accuracy"}
    assert 0.0 < frequent["mlm_accuracy"] < 0.5
    for row in (trained, random_init):
        for key in ("mlm_accuracy", "nsp_accuracy", "linear_probe_top1", "knn_top1"):
            assert 0.0 <= row[key] <= 1.0, (row["encoder"], key)
    print(f"tiny BERT MLM {trained['mlm_accuracy']:.3f}, {frequent_name} {frequent['mlm_accuracy']:.3f}")
    assert random_init["mlm_accuracy"] < 0.02  # about 1 / vocabulary
    # 150 steps learn the common tokens: a few percent of ~1,300 masked positions, against none.
    assert trained["mlm_accuracy"] > random_init["mlm_accuracy"] + 0.02
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["topic_probe_classes"]) >= 2

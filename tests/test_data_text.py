"""Text corpora through Ray Data: every format with its bad records counted, strict mode, built-in
python-docs, the BERT/GPT batchers inside map_batches, and `sslp data inspect --kind text`."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssl_platform.data.inspect import InspectLedger
from ssl_platform.data.masking import BertBatcher, GptBlocks
from ssl_platform.data.python_docs import corpus_stats, load_python_docs
from ssl_platform.data.skips import BadRecordError, SkipReporter
from ssl_platform.data.text import inspect_text, list_text_files, read_text_corpus, select_split, split_sentences
from ssl_platform.data.text_corpora import text_corpus_dataset
from ssl_platform.data.tokenizer import TokenizerConfig, train_tokenizer

pytestmark = pytest.mark.usefixtures("ray_session")


def read(source, **kwargs):
    """Rows of a corpus and the skip counts of its own ledger."""
    with InspectLedger(strict=False) as ledger:
        rows = read_text_corpus(source, reporter=ledger.reporter, **kwargs).take_all()
    return sorted(rows, key=lambda r: r["source"]), ledger.summary["by_reason"]


def write_txt_corpus(root):
    root.mkdir()
    (root / "good.txt").write_text("First document,\nover two lines.\n\n\n  \nSecond document.\r\n\r\nThird.\n")
    (root / "bad.txt").write_bytes(b"fine block\n\nbroken \xff\xfe block\nstill broken\n")  # one undecodable block
    (root / "empty.txt").write_text("\n  \n")  # a file with no document
    (root / ".hidden.txt").write_text("never read\n")
    return root


def test_txt_by_block_counts_good_and_skipped(tmp_path):
    rows, skipped = read(write_txt_corpus(tmp_path / "txt"))
    assert [r["text"] for r in rows] == ["fine block", "First document,\nover two lines.", "Second document.", "Third."]
    assert [r["source"].rsplit("/", 1)[1] for r in rows] == ["bad.txt:1", "good.txt:1", "good.txt:6", "good.txt:8"]
    assert skipped == {"undecodable record": 1, "empty text": 1}


def test_txt_by_line_counts_good_and_skipped(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_bytes(b"one\n\ntwo \xff\nthree\n   \nfour")
    rows, skipped = read(path, unit="line")
    assert [r["text"] for r in rows] == ["one", "three", "four"]
    assert skipped == {"empty text": 2, "undecodable record": 1}


def test_jsonl_counts_good_and_skipped_and_reads_gzip(tmp_path):
    lines = [json.dumps({"text": "alpha"}), "{not json", json.dumps({"text": ""}), json.dumps({"body": "no text"}),
             "", json.dumps({"text": "beta", "id": 2}), json.dumps([1, 2]), json.dumps({"text": "  gamma  "})]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "delta"}) + "\n")
    rows, skipped = read(tmp_path)
    assert sorted(r["text"] for r in rows) == ["alpha", "beta", "delta", "gamma"]
    assert skipped == {"undecodable record": 2, "empty text": 2}


def test_parquet_counts_good_skipped_and_unreadable(tmp_path):
    pq.write_table(pa.table({"body": ["a doc", "", None, "another doc"], "id": [1, 2, 3, 4]}),
                   tmp_path / "good.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    rows, skipped = read(tmp_path, text_field="body")
    assert [(r["text"], r["source"].rsplit("/", 1)[1]) for r in rows] == [("a doc", "good.parquet:0"),
                                                                          ("another doc", "good.parquet:3")]
    assert skipped == {"empty text": 2, "unreadable file": 1}
    with pytest.raises(ValueError, match=r"no column 'text'.*body"):  # a wrong field fails up front
        read_text_corpus(tmp_path / "good.parquet", reporter=SkipReporter())


@pytest.mark.parametrize("name, content, kwargs", [
    ("bad.txt", b"ok\n\nbad \xff\n", {}),
    ("bad_line.txt", b"ok\n\n", {"unit": "line"}),
    ("bad.jsonl", b'{"text": "ok"}\n{oops\n', {}),
    ("bad.parquet", b"not parquet", {}),
])
def test_strict_fails_naming_the_file(tmp_path, name, content, kwargs):
    (tmp_path / name).write_bytes(content)
    ds = read_text_corpus(tmp_path / name, reporter=SkipReporter(None, strict=True), **kwargs)
    with pytest.raises(BadRecordError, match=name):
        ds.materialize()


def test_missing_path_and_unknown_format_fail_before_any_dataset(tmp_path):
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(ValueError, match=str(missing)):
        read_text_corpus(missing, reporter=SkipReporter())
    (tmp_path / "corpus.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="fmt="):
        list_text_files(str(tmp_path / "corpus.csv"))
    with pytest.raises(ValueError, match="no text files"):
        list_text_files(str(tmp_path))
    with pytest.raises(ValueError, match="unit"):
        read_text_corpus(tmp_path / "corpus.csv", reporter=SkipReporter(), unit="paragraph", fmt="txt")


def test_globs_uris_and_forced_format(tmp_path):
    root = write_txt_corpus(tmp_path / "txt")
    assert [f.rsplit("/", 1)[1] for f, _ in list_text_files(str(root / "g*.txt"))] == ["good.txt"]
    assert [f.rsplit("/", 1)[1] for f, _ in list_text_files(f"file://{root}")] == ["bad.txt", "empty.txt", "good.txt"]
    (tmp_path / "notes.log").write_text("a log line\n")
    assert list_text_files(str(tmp_path / "notes.log"), fmt="txt")[0][1] == "txt"


def test_select_split_partitions_documents_deterministically(tmp_path):
    (tmp_path / "lines.txt").write_text("\n".join(f"line {i}" for i in range(200)) + "\n")
    ds = read_text_corpus(tmp_path / "lines.txt", reporter=SkipReporter(), unit="line")
    train = {r["source"] for r in select_split(ds, "train", val_fraction=0.2, seed=0).take_all()}
    val = {r["source"] for r in select_split(ds, "val", val_fraction=0.2, seed=0).take_all()}
    assert not train & val and len(train | val) == 200 and 20 <= len(val) <= 60
    assert val == {r["source"] for r in select_split(ds, "val", val_fraction=0.2, seed=0).take_all()}


def test_python_docs_is_offline_split_by_document_and_a_dataset():
    splits = load_python_docs(val_fraction=0.1, seed=0)
    stats = corpus_stats(splits["train"] + splits["val"])
    assert stats["documents"] >= 50 and stats["sentences"] > 2000 and stats["characters"] > 200_000
    assert not {d.name for d in splits["train"]} & {d.name for d in splits["val"]} and len(splits["val"]) >= 5
    assert [d.name for d in load_python_docs(0.1, 0)["val"]] == [d.name for d in splits["val"]]
    assert all(">>>" not in d.text and "::=" not in d.text for d in splits["train"])
    rows = text_corpus_dataset("python-docs", "val").take_all()
    assert sorted(r["source"] for r in rows) == sorted(d.name for d in splits["val"])
    assert split_sentences("One sentence. Another one, e.g. this!\n\nA third?") == \
        ["One sentence.", "Another one, e.g. this!", "A third?"]


def test_bert_and_gpt_batchers_run_inside_map_batches(tmp_path):
    ds = text_corpus_dataset("python-docs", "train")
    tok = train_tokenizer(ds, TokenizerConfig(kind="wordpiece", vocab_size=1000))  # streamed from the Dataset
    tok.save(tmp_path / "tok")
    bert = ds.map_batches(BertBatcher(str(tmp_path / "tok"), max_len=64, seed=0), batch_size=16,
                          batch_format="numpy").take_batch(64, batch_format="numpy")
    assert bert["input_ids"].shape == (64, 64) and bert["mlm_labels"].shape == (64, 64)
    assert set(bert["nsp_labels"].tolist()) <= {0, 1}
    gpt = ds.map_batches(GptBlocks(tok, block_size=48), batch_size=16, batch_format="numpy").take_batch(32)
    assert gpt["input_ids"].shape == (32, 48)


def test_inspect_text_reports_counts_skips_example_and_figure(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    texts = [f"Document {i} talks about topic {i % 7}. It has a second sentence. And a third one about {i}."
             for i in range(40)]
    corpus.write_text("\n".join([json.dumps({"text": t}) for t in texts] + ["{broken", json.dumps({"text": ""})]))
    out = inspect_text(str(corpus), tmp_path / "inspect", vocab_size=200, max_len=32)
    assert out["records"] == 40
    assert out["skipped"]["by_reason"] == {"undecodable record": 1, "empty text": 1}
    assert "[MASK:" in " ".join(out["example"]["masked_text"])
    assert out["example"]["bert_batch"]["input_ids"].endswith(", 32)")
    png = (tmp_path / "inspect" / "text_masks.png").read_bytes()
    assert out["figure"].endswith("text_masks.png") and png.startswith(b"\x89PNG")
    assert (tmp_path / "inspect" / "tokenizer" / "tokenizer.json").is_file()
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    empty = inspect_text(str(tmp_path / "empty.jsonl"), tmp_path / "inspect2")
    assert empty["records"] == 0 and empty["figure"] is None and empty["skipped"]["total"] == 1


def test_inspect_accepts_the_builtin_name(tmp_path):
    out = inspect_text("python-docs", tmp_path, max_len=48, vocab_size=800)
    assert out["records"] >= 50 and out["skipped"]["total"] == 0 and np.isfinite(out["example"]["selected_fraction"])

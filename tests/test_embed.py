"""`sslp embed`: a run's embeddings of a corpus, streamed to parquet by Ray Data batch inference."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import BIG_RECORDS, show
from PIL import Image
from simclr_digits import DERIVED, TINY, save_checkpoint

from ssl_platform import cli
from ssl_platform.config import load_config
from ssl_platform.embed import embed
from ssl_platform.evaluate.inference import build_method
from ssl_platform.pretrained import load
from ssl_platform.train.session import spilled_bytes

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]  # see conftest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A SimCLR digits checkpoint (random weights: embedding is the same computation either way)."""
    cfg = load_config("simclr-digits", [*TINY, "eval.enabled=false", "name=embed-src"])
    checkpoint = tmp_path_factory.mktemp("run") / "checkpoint_000000"
    checkpoint.mkdir()
    save_checkpoint(checkpoint, cfg, build_method(cfg, DERIVED, None, seed=3))
    return checkpoint


def read(out) -> pa.Table:
    return pq.read_table(out)


def png(image: np.ndarray, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def test_builtin_corpus_one_row_per_record_equal_to_load(run, tmp_path):
    pretrained = load(run)
    summary = embed(pretrained, "digits", tmp_path / "out", batch_size=100)
    table = read(tmp_path / "out")
    assert summary.rows == table.num_rows == 1797 and summary.skipped.get("total", 0) == 0
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    assert table.schema.field("embedding").type.list_size == pretrained.dim == summary.dim
    assert table.schema.field("embedding").type.value_type == pa.float32()
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids)

    # The same records through ssl_platform.load on the driver.
    from ssl_platform.data.builtin import load_image_corpus

    cfg = pretrained.cfg
    train = load_image_corpus("digits", cfg.data.image_size, cfg.data.val_fraction, cfg.train.seed)["train"]
    picks = [0, 7, 500]
    expected = pretrained.embed_images(train.images[picks].transpose(0, 2, 3, 1))  # (3, D) from (N, H, W, C)
    by_id = dict(zip(ids, table.column("embedding").to_numpy(zero_copy_only=False), strict=True))
    got = np.stack([by_id[f"digits/train/{i:06d}"] for i in picks])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def image_folder(folder, good: int):
    """``good`` random PNGs and a corrupt one in ``folder``."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(good):
        (folder / f"good{i:02d}.png").write_bytes(png(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def test_corrupt_records_are_skipped_and_counted(run, tmp_path):
    folder = image_folder(tmp_path / "imgs", good=12)
    (folder / "empty.jpg").write_bytes(b"")
    summary = embed(load(run), str(folder), tmp_path / "out", batch_size=5)
    table = read(tmp_path / "out")
    assert summary.rows == table.num_rows == 12
    assert summary.skipped["by_reason"] == {"corrupt image": 1, "empty image": 1}, summary.skipped
    names = sorted(p.rsplit("/", 1)[-1] for p in table.column("id").to_pylist())
    assert names == [f"good{i:02d}.png" for i in range(12)]
    assert np.isfinite(np.stack(table.column("embedding").to_numpy(zero_copy_only=False))).all()


def test_sslp_embed_shows_its_result_and_keeps_ray_datas_lines_beside_the_output(sslp, run, tmp_path):
    """The command as a user runs it (a job on the session's head, stdout a pipe): the console holds
    the platform's two lines; Ray Data's INFO lines (and its progress, logged in a pipe) are in
    OUT.ray.log."""
    folder = image_folder(tmp_path / "imgs", good=6)
    done = sslp("embed", str(run), str(folder), "--out", str(tmp_path / "emb"), "--batch-size", "4", cwd=tmp_path)
    assert done.returncode == 0, show(done)
    said = done.stdout.splitlines()
    assert len(said) == 2 and said[0].startswith("6 embeddings written (images, 16 dims); skipped 1 records: corrupt "
                                                 "image 1") and said[1] == f"output: {tmp_path / 'emb'}", show(done)
    assert done.stderr == "", show(done)
    assert read(tmp_path / "emb").num_rows == 6  # the folder holds parquet only
    log = (tmp_path / "emb.ray.log").read_text()
    assert "execution finished" in log and "Data sink Parquet finished" in log


def test_corpus_larger_than_the_object_store_streams_through(run, big_image_corpus, tmp_path):
    summary = embed(load(run), str(big_image_corpus), tmp_path / "out", batch_size=64)
    assert summary.rows == read(tmp_path / "out").num_rows == BIG_RECORDS
    assert len(set(read(tmp_path / "out").column("id").to_pylist())) == BIG_RECORDS
    # a figure for the report, not an assertion
    # a figure for the report, not an assertion
    print(f"object store spilled {(spilled_bytes() or 0) / 2**20:.0f} MiB since it started")


def test_cli_refuses_a_wrong_modality_and_an_existing_out(run, tmp_path, capsys):
    assert cli.main(["embed", str(run), "digits", "--out", str(tmp_path / "o"), "--modality",
                     "texts"]) == cli.EXIT_USAGE
    assert "embeds images" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.parquet").write_bytes(b"")
    assert cli.main(["embed", str(run), "digits", "--out", str(tmp_path / "full")]) == cli.EXIT_USAGE
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["embed", str(tmp_path / "nope"), "digits", "--out", str(tmp_path / "o")]) == cli.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def by_id(out) -> dict[str, np.ndarray]:
    table = read(out)
    return dict(zip(table.column("id").to_pylist(), table.column("embedding").to_numpy(zero_copy_only=False),
                    strict=True))


def test_clip_texts_bert_texts_and_cpc_audio_equal_load(tmp_path, one_thread):
    from test_pretrained import make_run

    from ssl_platform.data.digit_captions import load_digit_caption_splits
    from ssl_platform.data.python_docs import python_docs_documents
    from ssl_platform.data.spoken_digits import load_spoken_digits

    clip = load(make_run(tmp_path, "clip")[0])
    summary = embed(clip, "digit-captions", tmp_path / "texts", modality="texts")
    rows = by_id(tmp_path / "texts")
    captions = load_digit_caption_splits(clip.cfg.data.image_size, clip.cfg.data.val_fraction,
                                         clip.cfg.train.seed)["val"].captions
    assert summary.rows == len(rows) and summary.dim == clip.dim == len(next(iter(rows.values())))
    got = np.stack([rows[f"digit-captions/val/{i:06d}"] for i in (0, 5)])
    np.testing.assert_allclose(got, clip.embed_texts([captions[0], captions[5]]), rtol=1e-4, atol=1e-5)

    cpc = load(make_run(tmp_path, "cpc")[0])
    summary = embed(cpc, "spoken-digits", tmp_path / "audio", batch_size=16)
    rows = by_id(tmp_path / "audio")
    clips = load_spoken_digits(cpc.cfg.data.sample_rate)
    assert summary.rows == len(rows) == len(clips)
    got = np.stack([rows[clips.paths[i]] for i in (0, 9)])
    expected = cpc.embed_audio([clips.audio[0], clips.audio[9]], cpc.cfg.data.sample_rate)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    bert = load(make_run(tmp_path, "bert")[0])
    summary = embed(bert, "python-docs", tmp_path / "docs", batch_size=32)
    rows = by_id(tmp_path / "docs")
    docs = python_docs_documents()
    assert summary.rows == len(rows) == len(docs)  # ids unique: one per document
    picks = [docs[0], docs[10]]
    got = np.stack([next(v for k, v in rows.items() if k.startswith(f"{d.name}#")) for d in picks])  # topic#hash
    np.testing.assert_allclose(got, bert.embed_texts([d.text for d in picks]), rtol=1e-4, atol=1e-5)

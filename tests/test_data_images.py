"""Image corpora: folder trees, parquet (bytes or paths) and WebDataset shards, read through Ray
Data with bad records skipped and counted, plus ``sslp data inspect --kind image``."""

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ssl_platform.data import sources
from ssl_platform.data.audio import list_audio_files
from ssl_platform.data.images import inspect_image, read_image_corpus
from ssl_platform.data.inspect import InspectLedger
from ssl_platform.data.skips import SkipReporter
from ssl_platform.data.text import list_text_files

pytestmark = pytest.mark.usefixtures("ray_session")


def encoded(value: int, fmt: str = "PNG", shape=(20, 30, 3)) -> bytes:
    """A small image file's bytes: a constant colour (so decoded values are known) in ``fmt``."""
    buf = io.BytesIO()
    Image.fromarray(np.full(shape, value, np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_images(folder, values, corrupt: str | None = None, fmt: str = "PNG"):
    """Files ``folder/I.png`` of constant colours ``values``, plus an undecodable file named ``corrupt``."""
    folder.mkdir(exist_ok=True)
    for i, v in enumerate(values):
        (folder / f"{i}.{fmt.lower()}").write_bytes(encoded(v, fmt))
    if corrupt:
        (folder / corrupt).write_bytes(b"corrupt")


def read_with_ledger(reader, source, strict=False, **kwargs):
    """``reader(source, ...)`` with a fresh ledger of its own: (rows sorted by path, skip summary, corpus)."""
    with InspectLedger(strict) as ledger:
        corpus = reader(str(source), reporter=ledger.reporter, **{"size": 16, "channels": 3, **kwargs})
        rows = sorted(corpus.dataset.take_all(), key=lambda r: r["path"])
    return rows, ledger.summary, corpus


def read(source, strict=False, **kwargs):
    return read_with_ledger(read_image_corpus, source, strict, **kwargs)


def write_tar(path, samples):
    """samples: [(key, {ext: bytes})] -> a WebDataset shard."""
    with tarfile.open(fileobj=path, mode="w") if isinstance(path, io.BytesIO) else tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_folder_with_class_subfolders_labels_by_sorted_folder(tmp_path):
    for name, values in {"dog": (10, 20), "cat": (30, 40, 50)}.items():
        (tmp_path / name).mkdir()
        for i, v in enumerate(values):
            (tmp_path / name / f"{i}.PNG" if i else tmp_path / name / f"{i}.jpg").write_bytes(
                encoded(v, "PNG" if i else "JPEG"))
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "dog" / "empty.jpeg").write_bytes(b"")
    (tmp_path / "dog" / "2.webp").write_bytes(encoded(60, "WEBP"))
    (tmp_path / "dog" / "notes.txt").write_text("not an image, not a record")
    rows, summary, corpus = read(tmp_path)
    assert corpus.fmt == "folder" and corpus.class_names == ("cat", "dog")
    assert len(rows) == 6
    assert summary["by_reason"] == {"corrupt image": 1, "empty image": 1}
    assert any(p.endswith("broken.png") for p in summary["examples"]["corrupt image"])
    labels = {r["path"].split("/")[-2] + "/" + r["path"].split("/")[-1]: int(r["label"]) for r in rows}
    assert labels == {"cat/0.jpg": 0, "cat/1.PNG": 0, "cat/2.PNG": 0, "dog/0.jpg": 1, "dog/1.PNG": 1, "dog/2.webp": 1}
    for r in rows:
        assert r["image"].shape == (3, 16, 16) and r["image"].dtype == np.uint8
    png = next(r for r in rows if r["path"].endswith("cat/2.PNG"))
    assert np.all(png["image"] == 50)  # decoded pixels, not just shapes


def test_flat_folder_is_unlabelled_and_grayscale_on_request(tmp_path):
    for i in range(3):
        (tmp_path / f"img{i}.jpeg").write_bytes(encoded(60 * i, "JPEG"))
    (tmp_path / "img3.bmp").write_bytes(encoded(200, "BMP"))
    (tmp_path / "bad.bmp").write_bytes(b"BM garbage")
    (tmp_path / "empty.png").write_bytes(b"")
    rows, summary, corpus = read(tmp_path, channels=1, size=8)
    assert corpus.class_names == () and len(rows) == 4
    assert summary["by_reason"] == {"corrupt image": 1, "empty image": 1}
    assert all(int(r["label"]) == -1 and r["image"].shape == (1, 8, 8) for r in rows)


def test_parquet_with_image_bytes_and_labels(tmp_path):
    blobs = [encoded(10), encoded(20, "JPEG"), b"corrupt", None, encoded(30)]  # None: the empty record
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary()), "label": [3, 1, 4, 1, None]}),
                   tmp_path / "part-0.parquet")
    rows, summary, corpus = read(tmp_path)
    assert corpus.fmt == "parquet" and len(rows) == 3
    assert summary["by_reason"] == {"corrupt image": 1, "missing image": 1}
    assert sorted(int(r["label"]) for r in rows) == [-1, 1, 3]  # a null label is "unlabelled"
    assert all("part-0.parquet#" in r["path"] for r in rows)  # keyed by file and row
    assert len({r["path"] for r in rows}) == 3


def test_parquet_with_paths_beside_the_images(tmp_path):
    images = tmp_path / "imgs"
    write_images(images, (0, 40, 80), corrupt="bad.png")
    absolute = tmp_path / "elsewhere.jpg"
    absolute.write_bytes(encoded(99, "JPEG"))
    refs = ["imgs/0.png", "imgs/1.png", "imgs/2.png", str(absolute), "imgs/bad.png", "imgs/gone.png", None]
    pq.write_table(pa.table({"path": refs, "label": list(range(7))}), tmp_path / "index.parquet")
    rows, summary, corpus = read(tmp_path)  # images sit beside the parquet: parquet wins detection
    assert corpus.fmt == "parquet"
    assert sorted(int(r["label"]) for r in rows) == [0, 1, 2, 3]
    assert summary["by_reason"] == {"corrupt image": 1, "missing image": 2}  # gone.png and the null path
    assert {r["path"] for r in rows} >= {str(images / "0.png"), str(absolute)}


def test_webdataset_shards_skip_bad_samples_and_unreadable_shards(tmp_path):
    write_tar(tmp_path / "shard-0.tar", [
        ("a/000", {"jpg": encoded(10, "JPEG"), "cls": b"3"}),
        ("a/001", {"png": encoded(20), "cls": b"7", "txt": b"a caption"}),
        ("a/002", {"jpg": b"corrupt", "cls": b"1"}),
        ("a/003", {"jpg": b"", "cls": b"2"}),
        ("a/004", {"jpeg": encoded(30, "JPEG")}),
    ])
    (tmp_path / "shard-1.tar").write_bytes(b"not a tar archive" * 64)
    whole = io.BytesIO()
    write_tar(whole, [("b/000", {"png": encoded(5, "PNG", (200, 200, 3))})])
    (tmp_path / "shard-2.tar").write_bytes(whole.getvalue()[:700])  # cut inside the member
    rows, summary, corpus = read(tmp_path, channels=1)
    assert corpus.fmt == "webdataset"
    assert [(r["path"].split("shard-0.tar/")[1], int(r["label"])) for r in rows] == [
        ("a/000", 3), ("a/001", 7), ("a/004", -1)]
    assert summary["by_reason"] == {"corrupt image": 1, "empty image": 1, "unreadable shard": 2}
    bad_shards = sorted(p.rsplit("/", 1)[1] for p in summary["examples"]["unreadable shard"])
    assert bad_shards == ["shard-1.tar", "shard-2.tar"]


def test_strict_fails_naming_the_file(tmp_path):
    write_images(tmp_path, (1,), corrupt="culprit.png")
    with pytest.raises(Exception, match=r"culprit.png: corrupt image"):
        read(tmp_path, strict=True)


def test_bad_sources_fail_before_any_dataset(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=r"nope.*does not exist"):
        read_image_corpus(str(missing), size=8, channels=3, reporter=SkipReporter())
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="no corpus files"):
        read_image_corpus(str(tmp_path), size=8, channels=3, reporter=SkipReporter())
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="neither an image-bytes column 'image' nor a path column 'path'"):
        read_image_corpus(str(tmp_path), size=8, channels=3, reporter=SkipReporter())


def test_every_reader_lists_and_labels_files_by_the_same_rules(tmp_path):
    for folder in ("cat", "dog", "_private", ".hidden"):
        (tmp_path / folder).mkdir()
        for name in ("a.png", "b.wav", "c.txt"):
            (tmp_path / folder / name).write_bytes(b"")
    (tmp_path / "notes").mkdir()  # holds no corpus file of any kind: no class
    (tmp_path / "notes" / "x.csv").write_bytes(b"")
    for name in ("root.png", "root.wav", "_skipped.wav", ".skipped.txt"):
        (tmp_path / name).write_bytes(b"")
    loc = sources.locate(str(tmp_path))
    pngs = loc.files(("png",))
    assert [p.removeprefix(str(tmp_path)) for p in pngs] == ["/cat/a.png", "/dog/a.png", "/root.png"]
    assert sources.folder_classes(pngs, loc.root) == ("cat", "dog")
    assert sources.folder_labels(pngs, loc.root, ("cat", "dog")).tolist() == [0, 1, -1]
    wavs = list_audio_files(tmp_path)
    assert [p.removeprefix(str(tmp_path)) for p in wavs.paths] == ["/cat/b.wav", "/dog/b.wav", "/root.wav"]
    assert wavs.class_names == ("cat", "dog")
    assert [f.removeprefix(str(tmp_path)) for f, _ in list_text_files(str(tmp_path))] == ["/cat/c.txt", "/dog/c.txt"]


@pytest.mark.parametrize("list_corpus", [
    lambda uri: read_image_corpus(uri, size=8, channels=3, reporter=SkipReporter()),
    list_text_files, lambda uri: list_text_files(uri + "/*.txt"), list_audio_files],
    ids=["image", "text", "text-glob", "audio"])
def test_unreachable_object_store_fails_instead_of_hanging(monkeypatch, list_corpus):
    monkeypatch.setattr(sources, "LOCATE_TIMEOUT_S", 3.0)
    # Offline this would retry for minutes; online it fails at once (no such bucket, no credentials).
    with pytest.raises(ValueError, match="corpus 'gs://sslp-no-such-bucket-0/x"):
        list_corpus("gs://sslp-no-such-bucket-0/x")


def test_inspect_counts_skips_and_draws_view_pairs(tmp_path):
    corpus = tmp_path / "corpus"
    write_images(corpus, (0, 50, 100, 150, 200), corrupt="bad.png")
    out = inspect_image(str(corpus), tmp_path / "out", size=16)
    assert out["records"] == 5 and out["skipped"]["by_reason"] == {"corrupt image": 1}
    assert out["example"]["view1"].startswith("uint8 (5, 3, 16, 16)")
    assert (tmp_path / "out" / "image_views.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    builtin = inspect_image("digits", tmp_path / "digits", size=16)
    assert builtin["records"] == 1437 and builtin["skipped"]["total"] == 0
    assert builtin["example"]["class_names"][7] == "seven"

    (corpus / "bad2.png").write_bytes(b"")
    for i in range(5):
        (corpus / f"{i}.png").unlink()
    empty = inspect_image(str(corpus), tmp_path / "none", size=16)
    assert empty["records"] == 0 and empty["figure"] is None and empty["skipped"]["total"] == 2

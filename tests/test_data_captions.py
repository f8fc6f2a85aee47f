"""Image-caption corpora (parquet, CSV, TSV, WebDataset), the built-in digit-captions, the CLIP
batch transform, and ``sslp data inspect --kind image-caption``."""

import io
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_images import encoded, read_with_ledger, write_images

from ssl_platform.data.builtin import DIGIT_NAMES
from ssl_platform.data.captions import CaptionTransform, inspect_image_caption, read_caption_corpus
from ssl_platform.data.digit_captions import (
    CAPTION_TEMPLATES,
    caption_split_dataset,
    load_digit_caption_splits,
    zero_shot_prompts,
)
from ssl_platform.data.skips import SkipReporter

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def digit_captions():
    return load_digit_caption_splits(image_size=16, seed=0)


def read(source, strict=False, **kwargs):
    return read_with_ledger(read_caption_corpus, source, strict, **kwargs)


def image_folder(root):
    write_images(root / "imgs", (0, 40, 80), corrupt="bad.jpg")


def test_csv_with_paths_quotes_and_bad_lines(tmp_path):
    image_folder(tmp_path)
    (tmp_path / "pairs.csv").write_text(
        "caption,image,source\n"
        '"a dark square, mostly black",imgs/0.png,web\n'
        "a grey square,imgs/1.png,web\n"
        '"a ""light"" square",imgs/2.png,web\n'
        ",imgs/0.png,web\n"            # empty caption
        "a broken file,imgs/bad.jpg,web\n"
        "too,many,fields,here\n"      # malformed line
    )
    rows, summary, corpus = read(tmp_path)
    assert corpus.fmt == "csv"
    assert [r["caption"] for r in rows] == ["a dark square, mostly black", "a grey square", 'a "light" square']
    assert rows[0]["path"] == str(tmp_path / "imgs" / "0.png") and rows[0]["image"].shape == (3, 16, 16)
    assert summary["by_reason"] == {"missing caption": 1, "corrupt image": 1, "malformed row": 1}


def test_tsv_keeps_unbalanced_quotes(tmp_path):
    image_folder(tmp_path)
    (tmp_path / "pairs.tsv").write_text(
        "image\tcaption\n"
        'imgs/0.png\ta 12" record sleeve\n'
        "imgs/1.png\tgrey\n"
        "imgs/2.png\t   \n"            # blank caption
        "imgs/bad.jpg\tbroken\n"
    )
    rows, summary, corpus = read(tmp_path / "pairs.tsv")
    assert corpus.fmt == "tsv"
    assert [r["caption"] for r in rows] == ['a 12" record sleeve', "grey"]
    assert summary["by_reason"] == {"missing caption": 1, "corrupt image": 1}


def test_parquet_with_image_bytes(tmp_path):
    table = pa.table({"jpeg": pa.array([encoded(10, "JPEG"), encoded(20), b"corrupt", encoded(30)], pa.binary()),
                      "text": ["one", "two", "three", None]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    rows, summary, corpus = read(tmp_path, image_column="jpeg", caption_column="text", channels=1)
    assert corpus.fmt == "parquet"
    assert sorted(r["caption"] for r in rows) == ["one", "two"]
    assert all(r["image"].shape == (1, 16, 16) for r in rows)
    assert summary["by_reason"] == {"corrupt image": 1, "missing caption": 1}
    with pytest.raises(ValueError, match="no column 'caption'"):
        read_caption_corpus(str(tmp_path), size=16, channels=3, reporter=SkipReporter(), image_column="jpeg")


def test_webdataset_image_text_pairs(tmp_path):
    with tarfile.open(tmp_path / "pairs-000.tar", "w") as tar:
        for key, members in [("0", {"jpg": encoded(1, "JPEG"), "txt": b"first"}),
                             ("1", {"png": encoded(2), "txt": "caf\u00e9".encode()}),
                             ("2", {"jpg": encoded(3, "JPEG"), "txt": b""}),     # empty caption
                             ("3", {"jpg": b"corrupt", "txt": b"broken"}),
                             ("4", {"jpg": encoded(5, "JPEG")})]:                # no caption at all
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    rows, summary, corpus = read(tmp_path)
    assert corpus.fmt == "webdataset"
    assert [r["caption"] for r in rows] == ["first", "caf\u00e9"]
    assert summary["by_reason"] == {"missing caption": 2, "corrupt image": 1}


def test_strict_fails_naming_the_record(tmp_path):
    image_folder(tmp_path)
    (tmp_path / "pairs.csv").write_text("image,caption\nimgs/0.png,fine\nimgs/2.png,\n")
    with pytest.raises(Exception, match=r"imgs/2.png: missing caption"):
        read(tmp_path, strict=True)
    with pytest.raises(ValueError, match="does not exist"):
        read_caption_corpus(str(tmp_path / "missing.csv"), size=16, channels=3, reporter=SkipReporter())


def mentioned_digits(caption: str) -> set[int]:
    words = re.findall(r"[a-z]+|\d+", caption.lower())
    return {DIGIT_NAMES.index(w) for w in words if w in DIGIT_NAMES} | {int(w) for w in words if w.isdigit()}


def test_digit_captions_name_exactly_their_digit(digit_captions):
    train, val = digit_captions["train"], digit_captions["val"]
    assert len(train) + len(val) == 1797 and train.images.shape[1:] == (1, 16, 16)
    for split in (train, val):
        for caption, label in zip(split.captions, split.labels, strict=True):
            assert mentioned_digits(caption) == {int(label)}, caption
    used = {t for t in CAPTION_TEMPLATES for c in train.captions[:400]
            if re.fullmatch(re.escape(t).replace(r"\{word\}", "[a-z]+").replace(r"\{numeral\}", r"\d"), c)}
    assert len(used) == len(CAPTION_TEMPLATES) >= 8  # the captions really vary
    again = load_digit_caption_splits(image_size=16, seed=0)
    assert list(again["val"].captions) == list(val.captions)  # fixed by the seed


def test_zero_shot_prompts_are_held_out_phrasings(digit_captions):
    prompts = zero_shot_prompts(DIGIT_NAMES)
    assert len(prompts) == 10 and len({len(p) for p in prompts}) == 1
    training = set(digit_captions["train"].captions)
    for label, class_prompts in enumerate(prompts):
        assert all(mentioned_digits(p) == {label} for p in class_prompts)
        assert not training.intersection(class_prompts)


def test_digit_caption_dataset_rows(digit_captions):
    val = digit_captions["val"]
    rows = sorted(caption_split_dataset(val, "digit-captions/val").take_all(), key=lambda r: r["path"])
    assert len(rows) == len(val)
    assert rows[5]["caption"] == val.captions[5] and int(rows[5]["label"]) == val.labels[5]
    assert np.array_equal(rows[5]["image"], val.images[5]) and rows[5]["path"] == "digit-captions/val/000005"


def test_caption_transform_shapes_and_per_record_determinism(digit_captions):
    train = digit_captions["train"]
    batch = {"image": train.images[:12], "caption": train.captions[:12],
             "path": np.array([f"k{i}" for i in range(12)], dtype=object)}
    out = CaptionTransform(size=16, context_length=20, seed=1)(batch)
    assert out.keys() == {"image", "text"}
    assert out["image"].shape == (12, 1, 16, 16) and out["image"].dtype == np.uint8  # normalised on the device
    assert out["text"].shape == (12, 20) and out["text"].dtype == np.int64
    halves = [CaptionTransform(16, 20, seed=1)({k: v[part] for k, v in batch.items()})
              for part in (slice(0, 5), slice(5, 12))]
    assert np.array_equal(np.concatenate([h["image"] for h in halves]), out["image"])  # batching does not matter
    assert not np.array_equal(CaptionTransform(16, 20, seed=1, epoch=1)(batch)["image"], out["image"])
    assert not np.array_equal(CaptionTransform(16, 20)(batch)["image"], CaptionTransform(16, 20)(batch)["image"])
    # (0.9..1 of the area: the crop stays close to the whole image)
    assert np.abs(out["image"] / 127.5 - train.images[:12] / 127.5).mean() < 0.25


def test_inspect_caption_corpora(tmp_path):
    builtin = inspect_image_caption("digit-captions", tmp_path / "builtin", size=16)
    assert builtin["records"] == 1437 and builtin["skipped"]["total"] == 0
    assert builtin["example"]["text"].startswith("int64 (8, 77)")
    assert (tmp_path / "builtin" / "image_captions.png").read_bytes()[:4] == b"\x89PNG"

    image_folder(tmp_path)
    (tmp_path / "pairs.csv").write_text("image,caption\nimgs/0.png,zero\nimgs/bad.jpg,bad\nimgs/1.png,\n")
    out = inspect_image_caption(str(tmp_path / "pairs.csv"), tmp_path / "out", size=16)
    assert out["records"] == 1 and out["skipped"]["by_reason"] == {"corrupt image": 1, "missing caption": 1}
    assert out["example"]["caption"] == ["zero"] and out["figure"].endswith("image_captions.png")

"""Image decoding: formats, channel conversion, sizes, and bad blobs reported by index."""

import io

import numpy as np
import pytest
from PIL import Image

from ssl_platform.data.decode import decode_image_bytes


def encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rgb():
    """A 40x60 image: left half red, right half blue, so crops and conversions are checkable."""
    a = np.zeros((40, 60, 3), np.uint8)
    a[:, :30, 0] = 255
    a[:, 30:, 2] = 255
    return a


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_common_format_decodes_to_rgb(rgb, fmt):
    images, failed = decode_image_bytes([encode(rgb, fmt)], size=20, channels=3)
    assert failed == [] and images.shape == (1, 3, 20, 20) and images.dtype == np.uint8
    left, right = images[0, :, 10, 2].astype(int), images[0, :, 10, -3].astype(int)  # (C,) pixels
    assert left[0] > 200 and left[2] < 60  # centre crop keeps the red half on the left ...
    assert right[2] > 200 and right[0] < 60  # ... and the blue half on the right


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_common_format_decodes_to_grayscale(rgb, fmt):
    """torchvision's WebP decoder ignores the grayscale mode; the batch must still be (N, 1, S, S)."""
    images, failed = decode_image_bytes([encode(rgb, fmt), encode(rgb, "PNG")], size=8, channels=1)
    assert failed == [] and images.shape == (2, 1, 8, 8)
    assert abs(int(images[0, 0, 4, 0]) - round(0.299 * 255)) <= 12  # luma of red, lossy formats included


def test_grayscale_and_rgb_conversions(rgb):
    gray, _ = decode_image_bytes([encode(rgb, "PNG")], size=8, channels=1)
    assert gray.shape == (1, 1, 8, 8)
    assert abs(int(gray[0, 0, 4, 0]) - round(0.299 * 255)) <= 2  # luma of pure red
    assert abs(int(gray[0, 0, 4, -1]) - round(0.114 * 255)) <= 2  # luma of pure blue
    one_channel = encode(np.full((10, 10), 77, np.uint8), "PNG")
    as_rgb, _ = decode_image_bytes([one_channel], size=10, channels=3)
    assert as_rgb.shape == (1, 3, 10, 10) and (as_rgb == 77).all()  # gray replicated to RGB


def test_short_side_resize_and_centre_crop():
    tall = np.zeros((90, 30), np.uint8)
    tall[30:60] = 255  # only the centre square is white
    images, _ = decode_image_bytes([encode(tall, "PNG")], size=15, channels=1)
    assert images.shape == (1, 1, 15, 15) and (images == 255).all()
    same, _ = decode_image_bytes([encode(tall[30:60], "PNG")], size=30, channels=1)
    assert (same == 255).all()  # already the right size: returned as is


def test_bad_blobs_are_reported_by_index_and_dropped(rgb):
    png, jpeg = encode(rgb, "PNG"), encode(rgb, "JPEG")
    blobs = [png, b"", jpeg[: len(jpeg) // 2], jpeg, png[:20] + b"x" * 200, b"not an image at all", None,
             np.frombuffer(png, np.uint8)]
    images, failed = decode_image_bytes(blobs, size=16, channels=3)
    assert failed == [1, 2, 4, 5, 6]
    assert images.shape == (3, 3, 16, 16)


def test_small_jpegs_decoded_in_one_call_equal_each_decoded_alone(rgb):
    """A batch's JPEGs under twice the output side go to libjpeg in one call (a corrupt one among
    them fails that call, and then each is decoded alone); every row, grey or colour, must be
    what the generic decoder gives that JPEG on its own."""
    from ssl_platform.data.decode import center_square_resize, decode_one

    blobs = [encode(np.roll(rgb, 7 * i, axis=1), "JPEG", quality=80 + i) for i in range(3)]
    for channels in (1, 3):
        alone = np.stack([center_square_resize(decode_one(b, channels), 32).numpy() for b in blobs])
        images, failed = decode_image_bytes(blobs, size=32, channels=channels)
        assert failed == [] and np.array_equal(images, alone)
        truncated = blobs[1][:len(blobs[1]) // 2]  # its header is whole: it goes into the one call, and fails it
        images, failed = decode_image_bytes([blobs[0], truncated, blobs[2]], size=32, channels=channels)
        assert failed == [1] and np.array_equal(images, alone[[0, 2]])


def test_no_blobs_and_bad_arguments():
    images, failed = decode_image_bytes([], size=8, channels=1)
    assert images.shape == (0, 1, 8, 8) and failed == []
    with pytest.raises(ValueError, match="channels"):
        decode_image_bytes([], size=8, channels=4)
    with pytest.raises(ValueError, match="size"):
        decode_image_bytes([], size=0, channels=3)


def test_a_large_jpeg_is_decoded_at_reduced_size_with_the_same_pixels():
    """A photo 7.5x the output side: libjpeg's DCT scaling decodes 1/4 of it (short side 120, still
    >= 64), and the resized result matches the full decode's within a few grey levels."""
    from ssl_platform.data.decode import _decode_jpeg_reduced, center_square_resize, decode_one

    y, x = np.mgrid[0:480, 0:640]
    photo = np.stack([x * 255 // 640, y * 255 // 480, (x + y) * 255 // 1120], axis=-1).astype(np.uint8)
    blob = encode(photo, "JPEG", quality=95)
    reduced = _decode_jpeg_reduced(blob, 3, 64)
    assert reduced is not None and 64 <= min(reduced.shape[1:]) < 2 * 64 and reduced.shape[1:] == (120, 160)
    images, failed = decode_image_bytes([blob, blob[: len(blob) // 3], encode(photo[:100, :100], "JPEG")],
                                        size=64, channels=3)
    assert failed == [1] and images.shape == (2, 3, 64, 64)  # a truncated large JPEG is still skipped
    full = center_square_resize(decode_one(blob, 3), 64).numpy()  # no size: the whole image is decoded
    assert np.abs(images[0].astype(int) - full.astype(int)).mean() < 3
    assert _decode_jpeg_reduced(encode(photo, "PNG"), 3, 64) is None  # other formats: the full decoders


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"exif": b"Exif\x00\x00" + b"\x00" * 200},
                                     {"subsampling": 0}], ids=["baseline", "progressive", "exif", "444"])
def test_the_jpeg_header_scan_reads_the_size_pil_reads(options):
    """The decoder picks full or reduced-size decoding from the start-of-frame segment it finds
    itself (PIL's header parse cost more than a small JPEG's decode); it must agree with PIL, and
    say None rather than guess on a blob whose markers stop before the frame."""
    from ssl_platform.data.decode import jpeg_size

    rng = np.random.default_rng(0)
    for width, height in [(32, 32), (301, 97), (1, 1), (640, 480)]:
        blob = encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "JPEG", **options)
        with Image.open(io.BytesIO(blob)) as im:
            assert jpeg_size(blob) == im.size == (width, height)
        assert jpeg_size(blob[:20]) is None
    assert jpeg_size(encode(np.zeros((50, 70), np.uint8), "JPEG")) == (70, 50)  # grayscale

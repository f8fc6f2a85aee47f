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


def test_no_blobs_and_bad_arguments():
    images, failed = decode_image_bytes([], size=8, channels=1)
    assert images.shape == (0, 1, 8, 8) and failed == []
    with pytest.raises(ValueError, match="channels"):
        decode_image_bytes([], size=8, channels=4)
    with pytest.raises(ValueError, match="size"):
        decode_image_bytes([], size=0, channels=3)

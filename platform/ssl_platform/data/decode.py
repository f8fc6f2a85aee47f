"""Encoded image bytes -> fixed-size uint8 arrays, fast, never raising for a bad record.

Decoding is the expensive half of an image pipeline at 224 px, so the common formats (JPEG,
PNG, WebP, GIF) go through torchvision's libjpeg-turbo/libpng decoders straight into a uint8
tensor, and only the rest (BMP, TIFF, ...) through PIL. A JPEG at least twice the output side
is decoded at reduced size instead (libjpeg's DCT scaling, through PIL's draft mode: 1/2, 1/4 or
1/8 of the pixels, never below the output side), which skips most of the decode's work on
photos larger than the crop. Each image is centre-cropped to a square first and then resized
once with an antialiased uint8 kernel: the same pixels as a short-side resize followed by a
centre crop, for a fraction of the work.

A blob that neither decoder can read (empty, truncated, corrupt, not an image) is not an
error here: its index is returned so the caller can skip and count it (see ``skips.py``).

    images, bad = decode_image_bytes([jpeg_bytes, b"", png_bytes], size=32, channels=3)
    images.shape, bad  # (2, 3, 32, 32), [1]
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

# Leading bytes of the formats torchvision decodes natively; everything else goes to PIL.
_TORCHVISION_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")
_MODES = {1: (ImageReadMode.GRAY, "L"), 3: (ImageReadMode.RGB, "RGB")}


def _is_torchvision_format(blob: bytes) -> bool:
    return blob.startswith(_TORCHVISION_MAGIC) or (blob[:4] == b"RIFF" and blob[8:12] == b"WEBP")


def _decode_torchvision(blob: bytes, channels: int) -> torch.Tensor:
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)  # bytearray: frombuffer wants a writable buffer
    image = decode_image(data, mode=_MODES[channels][0])
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


def _decode_pil(blob: bytes, channels: int) -> torch.Tensor:
    with Image.open(io.BytesIO(blob)) as im:
        im = im.convert(_MODES[channels][1])  # convert() loads, so truncation raises here
        array = np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W)


def _as_bytes(blob) -> bytes:
    """Ray hands binary columns over as bytes, numpy bytes or uint8 arrays; None means missing."""
    if blob is None:
        return b""
    return blob if isinstance(blob, bytes) else bytes(blob)


# Start-of-frame markers (baseline, progressive, lossless, ...): C0-CF but DHT (C4), JPG (C8), DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(blob: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG from its start-of-frame segment, or None when the markers before
    it cannot be walked. Reads a few bytes per segment: PIL's ``Image.open`` parses every table on
    the way and cost more than decoding a 32 px JPEG with libjpeg-turbo."""
    i, end = 2, len(blob)
    while i + 9 <= end:
        if blob[i] != 0xFF:
            return None
        marker = blob[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
        elif marker in _SOF_MARKERS:
            return int.from_bytes(blob[i + 7:i + 9], "big"), int.from_bytes(blob[i + 5:i + 7], "big")
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(blob[i + 2:i + 4], "big")
    return None


def _decode_jpeg_reduced(blob: bytes, channels: int, size: int) -> torch.Tensor | None:
    """A JPEG whose short side is at least ``2 * size``, decoded by libjpeg at the smallest DCT
    scale (1/2, 1/4, 1/8) that keeps the short side >= ``size``; None for any other image (or
    one this path cannot read: the full decoders then try, and skip it if they fail too)."""
    try:
        with Image.open(io.BytesIO(blob)) as im:  # reads the header only
            if im.format != "JPEG" or min(im.size) < 2 * size:
                return None
            scale = min(im.size) // size  # >= 2; draft picks the largest reduction within it
            im.draft(_MODES[channels][1], (im.width // scale, im.height // scale))
            im = im.convert(_MODES[channels][1])
            array = np.asarray(im, dtype=np.uint8).reshape(im.height, im.width, channels)
    except Exception:  # PIL raises many types on a corrupt file
        return None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def decode_one(blob: bytes, channels: int, size: int | None = None) -> torch.Tensor | None:
    """uint8 (channels, H, W), or None when the blob is not a readable image. With ``size``, a
    large JPEG may come back reduced (short side still >= ``size``); without, at its own size."""
    if not blob:
        return None
    if size is not None and blob.startswith(b"\xff\xd8\xff") and min(jpeg_size(blob) or (2 * size,)) >= 2 * size:
        reduced = _decode_jpeg_reduced(blob, channels, size)
        if reduced is not None:
            return reduced
    if _is_torchvision_format(blob):
        try:
            return _to_channels(_decode_torchvision(blob, channels), channels)
        except (RuntimeError, ValueError):
            pass  # a variant libjpeg/libpng rejects may still be readable by PIL
    try:
        return _decode_pil(blob, channels)
    except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return None


def _to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Some decoders ignore the requested mode (torchvision's WebP stays RGB when asked for
    grayscale): convert (C, H, W) uint8 to ``channels`` here so a batch never mixes shapes."""
    if image.shape[0] == channels:
        return image
    rgb = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)  # drop alpha / widen gray
    if channels == 3:
        return rgb.contiguous()
    luma = 0.299 * rgb[0].float() + 0.587 * rgb[1].float() + 0.114 * rgb[2].float()  # ITU-R 601, as PIL's "L"
    return luma.round().clamp(0, 255).to(torch.uint8)[None]


def center_square_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, size, size): centre square crop, then one antialiased resize."""
    _, h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[:, top:top + side, left:left + side]
    if side == size:
        return square
    return TF.resize(square, [size, size], antialias=True)


def decode_image_bytes(blobs: Sequence[bytes], size: int, channels: int) -> tuple[np.ndarray, list[int]]:
    """Decode a batch of encoded images to uint8 ``(N_good, channels, size, size)``.

    Args:
        blobs: encoded images (JPEG, PNG, WebP, GIF natively; any format PIL reads otherwise).
        size: output side in pixels (short-side resize + centre crop).
        channels: 1 (grayscale) or 3 (RGB); images are converted whatever they were stored as.

    Returns:
        ``(images, failed)``: the decoded images in input order, and the indices of the blobs
        that could not be decoded (they have no row in ``images``).
    """
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if size < 1:
        raise ValueError(f"image size must be a positive number of pixels, got {size}")
    blobs = [_as_bytes(blob) for blob in blobs]
    decoded: list[torch.Tensor | None] = [None] * len(blobs)
    with warnings.catch_warnings():
        # torchvision 0.29 warns on every decode call that decoding moves to TorchCodec.
        warnings.simplefilter("ignore", DeprecationWarning)
        small = [i for i, blob in enumerate(blobs) if _full_size_jpeg(blob, size)]
        for i, image in zip(small, _decode_jpegs(blobs, small, channels), strict=True):
            decoded[i] = _fit(image, size)
        tried = set(small)  # a bad one there was already tried by every decoder
        for i, blob in enumerate(blobs):
            if i not in tried:  # resized as it comes: a batch of photos never waits whole at full size
                decoded[i] = _fit(decode_one(blob, channels, size), size)
    failed = [i for i, image in enumerate(decoded) if image is None]
    if len(failed) == len(blobs):
        return np.empty((0, channels, size, size), np.uint8), failed
    return torch.stack([image for image in decoded if image is not None]).numpy(), failed


def _fit(image: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """A decoded image as a (C, size, size) row of the batch (:func:`center_square_resize`), None if
    there is none or it has no pixels."""
    if image is None or image.shape[1] == 0 or image.shape[2] == 0:
        return None
    return image if image.shape[1] == image.shape[2] == size else center_square_resize(image, size)


def _full_size_jpeg(blob: bytes, size: int) -> bool:
    """A JPEG that :func:`decode_one` would decode at full size (its short side under ``2 * size``)."""
    if not blob.startswith(b"\xff\xd8\xff"):
        return False
    side = jpeg_size(blob)
    return side is not None and min(side) < 2 * size


def _decode_jpegs(blobs: list[bytes], indices: list[int], channels: int) -> list[torch.Tensor | None]:
    """The JPEGs ``blobs[i]`` for ``i`` in ``indices``, decoded by libjpeg-turbo in one call: at
    32 px the per-image Python of the generic path was a third of the decode. If the call fails
    (one corrupt blob fails it), each is decoded on its own, and the bad ones come back None."""
    if not indices:
        return []
    data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in indices]
    try:
        images = decode_jpeg(data, mode=_MODES[channels][0])
    except (RuntimeError, ValueError):
        return [decode_one(blobs[i], channels) for i in indices]
    return [_to_channels(image, channels) for image in images]

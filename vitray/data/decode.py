"""Decoding one image's bytes: PNG's fast path, PIL for the rest, and a kind for each failure."""
from __future__ import annotations

import io
import re
import warnings
from typing import Any

import numpy as np


# Images above this many pixels are refused as decompression bombs (PIL's own
# default warns at 89M and errors at twice that; a warning would let one through).
MAX_IMAGE_PIXELS = 64_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(Exception):
    """An image that cannot be used: `kind` is short (empty, corrupt, too-large, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------- detection


def decode_image(data: bytes) -> np.ndarray:
    """Bytes of any common image file → uint8 HxWx1 (grey) or HxWx3 (RGB).

    Odd but valid files are converted (CMYK, 16-bit, palette, alpha; the first
    frame of an animation). Unusable ones raise ImageError with a short kind.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty", "the file is empty")
    pixels = _decode_plain_png(data)
    if pixels is not None:
        return pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                # The header alone tells the size: refuse before decoding any pixels.
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageError("too-large", f"{img.width}x{img.height} pixels is over the limit of "
                                                  f"{MAX_IMAGE_PIXELS:,} (a decompression bomb?)")
                img.seek(0)
                img.load()
                return _to_array(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses the largest images while opening them, in its own words and with its own limit.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "the image"
        raise ImageError("too-large", f"{size} is over the limit of {MAX_IMAGE_PIXELS:,} "
                                      "(a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise ImageError("not-an-image", "not a readable image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError("corrupt", str(exc).splitlines()[0][:200] or type(exc).__name__) from None


def _decode_plain_png(data: bytes) -> np.ndarray | None:
    """An 8-bit grey or RGB PNG, not interlaced, through libspng (half PIL's time); else None.

    The common inspection file, so decoding it is much of what a scoring run costs. The
    pixels are PIL's (neither applies gamma or transparency). Every chunk's CRC is checked
    first: libspng, as pyspng drives it, decodes damaged data without complaint where PIL
    reports it; whatever is not plain (or fails here) goes to PIL, which says what is wrong.
    """
    if len(data) < 45 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour, interlace = data[24], data[25], data[28]
    if depth != 8 or colour not in (0, 2) or interlace != 0 or width * height > MAX_IMAGE_PIXELS:
        return None
    if not _png_chunks_intact(data):
        return None
    import pyspng

    try:
        pixels = pyspng.load(data)
    except RuntimeError:
        return None
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _png_chunks_intact(data: bytes) -> bool:
    """Every chunk up to IEND is whole and its CRC matches."""
    import zlib

    view = memoryview(data)
    pos, end = len(PNG_SIGNATURE), len(data)
    while pos + 12 <= end:
        body_end = pos + 8 + int.from_bytes(data[pos:pos + 4], "big")
        if body_end + 4 > end or zlib.crc32(view[pos + 4:body_end]) != int.from_bytes(data[body_end:body_end + 4], "big"):
            return False
        if data[pos + 4:pos + 8] == b"IEND":
            return True
        pos = body_end + 4
    return False


def _to_array(img: Any) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth: scale the actual range to 8 bit rather than clip.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return arr.round().astype(np.uint8)[:, :, None]
    if mode in ("L", "1"):
        return np.asarray(img.convert("L"), dtype=np.uint8)[:, :, None]
    if mode == "LA" or (mode == "P" and "transparency" in img.info) or mode in ("RGBA", "PA"):
        img = img.convert("RGBA")
        background = _white(img.size)
        background.paste(img, mask=img.getchannel("A"))
        img = background
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _white(size: tuple[int, int]) -> Any:
    from PIL import Image

    return Image.new("RGB", size, (255, 255, 255))


# --------------------------------------------------------------------------- Ray Datasets

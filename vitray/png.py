"""PNG encoding of grey and RGB arrays, fast enough for an overlay per scored image.

PIL's encoder tries five row filters per row and deflates with zlib: ~0.45 ms for a
64 px overlay at level 1, more than the tiny model's forward pass. Here every row gets
the Sub filter (one vectorised difference) and ISA-L deflates it (`isal`, ~4x zlib's
speed at level 1): ~0.07 ms for about the same size (9.0 kB against PIL's 8.7 kB).
"""
from __future__ import annotations

import struct
import zlib

import numpy as np
from isal import isal_zlib

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SUB = 1  # PNG row filter type: each byte minus the byte one pixel to its left
_LEVEL = 1  # ISA-L's levels 1-3 differ by <1% in size here; 1 is the fastest


def encode(image: np.ndarray) -> bytes:
    """A (H, W) or (H, W, 1) grey or (H, W, 3) RGB uint8 array → the bytes of an 8-bit PNG that decodes to it exactly."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3) or 0 in image.shape:
        raise ValueError(f"png.encode needs a non-empty (H, W), (H, W, 1) or (H, W, 3) uint8 array, "
                         f"got {image.dtype} {image.shape}")
    h, w, bpp = image.shape
    flat = image.reshape(h, w * bpp)
    rows = np.empty((h, 1 + w * bpp), dtype=np.uint8)
    rows[:, 0] = _SUB
    rows[:, 1:1 + bpp] = flat[:, :bpp]
    # uint8 arithmetic wraps modulo 256, which is what the Sub filter is defined as.
    np.subtract(flat[:, bpp:], flat[:, :-bpp], out=rows[:, 1 + bpp:])
    colour = 2 if bpp == 3 else 0
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)  # 8 bits, deflate, adaptive, no interlace
    return b"".join((_SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"IDAT", isal_zlib.compress(rows.tobytes(), _LEVEL)), _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

"""PNG encoding of RGB arrays, fast enough for an overlay per scored image.

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


def encode_rgb(rgb: np.ndarray) -> bytes:
    """A (H, W, 3) uint8 array → the bytes of an 8-bit RGB PNG that decodes to it exactly."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"encode_rgb needs a non-empty (H, W, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    flat = rgb.reshape(h, w * 3)
    rows = np.empty((h, 1 + w * 3), dtype=np.uint8)
    rows[:, 0] = _SUB
    rows[:, 1:4] = flat[:, :3]
    # uint8 arithmetic wraps modulo 256, which is what the Sub filter is defined as.
    np.subtract(flat[:, 3:], flat[:, :-3], out=rows[:, 4:])
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, adaptive, no interlace
    return b"".join((_SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"IDAT", isal_zlib.compress(rows.tobytes(), _LEVEL)), _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

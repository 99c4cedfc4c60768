"""Decode any image PIL reads and re-encode it as an 8-bit RGB JPEG, converting every mode faithfully.

PIL's own `convert("RGB")` clips 16-bit and 32-bit grayscale at 255 (a 16-bit PNG becomes almost white) and drops
alpha (exposing whatever colour transparent pixels hold, often black). Here:

- RGB: kept (an RGB JPEG is kept byte for byte after a full decode).
- L, 1, CMYK, YCbCr, ...: PIL's `convert("RGB")` (1-bit: 0 / 255).
- I;16, I;16B, I;16L, I;16N (unsigned 16-bit): scaled by the type's range, round(v / 257), so 65535 -> 255.
- I (32-bit int): treated as 16-bit (v / 257) when every value is in [0, 65535], since PIL decodes 16-bit PGM /
  TIFF / older PNG files to "I"; otherwise stretched from its min..max (true 32-bit data has no fixed range).
- F (32-bit float): values in [0, 1] times 255; otherwise stretched from min..max; NaN counts as the minimum.
- RGBA, LA, PA, RGBa, La, and P with a transparent colour: composited onto white, as viewers show them.
- P, PA (palette): palette colours looked up (then alpha composited as above).

Scaling by the type's range (not each image's min..max) keeps absolute brightness: a dark 16-bit photo stays dark.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
BACKGROUND = (255, 255, 255)
"""What transparent pixels are composited onto."""


def gray_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """8-bit version of a 16-bit ("I;16*"), 32-bit int ("I") or float ("F") grayscale array (see the module table)."""
    a = np.asarray(values, dtype=np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    if mode in SIXTEEN_BIT_MODES or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = a / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = a * 255.0
    else:
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB image of `img` in any mode (see the module table)."""
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return Image.fromarray(gray_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    if img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # palette transparency and premultiplied modes become straight alpha
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_rgb_jpeg(payload: bytes | np.ndarray, quality: int) -> bytes | None:
    """RGB JPEG bytes of an encoded image or a uint8 pixel array; None if unreadable.

    RGB JPEGs are kept byte for byte (after a full decode to prove they are readable); anything else is converted by
    `to_rgb` and encoded at `quality`.
    """
    try:
        if isinstance(payload, np.ndarray):
            img = Image.fromarray(payload)
        else:
            img = Image.open(io.BytesIO(payload))
            img.load()
            if img.format == "JPEG" and img.mode == "RGB":
                return payload
        out = io.BytesIO()
        to_rgb(img).save(out, format="JPEG", quality=quality)
        return out.getvalue()
    except Exception:  # noqa: BLE001 -- PIL raises many types for bad data; an unreadable image is counted, not fatal
        return None


__all__ = ["gray_to_uint8", "to_rgb", "to_rgb_jpeg"]

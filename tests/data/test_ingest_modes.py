"""Ingest converts every PIL mode to an RGB JPEG whose mean intensity matches the source's (images.py).

Each source is a 64x64 gradient saved in a format that keeps its mode; the expected 8-bit intensity is computed
here from the source values (16-bit: v / 65535 * 255; float in [0, 1]: v * 255; alpha: composited onto white).
"""

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arm_platform.config import DataConfig
from arm_platform.data import images, ingest

SIDE = 64
RAMP = np.linspace(0.0, 1.0, SIDE * SIDE).reshape(SIDE, SIDE)
"""0..1 gradient every source is built from (mean 0.5)."""
TOLERANCE = 2.0
"""JPEG q95 of a smooth gradient: the mean moves by well under 2 levels."""


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _jpeg_mean(payload: bytes) -> float:
    out = ingest.to_rgb_jpeg(payload, 95)
    assert out is not None
    img = Image.open(io.BytesIO(out))
    assert img.format == "JPEG" and img.mode == "RGB"
    return float(np.asarray(img, dtype=np.float64).mean())


def _sixteen_bit(mode: str) -> tuple[bytes, float]:
    values = np.rint(RAMP * 65535).astype(np.uint16)
    img = Image.frombytes(mode, (SIDE, SIDE), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    return _encode(img, "PNG" if mode == "I;16" else "TIFF"), float((values / 65535 * 255).mean())


def _int32() -> tuple[bytes, float]:
    values = np.rint(RAMP * 65535).astype(np.int32)  # what PIL decodes 16-bit PGM / TIFF data to
    return _encode(Image.fromarray(values, mode="I"), "TIFF"), float((values / 65535 * 255).mean())


def _float() -> tuple[bytes, float]:
    values = RAMP.astype(np.float32)
    return _encode(Image.fromarray(values, mode="F"), "TIFF"), float((values * 255).mean())


def _alpha(mode: str) -> tuple[bytes, float]:
    """Black pixels with an alpha ramp: on white they go from white (transparent) to black (opaque)."""
    alpha = np.rint(RAMP * 255).astype(np.uint8)
    channels = 3 if mode == "RGBA" else 1
    pixels = np.dstack([np.zeros((SIDE, SIDE, channels), np.uint8), alpha])
    img = Image.fromarray(pixels, mode="RGBA" if mode == "RGBA" else "LA")
    return _encode(img, "PNG"), float((255 * (1 - alpha / 255)).mean())


def _palette_alpha() -> tuple[bytes, float]:
    """Palette black with an alpha ramp (PA, as TIFF: PNG cannot hold PA): shown on white like LA."""
    alpha = np.rint(RAMP * 255).astype(np.uint8)
    img = Image.fromarray(np.zeros_like(alpha), mode="P")
    img.putpalette([0, 0, 0] * 256)
    img.putalpha(Image.fromarray(alpha))
    return _encode(img, "TIFF"), float((255 * (1 - alpha / 255)).mean())


def _palette_transparent() -> tuple[bytes, float]:
    """Palette image whose index 0 (black) is transparent: half the pixels, shown white; the rest palette grey 200."""
    index = (np.arange(SIDE * SIDE).reshape(SIDE, SIDE) % 2).astype(np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette([0, 0, 0, 200, 200, 200] + [0, 0, 0] * 254)
    return _encode(img, "PNG", transparency=0), (255 + 200) / 2


def _palette() -> tuple[bytes, float]:
    gray = np.rint(RAMP * 255).astype(np.uint8)
    img = Image.fromarray(np.dstack([gray, 255 - gray, gray // 2]), mode="RGB").convert("P")
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64)  # after quantisation to the palette
    return _encode(img, "PNG"), float(rgb.mean())


def _cmyk() -> tuple[bytes, float]:
    rgb = np.dstack([np.rint(RAMP * 255), np.rint((1 - RAMP) * 255), np.full((SIDE, SIDE), 90)]).astype(np.uint8)
    return _encode(Image.fromarray(rgb, mode="RGB").convert("CMYK"), "TIFF"), float(rgb.mean())


def _one_bit() -> tuple[bytes, float]:
    bits = RAMP > 0.25
    return _encode(Image.fromarray(bits), "PNG"), float(bits.mean() * 255)


def _gray() -> tuple[bytes, float]:
    gray = np.rint(RAMP * 255).astype(np.uint8)
    return _encode(Image.fromarray(gray, mode="L"), "PNG"), float(gray.mean())


SOURCES = {
    "I;16": lambda: _sixteen_bit("I;16"),
    "I;16B": lambda: _sixteen_bit("I;16B"),
    "I": _int32,
    "F": _float,
    "RGBA": lambda: _alpha("RGBA"),
    "LA": lambda: _alpha("LA"),
    "PA": _palette_alpha,
    "P": _palette,
    "P+transparency": _palette_transparent,
    "CMYK": _cmyk,
    "1": _one_bit,
    "L": _gray,
}


@pytest.mark.parametrize("mode", sorted(SOURCES))
def test_every_mode_keeps_its_mean_intensity(mode):
    payload, expected = SOURCES[mode]()
    assert Image.open(io.BytesIO(payload)).mode == mode.split("+")[0]  # the source really has that mode
    assert _jpeg_mean(payload) == pytest.approx(expected, abs=TOLERANCE)


def test_out_of_range_int_and_float_are_stretched_from_min_to_max():
    """True 32-bit ints and floats outside [0, 1] have no fixed range: min -> 0, max -> 255; NaN counts as min."""
    values = np.array([[-1e6, 0.0], [np.nan, 3e6]])
    assert images.gray_to_uint8(values.astype(np.float32), "F").tolist() == [[0, 64], [0, 255]]
    assert images.gray_to_uint8(np.array([[70000, 170000]]), "I").tolist() == [[0, 255]]
    assert images.gray_to_uint8(np.full((2, 2), 7.0), "F").tolist() == [[0, 0], [0, 0]]


def test_sixteen_bit_png_is_ingested_with_its_real_brightness(tmp_path):
    """End to end: a dark 16-bit PNG (values ~ 1/4 of the range) stays dark in the shard, not clipped to white."""
    for split in ("train", "val"):
        os.makedirs(tmp_path / "src" / split / "gray")
        values = np.full((SIDE, SIDE), 16384, dtype=np.uint16)
        Image.fromarray(values).save(tmp_path / "src" / split / "gray" / "dark.png")
    manifest = ingest.ingest_folder(str(tmp_path / "src"), str(tmp_path / "out"), DataConfig(num_parallel=1))
    row = pq.read_table(tmp_path / "out" / manifest.shards["val"][0].path).to_pylist()[0]
    assert np.asarray(Image.open(io.BytesIO(row["image"]))).mean() == pytest.approx(16384 / 257, abs=TOLERANCE)

"""Data test fixtures: a generated ImageFolder tree (with planted unreadable files) and one module-scoped local Ray
cluster, started after the S3 env of `s3_bucket` (a moto server, tests/conftest.py) so Ray workers inherit it."""

import io
import os

import numpy as np
import pytest
from PIL import Image

CLASS_COLORS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 40)}
"""Each generated class has a dominant colour, so a test can tell the label from the pixels after augmentation."""
TRAIN_PER_CLASS = 80
VAL_PER_CLASS = 20
UNREADABLE = ("train/red/broken.jpg", "train/green/truncated.jpg")
"""Planted unreadable files: garbage bytes and a JPEG cut in half."""


def _image_bytes(color: tuple[int, int, int], rng: np.random.Generator, fmt: str, mode: str = "RGB") -> bytes:
    h, w = (int(v) for v in rng.integers(40, 97, size=2))
    pixels = np.clip(np.array(color) + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def make_image_folder(root: str, seed: int = 0) -> dict[str, int]:
    """Write <root>/{train,val}/<class>/*.{jpg,png}; returns the readable image count per split.

    Mostly RGB JPEGs, plus PNGs and CMYK JPEGs (re-encoded by ingest) and the UNREADABLE files.
    """
    rng = np.random.default_rng(seed)
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for cls, color in CLASS_COLORS.items():
            folder = os.path.join(root, split, cls)
            os.makedirs(folder)
            for i in range(n):
                fmt, mode, ext = {3: ("PNG", "RGB", "png"), 7: ("JPEG", "CMYK", "jpg")}.get(
                    i % 10, ("JPEG", "RGB", "jpg")
                )
                with open(os.path.join(folder, f"{cls}_{i:03d}.{ext}"), "wb") as f:
                    f.write(_image_bytes(color, rng, fmt, mode))
    with open(os.path.join(root, UNREADABLE[0]), "wb") as f:
        f.write(b"this is not an image" * 10)
    with open(os.path.join(root, UNREADABLE[1]), "wb") as f:
        f.write(_image_bytes(CLASS_COLORS["green"], rng, "JPEG")[:300])
    with open(os.path.join(root, "train", "red", "notes.txt"), "w") as f:
        f.write("not an image extension: ignored, not counted")
    return {"train": TRAIN_PER_CLASS * len(CLASS_COLORS), "val": VAL_PER_CLASS * len(CLASS_COLORS)}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> tuple[str, dict[str, int]]:
    """(path of a generated ImageFolder tree, readable images per split)."""
    root = str(tmp_path_factory.mktemp("imagefolder"))
    return root, make_image_folder(root)


@pytest.fixture(scope="module")
def folder_spec() -> dict:
    """What `image_folder` contains: class names (sorted), their colours, the planted unreadable keys."""
    return {"classes": sorted(CLASS_COLORS), "colors": CLASS_COLORS, "unreadable": UNREADABLE}


@pytest.fixture(scope="module")
def ray_cluster(s3_bucket):
    """Local Ray on 2 CPUs, sharing this module; started after the S3 env so its workers can reach moto."""
    import ray

    from arm_platform.config import DataConfig
    from arm_platform.data.datasets import ray_system_config

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    system_config = ray_system_config(DataConfig(decode_cpus=0.25), num_cpus=2)
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _system_config=system_config
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()

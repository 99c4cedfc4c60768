"""Tiny model configs for the model tests (CPU, a few hundred tokens at most), run single-threaded."""

import pytest
import torch

from arm_platform.config import ModelConfig

TINY = dict(
    name="arm_test",
    embed_dim=16,
    depth=2,
    img_size=32,
    patch_size=8,
    cluster_size=2,
    decoder_dim=16,
    decoder_depth=2,
    decoder_head_dim=8,
    num_classes=5,
)


def tiny_config(**overrides) -> ModelConfig:
    """ModelConfig of a tiny model; 32 px / patch 8 / cluster 2 (4x4 grid, 4 clusters of 4 patches) by default."""
    return ModelConfig(**{**TINY, **overrides})


@pytest.fixture
def make_cfg():
    return tiny_config


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: intra-op threads only add sync cost (60x slower on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

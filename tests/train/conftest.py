"""Small models and synthetic batches for the Ray-free training tests."""

import dataclasses

import pytest
import torch

from arm_platform import recipes
from arm_platform.models import build_model


def small_cfg(task: str):
    """The tiny recipe shrunk further (embed_dim 32, depth 2) for fast CPU tests."""
    cfg = recipes.get(f"{task}_tiny")
    model = dataclasses.replace(cfg.model, embed_dim=32, depth=2, decoder_dim=32, decoder_head_dim=16)
    return dataclasses.replace(cfg, model=model)


@pytest.fixture
def pretrain_model():
    return build_model(small_cfg("pretrain").model, "pretrain")


@pytest.fixture
def finetune_model():
    return build_model(small_cfg("finetune").model, "finetune")


def _synthetic_batches(n: int, batch_size: int = 8, num_classes: int = 10, seed: int = 0) -> list[dict]:
    """Class-dependent coloured 32x32 images: (B, 3, 32, 32) floats and (B,) labels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
        base = (labels.float() / num_classes - 0.5)[:, None, None, None] * 2
        images = base + 0.3 * torch.randn(batch_size, 3, 32, 32, generator=gen)
        out.append({"image": images, "label": labels})
    return out


@pytest.fixture(name="small_cfg")
def small_cfg_fixture():
    """small_cfg(task) -> TrainConfig."""
    return small_cfg


@pytest.fixture
def synthetic_batches():
    """synthetic_batches(n, batch_size=8) -> list of {"image", "label"} batches."""
    return _synthetic_batches

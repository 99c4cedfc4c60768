"""Pure per-batch image transforms: JPEG bytes -> augmented uint8 (B, 3, H, W) arrays, plus device-side normalise.

Three pipelines, following the official ARM code (see shared/reference/arm_spec.md):
- pretrain: RandomResizedCrop(input_size, scale=(min_crop_scale, 1), ratio (3/4, 4/3), bicubic) + horizontal flip
  (torchvision's box sampler, re-implemented on a numpy Generator so a batch is reproducible from a seed). Decode
  (libjpeg-turbo, byte-identical to PIL) and the antialiased bicubic resize run on uint8 tensors: torch's SIMD kernels
  use PIL's filter (outputs within +-2 of PIL) at 2-3x PIL's speed;
- finetune: timm ``create_transform(is_training=True, auto_augment=..., interpolation="bicubic")`` in prefetcher mode
  (PIL ops -> uint8 CHW); its random erasing needs normalised pixels, so it runs on the device (`random_erasing`);
- eval: Resize((r, r)) (both sides, as the official finetune code) -> CenterCrop(input_size), on uint8 tensors as
  pretrain; r = `DataConfig.effective_eval_resize` (input / 0.875 by default: 224 -> 256, 192 -> 219, 32 -> 37).
Normalisation with the ImageNet mean / std happens on the training device (`normalize`), so CPU workers ship uint8.
"""

from __future__ import annotations

import contextlib
import io
import math
import secrets
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from arm_platform.config import DataConfig

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_RATIO = (3 / 4, 4 / 3)
"""torchvision / timm RandomResizedCrop aspect-ratio range (the official code keeps the default)."""
_RRC_ATTEMPTS = 10
"""torchvision's tries at a random crop before falling back to a center crop."""

Mode = Literal["pretrain", "finetune", "eval"]
ImageFn = Callable[[Any, np.random.Generator], np.ndarray]
"""(decoded image, generator) -> uint8 (3, S, S); the image is a uint8 (3, H, W) tensor, or a PIL image for timm."""

_INTERP = ("bicubic", "bilinear", "nearest")


def threads_for(cpus: float) -> int:
    """Intra-op threads for a Ray task / actor holding `cpus` CPUs: max(1, floor(cpus)), never $OMP_NUM_THREADS.

    Ray starts workers with the driver's environment, so an exported OMP_NUM_THREADS=2 gave each of eight 0.25-CPU
    decode tasks two threads on 2 cores (measured 0.53x the throughput of one thread each).
    """
    return max(1, math.floor(cpus))


def set_torch_threads(cpus: float) -> int:
    """torch.set_num_threads(threads_for(cpus)) (a no-op when already set); returns the thread count."""
    import torch

    threads = threads_for(cpus)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def threads_of(cpus: float, workers: int) -> Iterator[int]:
    """torch runs on the threads of `workers` workers of `cpus` CPUs each inside the block (one rank working alone while
    the other ranks of its node wait for it), then on the count it had before. Yields the thread count."""
    import torch

    before = torch.get_num_threads()
    threads = workers * threads_for(cpus)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def decode(data: bytes) -> Image.Image | None:
    """RGB PIL image from encoded bytes, or None when they cannot be decoded (corrupt record)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception:  # noqa: BLE001 -- PIL raises many types for bad data; a corrupt record is data, not a bug
        return None


def decode_tensor(data: bytes) -> torch.Tensor | None:
    """uint8 (3, H, W) RGB tensor (libjpeg-turbo via torchvision; PIL for non-JPEG bytes), None if corrupt."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        img = decode(data)
        return None if img is None else torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())


def _interp(name: str) -> InterpolationMode:
    from torchvision.transforms import InterpolationMode

    if name not in _INTERP:
        raise ValueError(f"unknown interpolation {name!r}; valid: {', '.join(_INTERP)}")
    return InterpolationMode(name)


def rrc_params(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator) -> tuple[int, ...]:
    """(top, left, h, w) of a RandomResizedCrop box: torchvision's algorithm with ratio (3/4, 4/3)."""
    area = width * height
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(_RRC_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback to a center crop with the ratio clamped into range (torchvision).
    in_ratio = width / height
    if in_ratio < RRC_RATIO[0]:
        w, h = width, int(round(width / RRC_RATIO[0]))
    elif in_ratio > RRC_RATIO[1]:
        h, w = height, int(round(height * RRC_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pretrain_image_fn(input_size: int, min_crop_scale: float, hflip: float, interpolation: str) -> ImageFn:
    """uint8 (3, H, W) tensor -> uint8 (3, input_size, input_size) array: random resized crop + horizontal flip.

    Resizing runs on uint8 tensors with antialiasing (torch's SIMD kernels, PIL's filter; within +-2 of PIL).
    """
    from torchvision.transforms.v2 import functional as F

    mode = _interp(interpolation)

    def apply(img: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        top, left, h, w = rrc_params(img.shape[-1], img.shape[-2], (min_crop_scale, 1.0), rng)
        out = F.resized_crop(img, top, left, h, w, [input_size, input_size], mode, antialias=True)
        if rng.random() < hflip:
            out = out.flip(-1)
        return out.numpy()

    return apply


def eval_image_fn(input_size: int, eval_resize: int, interpolation: str) -> ImageFn:
    """uint8 (3, H, W) tensor -> uint8 (3, input_size, input_size): Resize((r, r)) then center crop (torchvision)."""
    from torchvision.transforms.v2 import functional as F

    mode = _interp(interpolation)

    def apply(img: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        out = F.resize(img, [eval_resize, eval_resize], mode, antialias=True)
        return F.center_crop(out, [input_size, input_size]).numpy()

    return apply


def finetune_image_fn(cfg: DataConfig) -> ImageFn:
    """PIL image -> uint8 (3, input_size, input_size) via timm's training transform (RandAugment etc.).

    timm draws from Python's `random`, numpy's global state and torch, so `rng` seeds those three for the call.
    """
    import random

    import torch
    from timm.data import create_transform

    tf = create_transform(
        cfg.input_size,
        is_training=True,
        scale=(cfg.min_crop_scale, 1.0),
        hflip=cfg.hflip,
        color_jitter=None,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        use_prefetcher=True,
    )

    def apply(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        seed = int(rng.integers(0, 2**31 - 1))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return np.ascontiguousarray(tf(img), dtype=np.uint8)

    return apply


def image_fn(cfg: DataConfig, mode: Mode) -> ImageFn:
    """The per-image transform of a data config for "pretrain" / "finetune" (training) or "eval"."""
    if mode == "pretrain":
        return pretrain_image_fn(cfg.input_size, cfg.min_crop_scale, cfg.hflip, cfg.interpolation)
    if mode == "finetune":
        return finetune_image_fn(cfg)
    if mode == "eval":
        return eval_image_fn(cfg.input_size, cfg.effective_eval_resize, cfg.interpolation)
    raise ValueError(f"unknown transform mode {mode!r}; valid: pretrain, finetune, eval")


class BatchTransform:
    """Ray Data `map_batches` function: {"image": bytes (B,), "label": (B,)} -> {"image": uint8 (B, 3, S, S),
    "label": int64 (B,)}.

    Records that fail to decode come out as a zero image with label -1 (dropped and counted by the consumer).
    Without a seed every call draws fresh entropy, so parallel workers never repeat each other's augmentations.
    Each call sizes torch's threads from `decode_cpus` (the task's Ray CPUs), see `threads_for`.
    """

    def __init__(self, cfg: DataConfig, mode: Mode, seed: int | None = None) -> None:
        self.fn = image_fn(cfg, mode)
        self.decode = decode if mode == "finetune" else decode_tensor  # timm's RandAugment works on PIL images
        self.size = cfg.input_size
        self.seed = seed
        self.cpus = cfg.decode_cpus

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        set_torch_threads(self.cpus)  # the task's Ray CPUs, not the inherited OMP_NUM_THREADS
        rng = np.random.default_rng(self.seed if self.seed is not None else secrets.randbits(64))
        n = len(batch["image"])
        images = np.zeros((n, 3, self.size, self.size), dtype=np.uint8)
        labels = np.asarray(batch["label"], dtype=np.int64).copy()
        for i, data in enumerate(batch["image"]):
            img = self.decode(data)
            if img is None:
                labels[i] = -1
                continue
            images[i] = self.fn(img, rng)
        return {"image": images, "label": labels}


def normalize(images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, H, W) on `device`, normalised with the ImageNet mean / std."""
    import torch

    x = images.to(device, non_blocking=True) if device is not None else images
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return x.float().sub_(mean).div_(std)  # in place: one float allocation per batch


def random_erasing(reprob: float, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """timm RandomErasing (pixel mode, one box, as the official finetune code) on a normalised (B, 3, H, W) batch."""
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(reprob, mode="pixel", max_count=1, device=str(device))

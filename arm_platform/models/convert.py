"""Checkpoint loading and the pretrain -> finetune weight mapping (official ARM `main_finetune.py` semantics).

Official `checkpoint-*.pth` files are dicts with 'model' (and 'model_ema' for finetune runs) plus a pickled
`argparse.Namespace` under 'args'; they load with `weights_only=True` with only that class allow-listed.
Reference: OliverRensu/ARM Finetuning/main_finetune.py L235-272, Finetuning/util/pos_embed.py; arm_spec.md §4, §6.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
from collections.abc import Mapping
from typing import IO

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from arm_platform.models.mixer import DIRECTION_PARAMS, DIRECTION_SUFFIXES, direction_key

logger = logging.getLogger(__name__)

Source = str | os.PathLike | IO[bytes]

PRETRAIN_ONLY_PREFIXES = (
    "ar_token",
    "dec_pos_embed",
    "mask",
    "enc2dec.",
    "dec_block.",
    "norm_1.",
    "norm_2.",
    "norm_3.",
    "norm_4.",
    "ar_norm.",
    "ar_pred.",
)
"""Keys of the pretraining model that the classifier does not have (decoder, taps, frozen decoder table)."""

STRIP_PREFIXES = ("module.", "_orig_mod.")
"""Wrapper prefixes (DDP, torch.compile) removed from checkpoint keys."""

HEAD_INIT_STD = 2e-5


def _name(source: Source) -> str:
    return os.fspath(source) if isinstance(source, str | os.PathLike) else getattr(source, "name", repr(source))


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `module.` / `_orig_mod.` prefixes from every key."""
    out = {}
    for key, value in state_dict.items():
        for prefix in STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def load_checkpoint_state(source: Source, *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Model state_dict from an official ARM checkpoint (or a plain state_dict file), loaded safely.

    Args:
        source: path or binary file object.
        use_ema: pick 'model_ema' instead of 'model'.

    Raises:
        ValueError: the file holds pickled globals other than `argparse.Namespace`, is not a torch file, or has no
            'model' / 'model_ema' entry of tensors.
    """
    name = _name(source)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"cannot load checkpoint {name} safely (weights_only=True, only argparse.Namespace is "
            f"allowed besides tensors and containers): {err}"
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {name} holds a {type(obj).__name__}, expected a dict")
    key = "model_ema" if use_ema else "model"
    if key in obj:
        state = obj[key]
    elif not use_ema and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj  # a plain model state_dict (e.g. our own model.pt)
    else:
        raise ValueError(f"checkpoint {name} has no {key!r} entry (keys: {sorted(map(str, obj))})")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {name}: {key!r} is not a state_dict of tensors")
    return strip_prefixes(state)


def resize_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Bicubic-resize a square position table to `grid_size` and put a cls position in the middle.

    Accepts a pretraining table without cls (1, G*G, d), which gets a ZERO cls vector, or a finetune table with the
    cls at index (G*G+1)//2, which keeps its cls vector. Interpolation runs in float32 (align_corners=False).

    Returns:
        (1, grid_size**2 + 1, d), cls at index grid_size**2 // 2.
    """
    n, dim = pos_embed.shape[-2:]
    src = math.isqrt(n)
    if src * src == n:
        patches, cls = pos_embed.reshape(1, n, dim), pos_embed.new_zeros(1, 1, dim)
    elif math.isqrt(n - 1) ** 2 == n - 1:
        src, mid = math.isqrt(n - 1), n // 2
        pos_embed = pos_embed.reshape(1, n, dim)
        patches = torch.cat([pos_embed[:, :mid], pos_embed[:, mid + 1 :]], dim=1)
        cls = pos_embed[:, mid : mid + 1]
    else:
        raise ValueError(f"pos_embed with {n} tokens is neither a square grid nor a square grid + 1 cls token")
    if src != grid_size:
        grid = patches.reshape(1, src, src, dim).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
        patches = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim).to(pos_embed.dtype)
    mid = grid_size * grid_size // 2
    return torch.cat([patches[:, :mid], cls.to(patches.dtype), patches[:, mid:]], dim=1)


def _is_pretrain_only(key: str) -> bool:
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in PRETRAIN_ONLY_PREFIXES)


def pretrain_to_finetune(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a pretraining state_dict onto a finetune classifier (`main_finetune.py` L235-262).

    Drops decoder / tap keys; copies each mixer's forward-direction conv1d / x_proj / dt_proj / A_log / D to the
    `_b`, `_c`, `_c_b` sets the model has and the source lacks; resizes `pos_embed` to the model's grid with a zero
    cls position at N // 2; drops a head whose shape differs from the model's. Already-finetune dicts pass through.
    """
    target = model.state_dict()
    out = {k: v for k, v in strip_prefixes(state_dict).items() if not _is_pretrain_only(k)}
    for key, value in list(out.items()):
        mixer_prefix, _, base = key.rpartition(".mixer.")
        if not mixer_prefix or base not in DIRECTION_PARAMS:
            continue
        for suffix in DIRECTION_SUFFIXES:
            new_key = f"{mixer_prefix}.mixer.{direction_key(base, suffix)}"
            if new_key in target and new_key not in out:
                out[new_key] = value.clone()
    if "pos_embed" in out and "pos_embed" in target:
        out["pos_embed"] = resize_pos_embed(out["pos_embed"], model.patch_embed.grid_size)
    for key in ("head.weight", "head.bias"):
        if key in out and (key not in target or out[key].shape != target[key].shape):
            logger.info("dropping %s %s from the checkpoint (model head differs)", key, tuple(out[key].shape))
            del out[key]
    return out


def load_pretrained(
    model: nn.Module, source: Source | Mapping[str, torch.Tensor], *, use_ema: bool = False
) -> tuple[list[str], list[str]]:
    """Load pretrained (or finetuned) ARM weights into a classifier, as the official finetune script does.

    Maps the weights with `pretrain_to_finetune`, loads with strict=False, then re-inits the head (trunc_normal
    std 2e-5, bias 0).

    Args:
        source: checkpoint path / file object (see `load_checkpoint_state`) or an already loaded state_dict.

    Returns:
        (missing keys, unexpected keys) of `load_state_dict(strict=False)`.

    Raises:
        ValueError: a checkpoint tensor's shape differs from the model's (other than the head).
    """
    state = strip_prefixes(source) if isinstance(source, Mapping) else load_checkpoint_state(source, use_ema=use_ema)
    state = pretrain_to_finetune(state, model)
    target = model.state_dict()
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    ]
    if bad:
        raise ValueError("checkpoint does not fit the model: " + "; ".join(bad[:5]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        trunc_normal_(head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(head.bias)
    logger.info(
        "loaded pretrained weights: %d missing %s, %d unexpected %s",
        len(missing),
        missing[:8],
        len(unexpected),
        unexpected[:8],
    )
    return list(missing), list(unexpected)

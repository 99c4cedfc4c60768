"""Vision Mamba backbone pieces shared by the ARM pretraining model and the finetune classifier.

Patch embedding, the fixed 2-D sin-cos table (MAE layout), the stack of Mamba blocks and the official init functions.
References: OliverRensu/ARM models_pretrain.py / Finetuning/models_mamba.py; MAE util/pos_embed.py;
mamba_ssm models/mixer_seq_simple.py `_init_weights`.
"""

from __future__ import annotations

import math

import torch
from timm.layers import lecun_normal_
from torch import nn

from arm_platform.config import ModelConfig
from arm_platform.models.blocks import Block
from arm_platform.models.mixer import Mamba


class PatchEmbed(nn.Module):
    """Non-overlapping patches: Conv2d(in_chans, embed_dim, patch, stride patch) -> raster-order tokens."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) with H == W == img_size -> (B, grid**2, embed_dim), row-major."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's img_size {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table in the MAE layout: [sin(j w), cos(j w), sin(i w), cos(i w)] for row i, column j.

    The first half encodes the column (MAE `meshgrid(grid_w, grid_h)`), tokens are row-major, w_k = 10000^(-k/Q)
    with Q = embed_dim / 4. Computed in float64, returned as float32.

    Returns:
        (grid_size**2, embed_dim).
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * omega  # (G*G, Q)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def build_layers(cfg: ModelConfig, bimamba_type: str, drop_path: list[float] | None = None) -> nn.ModuleList:
    """`cfg.depth` encoder blocks (LayerNorm, Mamba with `bimamba_type`, SwiGLU d*8//3) with per-block drop path."""
    drop_path = drop_path or [0.0] * cfg.depth
    return nn.ModuleList(
        Block(
            Mamba(
                cfg.embed_dim,
                d_state=cfg.d_state,
                d_conv=cfg.d_conv,
                expand=cfg.expand,
                dt_rank=cfg.dt_rank,
                bimamba_type=bimamba_type,
                layer_idx=i,
            ),
            cfg.embed_dim,
            cfg.swiglu_hidden,
            drop_path=drop_path[i],
        )
        for i in range(cfg.depth)
    )


def init_patch_embed(patch_embed: PatchEmbed) -> None:
    """Official `segm_init_weights` on the patch conv: lecun normal weight, zero bias."""
    lecun_normal_(patch_embed.proj.weight)
    nn.init.zeros_(patch_embed.proj.bias)


def init_mamba_weights(module: nn.Module, n_layer: int) -> None:
    """mamba_ssm `_init_weights` (apply to every module).

    Zeroes every Linear bias not marked `_no_reinit` (dt_proj.bias keeps its dt init) and re-draws the residual
    output projections (`out_proj.weight`, `fc2.weight` of direct children) with kaiming_uniform(a=sqrt 5),
    divided by sqrt(n_layer).
    """
    if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
        nn.init.zeros_(module.bias)
    for name, p in module.named_parameters():
        if name in ("out_proj.weight", "fc2.weight"):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            with torch.no_grad():
                p /= math.sqrt(n_layer)


def xavier_init(module: nn.Module) -> None:
    """Decoder init (`atten_init_weights`): xavier-uniform Linear weights, zero biases, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

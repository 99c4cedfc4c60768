"""ARM finetune classifier: Vision Mamba with a middle cls token, 4-direction (v3) Mamba blocks, norm_f, pool, head.

timm-compatible (`no_weight_decay`, `group_matcher`, `set_grad_checkpointing`, `reset_classifier`, `pretrained_cfg`).
Reference: OliverRensu/ARM Finetuning/models_mamba.py (`ARM`), see arm_spec.md §2.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from arm_platform.config import ModelConfig
from arm_platform.models.vision_mamba import PatchEmbed, build_layers, init_mamba_weights, init_patch_embed


def drop_path_schedule(drop_path_rate: float, depth: int) -> list[float]:
    """Official schedule shifted by one: block i uses ([0] + linspace(0, rate, depth))[i]."""
    return ([0.0] + torch.linspace(0, drop_path_rate, depth, device="cpu").tolist())[:depth]


def _pool_flag(global_pool: bool | str) -> bool:
    """timm pool names -> our flag: "avg"/True = mean of patch tokens, "token"/False = the middle cls token."""
    if isinstance(global_pool, bool):
        return global_pool
    if global_pool in ("avg", "token"):
        return global_pool == "avg"
    raise ValueError(f"global_pool must be a bool, 'avg' or 'token', got {global_pool!r}")


class ARMClassifier(nn.Module):
    """ARM finetune model. State-dict keys equal the official ones (cls_token, pos_embed, patch_embed, head, layers
    with `_b/_c/_c_b` direction sets, norm_f).

    Args:
        cfg: geometry and widths; uses num_classes, drop_path_rate, global_pool, grad_checkpointing.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = self.embed_dim = d
        self.num_prefix_tokens = 1
        self.global_pool = cfg.global_pool
        self.grad_checkpointing = cfg.grad_checkpointing
        self.pretrained_cfg: dict[str, Any] = {}
        self.default_cfg = self.pretrained_cfg  # timm's backwards-compatible alias

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        self.token_position = self.patch_embed.num_patches // 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, d))
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.layers = build_layers(cfg, "v3", drop_path_schedule(cfg.drop_path_rate, cfg.depth))
        self.norm_f = nn.LayerNorm(d)
        self.init_weights()

    def init_weights(self) -> None:
        """Official order (arm_spec.md §2.4): patch embed lecun, head / pos / cls trunc_normal .02, mamba init."""
        init_patch_embed(self.patch_embed)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(partial(init_mamba_weights, n_layer=self.cfg.depth))

    # ---------------------------------------------------------------------------------------------------------------
    # timm interface

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer ids for layer-wise lr decay: 0 stem (cls/pos/patch_embed), i+1 `layers.i`, last norm_f + head."""
        # NOT timm's (99999,) suffix: that merges norm_f into the last block; official MAE-style ids keep it apart
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [(r"^layers\.(\d+)", None), (r"^norm_f|^head", (1e6,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: bool | str | None = None) -> None:
        """New zero-bias head (trunc_normal .02) for `num_classes` (0: identity); optionally switch the pooling."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _pool_flag(global_pool)
        device = self.norm_f.weight.device
        self.head = nn.Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # ---------------------------------------------------------------------------------------------------------------
    # forward

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (B, C, H, W) -> (B, N+1, d) after norm_f; the cls token sits at index N // 2."""
        x = self.patch_embed(imgs)
        p = self.token_position
        x = torch.cat([x[:, :p], self.cls_token.expand(x.shape[0], -1, -1), x[:, p:]], dim=1) + self.pos_embed
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.norm_f(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: (B, N+1, d) -> logits (B, num_classes), or pooled features (B, d) when pre_logits.

        Mean pooling is the official (mean(tokens before cls) + mean(tokens after cls)) / 2, i.e. the mean of the
        patch tokens for an even patch count.
        """
        p = self.token_position
        x = (x[:, :p].mean(1) + x[:, p + 1 :].mean(1)) / 2 if self.global_pool else x[:, p]
        return x if pre_logits else self.head(x)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (B, C, H, W) normalised -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(imgs))

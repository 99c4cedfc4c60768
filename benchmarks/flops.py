"""Analytic model FLOPs of ARM pretraining / finetuning, for model FLOPs utilisation (MFU).

Counted, at 2 FLOPs per multiply-add: every Linear, the patch Conv2d, the depthwise causal conv1d of each scan
direction, and the decoder's attention products QK^T and AV over the full N x N (the block-causal mask is applied to a
dense product). The selective scan counts 9 FLOPs per (token, channel, state) plus 2 per (token, channel) for the
D skip and the z gate (mamba-ssm / VMamba's selective-scan estimate). Not counted: norms, activations, softmax,
residual adds, the loss, the optimizer. A training step is 3 x the forward (backward = 2 x forward), recompute not
counted: the usual MFU convention.

Shapes: L tokens, d width (embed_dim), E = d_inner, R = dt_rank, N = d_state, W = d_conv.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from arm_platform.config import ModelConfig

H200_BF16_DENSE_PEAK = 989e12
"""FLOP/s: H100 / H200 SXM dense bf16 tensor-core peak (NVIDIA datasheet: 1,979 TFLOPS is with 2:4 sparsity)."""

Task = Literal["pretrain", "finetune"]


@dataclasses.dataclass(frozen=True)
class Flops:
    """Forward FLOPs of one image, by kind."""

    linear: float = 0.0
    conv: float = 0.0
    attention: float = 0.0
    scan: float = 0.0

    @property
    def total(self) -> float:
        return self.linear + self.conv + self.attention + self.scan

    def __add__(self, other: Flops) -> Flops:
        return Flops(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    def __mul__(self, k: float) -> Flops:
        return Flops(*(k * a for a in dataclasses.astuple(self)))


def mixer(cfg: ModelConfig, tokens: int, directions: int) -> Flops:
    """Mamba-1 mixer on L tokens: in_proj, per direction (conv1d, x_proj, dt_proj, scan), out_proj."""
    d, e, r, n = cfg.embed_dim, cfg.d_inner, cfg.dt_rank, cfg.d_state
    per_direction = 2 * tokens * (e * (r + 2 * n) + r * e)  # x_proj (E -> R + 2N), dt_proj (R -> E)
    return Flops(
        linear=2 * tokens * d * 2 * e + directions * per_direction + 2 * tokens * e * d,
        conv=directions * 2 * tokens * e * cfg.d_conv,
        scan=directions * tokens * e * (9 * n + 2),
    )


def encoder_block(cfg: ModelConfig, tokens: int, directions: int) -> Flops:
    """Mixer + SwiGLU (w1, w2: d -> h, w3: h -> d)."""
    return mixer(cfg, tokens, directions) + Flops(linear=2 * tokens * 3 * cfg.embed_dim * cfg.swiglu_hidden)


def decoder_block(cfg: ModelConfig, tokens: int) -> Flops:
    """Cross-attention (q, kv, proj, QK^T, AV over N x N) + GELU MLP with 4 x width."""
    dd = cfg.decoder_dim
    linear = 2 * tokens * (dd * dd + dd * 2 * dd + dd * dd) + 2 * tokens * 2 * dd * 4 * dd
    return Flops(linear=linear, attention=2 * 2 * tokens * tokens * dd)


def patch_embed(cfg: ModelConfig) -> Flops:
    return Flops(conv=2 * cfg.num_patches * cfg.patch_dim * cfg.embed_dim)


def pretrain_forward(cfg: ModelConfig) -> Flops:
    """ARMPretrain on one image: patch embed (all patches), causal encoder over clusters 0..K-2, enc2dec, decoder."""
    tokens = (cfg.num_clusters - 1) * cfg.patches_per_cluster
    dd = cfg.decoder_dim
    heads = Flops(linear=2 * tokens * (4 * cfg.embed_dim * cfg.decoder_depth * dd + dd * cfg.patch_dim))
    return (
        patch_embed(cfg)
        + encoder_block(cfg, tokens, directions=1) * cfg.depth
        + decoder_block(cfg, tokens) * cfg.decoder_depth
        + heads
    )


def finetune_forward(cfg: ModelConfig) -> Flops:
    """ARMClassifier on one image: patch embed, 4-direction encoder over patches + cls token, head."""
    tokens = cfg.num_patches + 1
    return (
        patch_embed(cfg)
        + encoder_block(cfg, tokens, directions=4) * cfg.depth
        + Flops(linear=2 * cfg.embed_dim * cfg.num_classes)
    )


def forward(cfg: ModelConfig, task: Task) -> Flops:
    return pretrain_forward(cfg) if task == "pretrain" else finetune_forward(cfg)


def train_step_per_image(cfg: ModelConfig, task: Task) -> float:
    """FLOPs of forward + backward for one image (3 x forward)."""
    return 3 * forward(cfg, task).total


def mfu(img_per_s: float, flops_per_image: float, peak: float = H200_BF16_DENSE_PEAK) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return img_per_s * flops_per_image / peak

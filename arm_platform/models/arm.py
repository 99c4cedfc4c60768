"""ARM pretraining model: next-cluster autoregression with a causal Mamba encoder and a cross-attention decoder.

The patch grid is cut into K clusters of T = cluster_size**2 patches (cluster-major, row-major inside). The encoder sees
clusters 0..K-2, four tapped encoder depths feed `decoder_depth` cross-attention blocks through `enc2dec`, and the
decoder regresses the per-patch-normalised pixels of clusters 1..K-1 under a block-causal mask. Geometry comes from
`ModelConfig`; at 192 px / patch 16 / cluster 4 it is exactly the official 9 clusters of 16 patches.
Reference: OliverRensu/ARM models_pretrain.py (`VisionMamba`), see arm_spec.md §1.
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from arm_platform.config import ModelConfig
from arm_platform.models.blocks import DecoderBlock
from arm_platform.models.vision_mamba import (
    PatchEmbed,
    build_layers,
    init_mamba_weights,
    init_patch_embed,
    sincos_pos_embed_2d,
    xavier_init,
)

logger = logging.getLogger(__name__)

NUM_TAPS = 4
NORM_PIX_EPS = 1e-6


def block_causal_mask(num_blocks: int, block_len: int) -> torch.Tensor:
    """Additive mask, 0 where key block <= query block and -inf elsewhere.

    Returns:
        (num_blocks * block_len, num_blocks * block_len) float32.
    """
    allowed = torch.ones(num_blocks, num_blocks).tril().bool()
    allowed = allowed.repeat_interleave(block_len, 0).repeat_interleave(block_len, 1)
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs: (B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), raster patches, values ordered (row, col, channel)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch_size) * (w // patch_size), patch_size**2 * c)


def unpatchify(patches: torch.Tensor, patch_size: int, in_chans: int) -> torch.Tensor:
    """Inverse of `patchify` for square images: (B, G*G, p*p*C) -> (B, C, G*p, G*p)."""
    b, n, _ = patches.shape
    g = int(round(n**0.5))
    x = patches.reshape(b, g, g, patch_size, patch_size, in_chans).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, in_chans, g * patch_size, g * patch_size)


def to_clusters(x: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """Raster tokens -> cluster order ("b (h p1) (w p2) c -> b (h w) (p1 p2) c"): (B, G*G, C) -> (B, G*G, C)."""
    b, n, c = x.shape
    g = int(round(n**0.5)) // cluster_size
    x = x.reshape(b, g, cluster_size, g, cluster_size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, n, c)


def from_clusters(x: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """Inverse of `to_clusters`: (B, G*G, C) cluster order -> raster order."""
    b, n, c = x.shape
    g = int(round(n**0.5)) // cluster_size
    x = x.reshape(b, g, g, cluster_size, cluster_size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, n, c)


def normalize_patches(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch norm-pix target: (t - mean) / sqrt(var + 1e-6), unbiased var over the last dim.

    Returns:
        (normalised (..., P), mean (..., 1), std (..., 1)).
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()
    return (patches - mean) / std, mean, std


class ARMPretrain(nn.Module):
    """ARM pretraining model (official state-dict keys: pos_embed, ar_token, dec_pos_embed, mask, patch_embed,
    layers, enc2dec, dec_block, norm_1..norm_4, ar_norm, ar_pred).

    Args:
        cfg: geometry and widths; `drop_path_rate` is ignored (the official encoder never drops paths).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate_for_pretraining()
        self.cfg = cfg
        self.num_clusters, self.cluster_len = cfg.num_clusters, cfg.patches_per_cluster
        self.num_pred = (self.num_clusters - 1) * self.cluster_len
        self.grad_checkpointing = cfg.grad_checkpointing
        d, dd = cfg.embed_dim, cfg.decoder_dim

        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, d), requires_grad=False)
        self.ar_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.dec_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, dd), requires_grad=False)
        self.register_buffer("mask", block_causal_mask(self.num_clusters - 1, self.cluster_len))
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        self.layers = build_layers(cfg, "none")
        self.enc2dec = nn.Linear(NUM_TAPS * d, cfg.decoder_depth * dd)
        heads = dd // cfg.decoder_head_dim
        self.dec_block = nn.ModuleList(DecoderBlock(dd, heads) for _ in range(cfg.decoder_depth))
        for k in range(NUM_TAPS):
            setattr(self, f"norm_{k + 1}", nn.LayerNorm(d))
        self.ar_norm = nn.LayerNorm(dd)
        self.ar_pred = nn.Linear(dd, cfg.target_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Official order (arm_spec.md §1.8): patch embed, sin-cos tables + ar_token, mamba init, decoder xavier."""
        init_patch_embed(self.patch_embed)
        grid = self.cfg.grid_size
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.embed_dim, grid).unsqueeze(0))
            self.dec_pos_embed.copy_(sincos_pos_embed_2d(self.cfg.decoder_dim, grid).unsqueeze(0))
        trunc_normal_(self.ar_token, std=0.02)
        self.apply(partial(init_mamba_weights, n_layer=self.cfg.depth))
        self.dec_block.apply(xavier_init)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder block activations in backward (torch.utils.checkpoint)."""
        self.grad_checkpointing = enable

    # ---------------------------------------------------------------------------------------------------------------
    # stages

    def tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (B, C, H, W) -> (B, K*T, d): patch embed + fixed pos (raster), regrouped into cluster order."""
        return to_clusters(self.patch_embed(imgs) + self.pos_embed, self.cfg.cluster_size)

    def forward_encoder(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, N, d) cluster-ordered tokens -> 4 normalised taps, each (B, N, d) (norm_k of block tap_layers[k])."""
        taps = set(self.cfg.tap_layers)
        hidden: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if i + 1 in taps:
                hidden[i + 1] = x
        return [getattr(self, f"norm_{k + 1}")(hidden[t]) for k, t in enumerate(self.cfg.tap_layers)]

    def forward_decoder(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """feats: 4 x (B, (K-1)*T, d) -> predictions (B, (K-1)*T, patch_dim) for clusters 1..K-1.

        enc2dec's output is split INTERLEAVED (`.view(..., dec_dim, depth)`), decoder block k reads `[..., k]`.
        """
        b, n, _ = feats[0].shape
        if n != self.num_pred:
            raise ValueError(f"decoder expects {self.num_pred} context tokens (clusters 0..K-2), got {n}")
        latent = self.enc2dec(torch.cat(feats, dim=-1)).view(b, n, self.cfg.decoder_dim, self.cfg.decoder_depth)
        dec_pos = to_clusters(self.dec_pos_embed, self.cfg.cluster_size)[:, self.cluster_len :]
        q = (self.ar_token + dec_pos).expand(b, -1, -1)
        for k, blk in enumerate(self.dec_block):
            q = blk(q, latent[..., k], self.mask)
        return self.ar_pred(self.ar_norm(q))

    def target_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (B, C, H, W) -> raw pixel patches of the target channels in cluster order, (B, K*T, target_dim)."""
        chans = self.cfg.target_chans or self.cfg.in_chans
        return to_clusters(patchify(imgs[:, :chans], self.cfg.patch_size), self.cfg.cluster_size)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Norm-pix MSE over clusters 1..K-1. pred: (B, (K-1)*T, P) -> (scalar loss, target (B, (K-1)*T, P))."""
        target, _, _ = normalize_patches(self.target_patches(imgs)[:, self.cluster_len :])
        return ((pred.float() - target.float()) ** 2).mean(), target

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """imgs: (B, C, H, W) normalised -> {"loss": (), "pred": (B, (K-1)*T, P), "target": (B, (K-1)*T, P)}."""
        x = self.tokens(imgs)[:, : self.num_pred]  # clusters 0..K-2
        pred = self.forward_decoder(self.forward_encoder(x))
        loss, target = self.forward_loss(imgs, pred)
        return {"loss": loss, "pred": pred, "target": target}

    # ---------------------------------------------------------------------------------------------------------------
    # monitoring helpers

    @torch.no_grad()
    def predict_images(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced next-cluster predictions beside the targets they are scored against, as images.

        Both live in the loss's per-patch-normalised space and are drawn with ONE batch-level brightness / contrast
        (the mean over the batch of the true patches' means / stds), never each true patch's own statistics, so the
        picture shows only what the model predicts: a constant predictor draws the same patch everywhere. Cluster 0
        (context, never predicted) is the input in both.

        Args:
            imgs: (B, C, H, W) normalised.

        Returns:
            (pred_imgs, target_imgs), each (B, C', H, W) in the input's normalised space, C' the target channels
            (`target_chans`, the first C' input channels).
        """
        pred = self.forward(imgs)["pred"].float()
        patches = self.target_patches(imgs).float()
        target, mean, std = normalize_patches(patches[:, self.cluster_len :])
        shift, scale = mean.mean(), std.mean()

        def draw(normalised: torch.Tensor) -> torch.Tensor:
            out = torch.cat([patches[:, : self.cluster_len], normalised * scale + shift], dim=1)
            chans = self.cfg.target_chans or self.cfg.in_chans
            out = unpatchify(from_clusters(out, self.cfg.cluster_size), self.cfg.patch_size, chans)
            return out.to(imgs.dtype)

        return draw(pred), draw(target)

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """Global feature for kNN probing: encoder over ALL clusters, last tap's norm, mean pool. -> (B, embed_dim)."""
        return self.forward_encoder(self.tokens(imgs))[-1].mean(dim=1)

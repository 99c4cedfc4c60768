"""Encoder block (pre-norm Mamba mixer + SwiGLU) and the ARM decoder block (block-causal cross-attention + MLP).

Module and parameter names follow OliverRensu/ARM (`models_pretrain.py` Block / SwiGLU / CrossAttention /
DecoderBlock) so state-dict keys match the official checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from arm_platform.models.mixer import Mamba


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), all three Linear layers with bias (EVA-style, no sub-LN)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(dim, hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)."""
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Block(nn.Module):
    """h + DropPath(Mamba(LN1(h))), then h + DropPath(SwiGLU(LN2(h))); one DropPath module serves both branches."""

    def __init__(self, mixer: Mamba, dim: int, mlp_hidden: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.mixer = mixer
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, dim) -> (B, L, dim)."""
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttention(nn.Module):
    """Multi-head attention of queries over a same-length key/value sequence with an additive float mask."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q, kv: (B, N, dim); mask: (N, N) with 0 (attend) / -inf (blocked) -> (B, N, dim)."""
        b, n, c = q.shape
        h = self.num_heads
        q = self.q(q).reshape(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(kv).reshape(b, kv.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))  # scale = head_dim ** -0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DecoderBlock(nn.Module):
    """q + CrossAttn(LN2_1(q), LN2_2(latent), mask), then q + MLP(LN2(q)); no self-attention among queries."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.attn2 = CrossAttention(dim, num_heads)
        self.norm2_1 = nn.LayerNorm(dim)
        self.norm2_2 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q, latent: (B, N, dim); mask: (N, N) -> (B, N, dim)."""
        q = q + self.attn2(self.norm2_1(q), self.norm2_2(latent), mask)
        return q + self.mlp(self.norm2(q))

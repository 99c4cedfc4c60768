"""Mamba-1 token mixer: unidirectional (ARM pretraining) and the 4-direction "v3" scan (ARM finetuning).

Parameter names equal mamba_ssm `Mamba` / the Vim fork (`in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj` and the
`_b`, `_c`, `_c_b` direction sets), so official ARM checkpoints load 1:1. All compute goes through `arm_platform.ops`.
References: OliverRensu/ARM mamba_simple.py (Mamba.__init__ / forward), hustvl/Vim mamba-1p1p1.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from arm_platform import ops

DIRECTION_SUFFIXES = ("_b", "_c", "_c_b")
"""Extra v3 parameter sets: row backward, column forward, column backward (they share in_proj / out_proj)."""

BIMAMBA_TYPES = ("none", "v3")

DIRECTION_PARAMS = ("A_log", "D", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias")
"""Mixer parameters that exist once per scan direction (relative to the mixer)."""


def direction_key(base: str, suffix: str) -> str:
    """Official name of mixer parameter `base` in direction `suffix`.

    "A_log" + "_c_b" -> "A_c_b_log", "D" + "_b" -> "D_b", "conv1d.weight" + "_c" -> "conv1d_c.weight".
    """
    if base == "A_log":
        return f"A{suffix}_log"
    module, dot, param = base.partition(".")
    return f"{module}{suffix}{dot}{param}"


@functools.cache
def column_order(seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Permutation from row-major to column-major token order with the middle cls token kept in place.

    The sequence is `G*G` patch tokens in raster order with one cls token inserted at index `seq_len // 2`
    (ARM finetune layout). `t[..., perm]` transposes the patch grid; the permutation is an involution, so the
    same index maps back (official v3 forward, mamba_simple.py).

    Returns:
        perm: (seq_len,) long.
    """
    grid = math.isqrt(seq_len - 1)
    if grid * grid != seq_len - 1:
        raise ValueError(f"v3 scan needs G*G patch tokens + 1 cls token, got sequence length {seq_len}")
    cls_pos = seq_len // 2
    patch_slots = [i for i in range(seq_len) if i != cls_pos]  # sequence index of raster patch r
    perm = list(range(seq_len))
    for m, slot in enumerate(patch_slots):  # column-major position m holds raster patch (m % G) * G + m // G
        perm[slot] = patch_slots[(m % grid) * grid + m // grid]
    return torch.tensor(perm, dtype=torch.long, device=device)


class Mamba(nn.Module):
    """Mamba-1 mixer with expand/d_state/d_conv/dt_rank hyper-parameters and no in/out projection bias.

    Args:
        d_model: token width d.
        bimamba_type: "none" (one causal scan, `ops.mamba_inner`) or "v3" (row fwd/bwd + column fwd/bwd, /4).
        layer_idx: block index (kept for parity with mamba_ssm; unused).
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 1,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        bimamba_type: str = "none",
        layer_idx: int | None = None,
    ) -> None:
        super().__init__()
        if bimamba_type not in BIMAMBA_TYPES:
            raise ValueError(f"bimamba_type must be one of {BIMAMBA_TYPES}, got {bimamba_type!r}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.bimamba_type = bimamba_type
        self.layer_idx = layer_idx

        # Own parameters first so the state_dict order follows the official one (A_log, D, A_b_log, D_b, ...).
        self.A_log = self._new_a_log()
        self.D = self._new_d()
        suffixes = DIRECTION_SUFFIXES if bimamba_type == "v3" else ()
        for s in suffixes:
            setattr(self, direction_key("A_log", s), self._new_a_log())
            setattr(self, f"D{s}", self._new_d())
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self._add_direction("", dt_min, dt_max, dt_init_floor)
        for s in suffixes:
            self._add_direction(s)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _new_a_log(self) -> nn.Parameter:
        # S4D-real init A = -[1..N] per channel, stored as log; kept fp32
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        p = nn.Parameter(torch.log(a))
        p._no_weight_decay = True
        return p

    def _new_d(self) -> nn.Parameter:
        p = nn.Parameter(torch.ones(self.d_inner))
        p._no_weight_decay = True
        return p

    def _add_direction(self, suffix: str, dt_min: float = 0.0, dt_max: float = 0.0, floor: float = 0.0) -> None:
        """conv1d / x_proj / dt_proj of one scan direction.

        Only the forward direction gets mamba's dt init; the `_b/_c/_c_b` dt_proj are plain Linear layers as in the
        official v3 code (their bias is later zeroed by `init_mamba_weights`, or overwritten from a checkpoint).
        """
        conv = nn.Conv1d(self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, padding=self.d_conv - 1)
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        if suffix == "":
            nn.init.uniform_(dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=floor)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            dt_proj.bias._no_reinit = True
        setattr(self, f"conv1d{suffix}", conv)
        setattr(self, f"x_proj{suffix}", x_proj)
        setattr(self, f"dt_proj{suffix}", dt_proj)

    def _direction_args(self, suffix: str) -> tuple:
        """Positional args of `ops.mamba_inner_no_out_proj` for one direction (after xz)."""
        conv, dt_proj = getattr(self, f"conv1d{suffix}"), getattr(self, f"dt_proj{suffix}")
        a = -torch.exp(getattr(self, direction_key("A_log", suffix)).float())
        return (
            conv.weight,
            conv.bias,
            getattr(self, f"x_proj{suffix}").weight,
            dt_proj.weight,
            a,
            getattr(self, f"D{suffix}").float(),
            dt_proj.bias.float(),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (B, L, d) -> (B, L, d)."""
        xz = F.linear(hidden_states, self.in_proj.weight).transpose(1, 2)  # (B, 2*d_inner, L)
        if self.bimamba_type == "none":
            conv_w, conv_b, x_w, dt_w, a, d, dt_b = self._direction_args("")
            return ops.mamba_inner(
                xz,
                conv_w,
                conv_b,
                x_w,
                dt_w,
                self.out_proj.weight,
                self.out_proj.bias,
                a,
                d,
                delta_bias=dt_b,
                delta_softplus=True,
            )
        return self._forward_v3(xz)

    def _forward_v3(self, xz: torch.Tensor) -> torch.Tensor:
        """Official v3: (row fwd + row bwd + col fwd + col bwd) / 4, then out_proj. xz: (B, 2*d_inner, L)."""
        perm = column_order(xz.shape[-1], xz.device)

        def scan(t: torch.Tensor, suffix: str) -> torch.Tensor:
            return ops.mamba_inner_no_out_proj(t, *self._direction_args(suffix), delta_softplus=True)

        xz = xz.contiguous()
        y_row = scan(xz, "") + scan(xz.flip(-1), "_b").flip(-1)
        xc = xz[..., perm]
        y_col = scan(xc, "_c") + scan(xc.flip(-1), "_c_b").flip(-1)
        y = (y_row + y_col[..., perm]) / 4
        return F.linear(y.transpose(1, 2), self.out_proj.weight, self.out_proj.bias)

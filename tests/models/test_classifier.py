"""ARM finetune classifier: shapes, the 4-direction scan against a slow explicit recomputation, timm interface."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay

from arm_platform.models import REGISTERED_MODELS, ARMClassifier, build_model
from arm_platform.models.classifier import drop_path_schedule
from arm_platform.models.mixer import column_order
from arm_platform.recipes import ARM_SIZES


@pytest.mark.parametrize(("img_size", "patch_size"), [(32, 4), (32, 8), (64, 8)])
def test_classifier_shapes(make_cfg, img_size, patch_size):
    """Logits (B, num_classes); features carry N patch tokens + the middle cls token."""
    cfg = make_cfg(img_size=img_size, patch_size=patch_size)
    model = ARMClassifier(cfg)
    imgs = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        feats = model.forward_features(imgs)
        assert feats.shape == (2, cfg.num_patches + 1, cfg.embed_dim)
        assert model(imgs).shape == (2, cfg.num_classes)
        assert model.forward_head(feats, pre_logits=True).shape == (2, cfg.embed_dim)
    assert model.token_position == cfg.num_patches // 2
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, img_size + patch_size, img_size + patch_size))


def test_column_order_is_an_involution_that_transposes_patches_around_the_middle_cls():
    """Row-major patch (i, j) moves to column-major slot j*G+i; cls stays at L//2; applying it twice is identity."""
    g = 3
    seq_len = g * g + 1
    perm = column_order(seq_len)
    assert torch.equal(perm[perm], torch.arange(seq_len))
    cls = seq_len // 2
    patch_slots = [s for s in range(seq_len) if s != cls]
    tokens = [f"p{i}{j}" for i in range(g) for j in range(g)]
    seq = tokens[:cls] + ["cls"] + tokens[cls:]
    col = [seq[s] for s in perm.tolist()]
    assert col[cls] == "cls"
    assert [col[s] for s in patch_slots] == [f"p{i}{j}" for j in range(g) for i in range(g)]
    with pytest.raises(ValueError, match="sequence length"):
        column_order(12)


# --------------------------------------------------------------------------------------------------------------------
# slow explicit recomputation (float64, per-timestep loops, orders built from (row, col) coordinates)


def slow_direction(xz, mixer, suffix):
    """One Mamba direction, written out per timestep: xz (B, 2D, L) -> y * silu(z) (B, D, L)."""
    x, z = xz.chunk(2, dim=1)
    conv = getattr(mixer, f"conv1d{suffix}")
    width, seq_len = conv.weight.shape[-1], x.shape[-1]
    taps = [[(k, t - width + 1 + k) for k in range(width) if t - width + 1 + k >= 0] for t in range(seq_len)]
    xc = torch.stack(
        [conv.bias + sum(conv.weight[:, 0, k] * x[:, :, s] for k, s in taps[t]) for t in range(seq_len)], -1
    )
    xc = F.silu(xc)
    x_dbl = xc.transpose(1, 2) @ getattr(mixer, f"x_proj{suffix}").weight.T  # (B, L, R + 2N)
    r, n = mixer.dt_rank, mixer.d_state
    dt_proj = getattr(mixer, f"dt_proj{suffix}")
    dt = F.softplus(x_dbl[..., :r] @ dt_proj.weight.T + dt_proj.bias)  # (B, L, D)
    b_mat, c_mat = x_dbl[..., r : r + n], x_dbl[..., r + n :]
    a = -torch.exp(getattr(mixer, "A_log" if suffix == "" else f"A{suffix}_log"))
    d_skip = getattr(mixer, f"D{suffix}")
    h = xz.new_zeros(x.shape[0], x.shape[1], n)
    ys = []
    for t in range(seq_len):
        h = torch.exp(dt[:, t, :, None] * a) * h + dt[:, t, :, None] * b_mat[:, t, None, :] * xc[:, :, t, None]
        ys.append((h * c_mat[:, t, None, :]).sum(-1) + d_skip * xc[:, :, t])
    return torch.stack(ys, dim=-1) * F.silu(z)


def slow_v3_mixer(h, mixer, grid):
    """(row fwd + row bwd + column fwd + column bwd) / 4 with explicit token lists, then out_proj."""
    seq_len = h.shape[1]
    cls = seq_len // 2
    raster = [(i, j) for i in range(grid) for j in range(grid)]
    row_seq = raster[:cls] + ["cls"] + raster[cls:]
    col_patches = sorted(raster, key=lambda ij: (ij[1], ij[0]))
    col_seq = col_patches[:cls] + ["cls"] + col_patches[cls:]
    col_idx = [row_seq.index(tok) for tok in col_seq]  # column slot m holds sequence token col_idx[m]
    xz = (h @ mixer.in_proj.weight.T).transpose(1, 2)
    y = slow_direction(xz, mixer, "") + slow_direction(xz.flip(-1), mixer, "_b").flip(-1)
    xc = xz[..., col_idx]
    y_col = slow_direction(xc, mixer, "_c") + slow_direction(xc.flip(-1), mixer, "_c_b").flip(-1)
    y_back = torch.zeros_like(y_col)
    y_back[..., col_idx] = y_col
    return ((y + y_back) / 4).transpose(1, 2) @ mixer.out_proj.weight.T


def slow_classifier(model, imgs):
    cfg = model.cfg
    p, g = cfg.patch_size, cfg.grid_size
    patches = imgs.unfold(2, p, p).unfold(3, p, p)  # (B, C, G, G, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(imgs.shape[0], g * g, -1)
    x = patches @ model.patch_embed.proj.weight.reshape(cfg.embed_dim, -1).T + model.patch_embed.proj.bias
    mid = g * g // 2
    x = torch.cat([x[:, :mid], model.cls_token.expand(x.shape[0], -1, -1), x[:, mid:]], dim=1) + model.pos_embed
    for blk in model.layers:
        x = x + slow_v3_mixer(F.layer_norm(x, (cfg.embed_dim,), blk.norm1.weight, blk.norm1.bias), blk.mixer, g)
        u = F.layer_norm(x, (cfg.embed_dim,), blk.norm2.weight, blk.norm2.bias)
        x = x + blk.mlp.w3(F.silu(blk.mlp.w1(u)) * blk.mlp.w2(u))
    x = F.layer_norm(x, (cfg.embed_dim,), model.norm_f.weight, model.norm_f.bias)
    pooled = torch.cat([x[:, :mid], x[:, mid + 1 :]], dim=1).mean(1)
    return pooled @ model.head.weight.T + model.head.bias


def test_classifier_equals_slow_explicit_recomputation(make_cfg):
    """The v3 4-direction model (each direction with its own random weights) equals a per-timestep float64 rewrite."""
    model = ARMClassifier(make_cfg(embed_dim=16, depth=2, img_size=16, patch_size=4)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    imgs = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(imgs), slow_classifier(model, imgs), rtol=1e-4, atol=1e-5)


def test_every_classifier_parameter_gets_a_finite_gradient(make_cfg):
    """All four direction parameter sets, pos/cls and head receive nonzero finite gradients."""
    model = ARMClassifier(make_cfg(drop_path_rate=0.1))
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_grad_checkpointing_and_pooling(make_cfg):
    """Checkpointing leaves gradients unchanged; cls pooling reads the middle token."""
    model = ARMClassifier(make_cfg())
    imgs = torch.randn(2, 3, 32, 32)
    model(imgs).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(imgs).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)
    model.reset_classifier(3, global_pool="token")
    feats = torch.randn(2, 17, 16)
    assert torch.equal(model.forward_head(feats, pre_logits=True), feats[:, 8])
    assert model(imgs).shape == (2, 3) and torch.all(model.head.bias == 0)
    model.reset_classifier(0)
    assert model(imgs).shape == (2, 16)


def test_drop_path_schedule_is_shifted_by_one(make_cfg):
    """Block i uses ([0] + linspace(0, rate, depth))[i]: the first two are 0, the last never reaches the rate."""
    assert drop_path_schedule(0.1, 12)[:2] == [0.0, 0.0]
    assert drop_path_schedule(0.1, 12)[-1] == pytest.approx(0.1 * 10 / 11)  # float32 linspace, as official
    model = ARMClassifier(make_cfg(depth=4, drop_path_rate=0.3))
    probs = [getattr(blk.drop_path, "drop_prob", 0.0) for blk in model.layers]
    assert probs == pytest.approx([0.0, 0.0, 0.1, 0.2])


def test_layer_decay_groups_reproduce_official_layer_ids(make_cfg):
    """timm param_groups_layer_decay: id 0 stem, i+1 layers.i, depth+1 norm_f/head; scale = decay^(depth+1-id)."""
    depth, decay = 3, 0.65
    model = ARMClassifier(make_cfg(depth=depth))
    groups = param_groups_layer_decay(
        model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=decay
    )
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("layers."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        assert scale[id(p)] == pytest.approx(decay ** (depth + 1 - layer)), name
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay
    assert id(model.layers[0].mixer.A_log) not in no_decay  # 2-D A_log is decayed, as in the official code


def official_finetune_keys(depth: int) -> set[str]:
    """arm_spec.md §6 finetune key list."""
    keys = {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "head.weight",
        "head.bias",
        "norm_f.weight",
        "norm_f.bias",
    }
    for i in range(depth):
        p = f"layers.{i}."
        keys |= {
            p + k
            for k in (
                "mixer.in_proj.weight",
                "mixer.out_proj.weight",
                "norm1.weight",
                "norm1.bias",
                "norm2.weight",
                "norm2.bias",
            )
        }
        keys |= {f"{p}mlp.w{j}.{t}" for j in (1, 2, 3) for t in ("weight", "bias")}
        for s in ("", "_b", "_c", "_c_b"):
            keys |= {
                f"{p}mixer.A{s}_log",
                f"{p}mixer.D{s}",
                f"{p}mixer.conv1d{s}.weight",
                f"{p}mixer.conv1d{s}.bias",
                f"{p}mixer.x_proj{s}.weight",
                f"{p}mixer.dt_proj{s}.weight",
                f"{p}mixer.dt_proj{s}.bias",
            }
    return keys


@pytest.mark.parametrize(
    ("size", "img_size", "count"),
    [("base", 224, 85_031_656), ("large", 224, 297_035_720), ("huge", 224, 662_682_088), ("base", 384, 85_323_496)],
)
def test_finetune_parameter_counts_and_keys_equal_the_spec(size, img_size, count):
    """arm_spec.md §7 counts (1000 classes) and §6 keys, on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(ARM_SIZES[size].name, img_size=img_size, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == count
    assert set(model.state_dict()) == official_finetune_keys(ARM_SIZES[size].depth)
    assert model.pos_embed.shape == (1, (img_size // 16) ** 2 + 1, ARM_SIZES[size].embed_dim)


def test_every_registered_name_builds_through_timm():
    """Each size registers a classifier and a `_pretrain` model; kwargs override ModelConfig fields."""
    expected = {f"{cfg.name}{suffix}" for cfg in ARM_SIZES.values() for suffix in ("", "_pretrain")}
    assert set(REGISTERED_MODELS) == expected
    assert expected <= set(timm.list_models("arm_*"))
    for name in sorted(expected):
        with torch.device("meta"):
            model = timm.create_model(name, drop_path_rate=0.1)
        is_pretrain = name.endswith("_pretrain")
        assert type(model).__name__ == ("ARMPretrain" if is_pretrain else "ARMClassifier"), name
        assert model.pretrained_cfg["input_size"] == (3, model.cfg.img_size, model.cfg.img_size)
    small = timm.create_model("arm_tiny_pz4", embed_dim=16, depth=1, num_classes=7, img_size=16)
    assert small.head.out_features == 7 and small.cfg.img_size == 16 and small.default_cfg["num_classes"] == 7
    with pytest.raises(ValueError, match="embed_dims"):
        timm.create_model("arm_tiny_pz4", embed_dims=8)
    with pytest.raises(ValueError, match="no hub weights"):
        timm.create_model("arm_tiny_pz4", pretrained=True)
    with pytest.raises(ValueError, match="task"):
        build_model(ARM_SIZES["tiny"], "segment")

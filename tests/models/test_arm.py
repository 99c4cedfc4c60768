"""ARM pretraining model: geometry, causality, gradients, loss definition, official keys and parameter counts."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arm_platform import ops
from arm_platform.models import ARMPretrain, build_model
from arm_platform.models.arm import block_causal_mask, from_clusters, patchify, to_clusters, unpatchify
from arm_platform.models.vision_mamba import sincos_pos_embed_2d
from arm_platform.recipes import ARM_SIZES

GEOMETRIES = [
    dict(img_size=32, patch_size=4, cluster_size=2),  # 8x8 grid, 16 clusters of 4
    dict(img_size=32, patch_size=8, cluster_size=2),  # 4x4 grid, 4 clusters of 4
    dict(img_size=64, patch_size=8, cluster_size=4),  # 8x8 grid, 4 clusters of 16
]


def cluster_of_pixels(img_size: int, patch_size: int, cluster_size: int) -> torch.Tensor:
    """(H, W) map pixel -> cluster index (row-major clusters)."""
    rows = torch.arange(img_size) // (patch_size * cluster_size)
    per_side = img_size // (patch_size * cluster_size)
    return rows[:, None] * per_side + rows[None, :]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "{img_size}px-p{patch_size}-c{cluster_size}".format(**g))
def test_pretrain_shapes_follow_geometry(geometry, make_cfg):
    """pred/target cover clusters 1..K-1, the mask is ((K-1)T)^2 and the helpers return image-shaped tensors."""
    cfg = make_cfg(**geometry)
    model = ARMPretrain(cfg)
    k, t, p = cfg.num_clusters, cfg.patches_per_cluster, cfg.patch_dim
    imgs = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        out = model(imgs)
    assert out["pred"].shape == out["target"].shape == (2, (k - 1) * t, p)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert model.mask.shape == ((k - 1) * t, (k - 1) * t)
    assert model.pos_embed.shape == (1, cfg.num_patches, cfg.embed_dim)
    pred_imgs, target_imgs = model.predict_images(imgs)
    assert pred_imgs.shape == target_imgs.shape == imgs.shape
    first = cluster_of_pixels(cfg.img_size, cfg.patch_size, cfg.cluster_size) == 0
    for drawn in (pred_imgs, target_imgs):  # cluster 0 is copied, never predicted
        torch.testing.assert_close(drawn[..., first], imgs[..., first])
    assert not torch.allclose(pred_imgs[..., ~first], target_imgs[..., ~first])
    with torch.no_grad():
        assert model.embed(imgs).shape == (2, cfg.embed_dim)


def test_prediction_grid_of_a_constant_predictor_is_constant(make_cfg):
    """Predictions are drawn with batch-level statistics, not each true patch's: a constant predictor draws one patch
    everywhere, and a perfect predictor draws exactly the target (clusters 1..K-1 of every image)."""
    cfg = make_cfg(img_size=32, patch_size=4, cluster_size=2)
    model = ARMPretrain(cfg)
    imgs = torch.randn(3, 3, 32, 32) * torch.rand(3, 1, 1, 1) + torch.randn(3, 1, 1, 1)  # brightness differs
    const = torch.randn(cfg.patch_dim)
    model.forward_decoder = lambda feats: const.expand(feats[0].shape[0], model.num_pred, -1)
    pred_imgs, target_imgs = model.predict_images(imgs)
    t = cfg.patches_per_cluster
    drawn = to_clusters(patchify(pred_imgs, cfg.patch_size), cfg.cluster_size)[:, t:]  # (B, (K-1)T, P)
    torch.testing.assert_close(drawn, drawn[:1, :1].expand_as(drawn))
    assert drawn[0, 0].std() > 0.1  # the constant's pattern itself is drawn, not flattened
    targets = model(imgs)["target"]
    model.forward_decoder = lambda feats: targets
    perfect, target_again = model.predict_images(imgs)
    torch.testing.assert_close(perfect, target_imgs)
    torch.testing.assert_close(target_again, target_imgs)


def test_pretraining_rejects_geometry_without_whole_clusters(make_cfg):
    """A grid that does not split into clusters is a ValueError, not a silent reshape."""
    with pytest.raises(ValueError, match="cluster_size"):
        ARMPretrain(make_cfg(img_size=48, patch_size=8, cluster_size=4))


@pytest.mark.parametrize("geometry", GEOMETRIES[1:], ids=["32px-p8-c2", "64px-p8-c4"])
def test_prediction_for_cluster_k_has_zero_gradient_wrt_clusters_k_and_later(geometry, make_cfg):
    """Autograd proves there is no information leak: cluster k's prediction depends only on clusters < k."""
    cfg = make_cfg(**geometry)
    model = ARMPretrain(cfg).double()
    pixel_cluster = cluster_of_pixels(cfg.img_size, cfg.patch_size, cfg.cluster_size)
    imgs = torch.randn(2, 3, cfg.img_size, cfg.img_size, dtype=torch.float64, requires_grad=True)
    out = model(imgs)
    t = cfg.patches_per_cluster
    for k in range(1, cfg.num_clusters):
        pred_k = out["pred"][:, (k - 1) * t : k * t]
        (grad,) = torch.autograd.grad((pred_k * torch.randn_like(pred_k)).sum(), imgs, retain_graph=True)
        per_cluster = torch.stack([grad[..., pixel_cluster == c].abs().sum() for c in range(cfg.num_clusters)])
        assert torch.all(per_cluster[k:] == 0), f"cluster {k} prediction sees clusters >= {k}: {per_cluster}"
        assert per_cluster[k - 1] > 0 and per_cluster[0] > 0, f"cluster {k} prediction ignores its context"


def test_loss_is_norm_pix_mse_over_clusters_after_the_first(make_cfg):
    """Target = per-patch (x - mean) / sqrt(unbiased var + 1e-6) of clusters 1..K-1 in cluster order."""
    cfg = make_cfg(img_size=32, patch_size=4, cluster_size=2)
    model = ARMPretrain(cfg)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(imgs)
    # spec §1.3 index map from cluster order s to raster, computed independently
    g, s_side, t = cfg.cluster_grid, cfg.cluster_size, cfg.patches_per_cluster
    raster = []
    for s in range(cfg.num_patches):
        c, w = divmod(s, t)
        row, col = s_side * (c // g) + w // s_side, s_side * (c % g) + w % s_side
        raster.append(row * cfg.grid_size + col)
    patches = imgs.reshape(2, 3, 8, 4, 8, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 64, 48)[:, raster][:, t:]
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(out["target"], target)
    torch.testing.assert_close(out["loss"], ((out["pred"] - target) ** 2).mean())


def test_patch_and_cluster_reorderings_round_trip():
    """patchify/unpatchify and to_clusters/from_clusters are exact inverses; patch values are (row, col, channel)."""
    imgs = torch.randn(2, 3, 16, 16)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 16, 48)
    assert patches[1, 5, 7 * 3 + 2] == imgs[1, 2, 4 + 7 // 4, 4 + 7 % 4]  # patch (1,1), pixel (1,3), channel 2
    torch.testing.assert_close(unpatchify(patches, 4, 3), imgs)
    torch.testing.assert_close(from_clusters(to_clusters(patches, 2), 2), patches)
    expected = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]  # 4x4 grid, 2x2 clusters
    assert to_clusters(torch.arange(16.0).reshape(1, 16, 1), 2).flatten().tolist() == expected


def test_sincos_table_matches_mae_numpy_layout():
    """Column first, [sin, cos] per half, omega_k = 10000^(-k/Q) (MAE util/pos_embed.py)."""

    def mae_1d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dim, g = 16, 5
    grid = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))  # grid[0] = column
    expected = np.concatenate([mae_1d(dim // 2, grid[0]), mae_1d(dim // 2, grid[1])], axis=1)
    torch.testing.assert_close(sincos_pos_embed_2d(dim, g), torch.from_numpy(expected).float())


def test_block_causal_mask_lets_query_block_see_context_blocks_up_to_its_own():
    """mask[i, k] = 0 iff k // T <= i // T, else -inf."""
    mask = block_causal_mask(3, 2)
    i, k = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(mask == 0, k // 2 <= i // 2)
    assert torch.all(torch.isneginf(mask[k // 2 > i // 2]))


def test_enc2dec_output_is_split_interleaved_across_decoder_blocks(make_cfg):
    """Decoder block k reads channels k, k+depth, k+2*depth, ... of enc2dec (official `.view(..., dec_dim, 4)`)."""
    cfg = make_cfg(decoder_depth=3)
    model = ARMPretrain(cfg)
    seen: dict[str, torch.Tensor] = {}
    model.enc2dec.register_forward_hook(lambda m, i, o: seen.__setitem__("enc2dec", o))
    for k, blk in enumerate(model.dec_block):
        blk.norm2_2.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, i[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for k in range(3):
        torch.testing.assert_close(seen[k], seen["enc2dec"][..., k::3])


def test_taps_follow_config_and_embed_uses_all_clusters(make_cfg):
    """Official taps {6,8,10,12} at depth 12; `embed` runs the encoder over all K*T tokens."""
    assert ARM_SIZES["base"].tap_layers == (6, 8, 10, 12)
    assert ARM_SIZES["huge"].tap_layers == (12, 16, 20, 24)
    model = ARMPretrain(make_cfg())
    lengths = []
    model.layers[0].register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    with torch.no_grad():
        model.embed(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 32, 32))
    assert lengths == [16, 12]


def test_every_parameter_gets_a_finite_gradient(make_cfg):
    """Backward reaches every trainable parameter with finite values; frozen sin-cos tables stay frozen."""
    model = ARMPretrain(make_cfg())
    model(torch.randn(2, 3, 32, 32))["loss"].backward()
    for name, p in model.named_parameters():
        if name in ("pos_embed", "dec_pos_embed"):
            assert not p.requires_grad and p.grad is None
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients(make_cfg):
    """set_grad_checkpointing only trades memory for compute."""
    model = ARMPretrain(make_cfg())
    imgs = torch.randn(2, 3, 32, 32)
    model(imgs)["loss"].backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(imgs)["loss"].backward()
    for n, g in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, msg=n)


def test_overfitting_one_batch_drives_the_loss_down(make_cfg):
    """30 AdamW steps on one batch of smooth images at least halve the loss."""
    model = ARMPretrain(make_cfg(embed_dim=32, decoder_dim=32))
    imgs = F.interpolate(torch.randn(2, 3, 4, 4), size=32, mode="bicubic") + 0.1 * torch.randn(2, 3, 32, 32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(imgs)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_init_follows_official_order(make_cfg):
    """dt bias keeps its dt init, other Linear biases are 0, A_log = log(1..N), D = 1, decoder xavier, ar_token .02."""
    cfg = make_cfg(embed_dim=64, decoder_dim=64)
    model = ARMPretrain(cfg)
    mixer = model.layers[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1.0, 17.0)).repeat(64, 1))
    assert torch.all(mixer.D == 1)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None and not name.endswith("dt_proj"):
            assert torch.all(m.bias == 0), name
    bound = math.sqrt(6 / (64 + 128))  # xavier bound of kv (64 -> 128)
    assert model.dec_block[0].attn2.kv.weight.abs().max() <= bound
    # out_proj: kaiming_uniform(a=sqrt 5) bound 1/sqrt(fan_in), then / sqrt(depth)
    assert mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(64) / math.sqrt(cfg.depth) + 1e-6
    assert 0.01 < model.ar_token.std() < 0.03


def official_pretrain_shapes(d: int, depth: int, dd: int = 512, n: int = 144, dec_depth: int = 4) -> dict:
    """Key -> shape list of arm_spec.md §6 (official pretraining checkpoint)."""
    r, h = math.ceil(d / 16), d * 8 // 3
    shapes = {
        "pos_embed": (1, n, d),
        "ar_token": (1, 1, dd),
        "dec_pos_embed": (1, n, dd),
        "mask": (128, 128),
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
        "enc2dec.weight": (4 * dd, 4 * d),
        "enc2dec.bias": (4 * dd,),
        "ar_norm.weight": (dd,),
        "ar_norm.bias": (dd,),
        "ar_pred.weight": (768, dd),
        "ar_pred.bias": (768,),
    }
    for i in range(depth):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "mixer.A_log": (d, 16),
                p + "mixer.D": (d,),
                p + "mixer.in_proj.weight": (2 * d, d),
                p + "mixer.conv1d.weight": (d, 1, 4),
                p + "mixer.conv1d.bias": (d,),
                p + "mixer.x_proj.weight": (r + 32, d),
                p + "mixer.dt_proj.weight": (d, r),
                p + "mixer.dt_proj.bias": (d,),
                p + "mixer.out_proj.weight": (d, d),
                p + "mlp.w1.weight": (h, d),
                p + "mlp.w1.bias": (h,),
                p + "mlp.w2.weight": (h, d),
                p + "mlp.w2.bias": (h,),
                p + "mlp.w3.weight": (d, h),
                p + "mlp.w3.bias": (d,),
            }
        )
        for norm in ("norm1", "norm2"):
            shapes.update({f"{p}{norm}.weight": (d,), f"{p}{norm}.bias": (d,)})
    for k in range(dec_depth):
        p = f"dec_block.{k}."
        shapes.update(
            {
                p + "attn2.q.weight": (dd, dd),
                p + "attn2.q.bias": (dd,),
                p + "attn2.kv.weight": (2 * dd, dd),
                p + "attn2.kv.bias": (2 * dd,),
                p + "attn2.proj.weight": (dd, dd),
                p + "attn2.proj.bias": (dd,),
                p + "mlp.fc1.weight": (4 * dd, dd),
                p + "mlp.fc1.bias": (4 * dd,),
                p + "mlp.fc2.weight": (dd, 4 * dd),
                p + "mlp.fc2.bias": (dd,),
            }
        )
        for norm in ("norm2_1", "norm2_2", "norm2"):
            shapes.update({f"{p}{norm}.weight": (dd,), f"{p}{norm}.bias": (dd,)})
    for k in range(1, 5):
        shapes.update({f"norm_{k}.weight": (d,), f"norm_{k}.bias": (d,)})
    return shapes


@pytest.mark.parametrize("size", ["base", "large"])
def test_pretrain_state_dict_keys_and_shapes_equal_the_official_checkpoint(size):
    """Official checkpoint-*.pth keys load 1:1 (arm_spec.md §6)."""
    cfg = ARM_SIZES[size]
    with torch.device("meta"):
        model = build_model(cfg, "pretrain")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_pretrain_shapes(cfg.embed_dim, cfg.depth)


@pytest.mark.parametrize(
    ("size", "trainable", "frozen"),
    [("base", 99_243_008, 184_320), ("large", 303_721_696, 221_184), ("huge", 659_128_064, 294_912)],
)
def test_pretrain_parameter_counts_equal_the_spec(size, trainable, frozen):
    """arm_spec.md §7, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(ARM_SIZES[size], "pretrain")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == frozen


@pytest.mark.gpu
def test_kernel_backend_matches_reference_on_cuda(make_cfg):
    """Pretrain loss and grads agree between the CUDA kernels and the reference ops on the same weights."""
    if not torch.cuda.is_available() or not hasattr(ops, "set_backend"):
        pytest.skip("needs CUDA and ops.set_backend")
    try:
        ops.set_backend("kernel")
        ops.active_backend(torch.device("cuda"))
    except RuntimeError as err:
        pytest.skip(f"kernels unavailable: {err}")
    model = ARMPretrain(make_cfg(embed_dim=64, decoder_dim=64, depth=4, img_size=64, cluster_size=4)).cuda()
    imgs = torch.randn(4, 3, 64, 64, device="cuda")
    results = {}
    try:
        for backend in ("kernel", "ref"):
            ops.set_backend(backend)
            model.zero_grad()
            loss = model(imgs)["loss"]
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[backend] = (loss.detach(), grads)
    finally:
        ops.set_backend("auto")
    torch.testing.assert_close(results["kernel"][0], results["ref"][0], rtol=1e-4, atol=1e-5)
    for name, grad in results["ref"][1].items():
        torch.testing.assert_close(results["kernel"][1][name], grad, rtol=2e-3, atol=1e-5, msg=name)


def test_gray_target_predicts_one_channel_of_per_patch_normalised_gray():
    """target_chans=1 (the tiny recipe, gray data stored as RGB): the decoder predicts patch_size**2 values per patch,
    and the target is the normalised gray patch whichever channel statistics the input was normalised with."""
    import dataclasses

    from arm_platform import recipes
    from arm_platform.models import build_model
    from arm_platform.models.arm import normalize_patches, patchify, to_clusters

    cfg = dataclasses.replace(recipes.ARM_SIZES["tiny"], embed_dim=32, depth=2, decoder_dim=32, decoder_head_dim=16)
    assert cfg.target_chans == 1 and cfg.target_dim == cfg.patch_size**2
    model = build_model(cfg, "pretrain").eval()
    gray = torch.rand(2, 1, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    imgs = (gray - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # gray copied to RGB, ImageNet-normalised
    out = model(imgs)
    assert out["pred"].shape[-1] == cfg.patch_size**2
    expected, _, _ = normalize_patches(to_clusters(patchify(gray, cfg.patch_size), cfg.cluster_size)[:, 4:])
    torch.testing.assert_close(out["target"], expected, atol=1e-4, rtol=1e-4)
    pred, target = model.predict_images(imgs)
    assert pred.shape == target.shape == (2, 1, 32, 32)
    rgb = build_model(dataclasses.replace(cfg, target_chans=None), "pretrain")
    assert rgb(imgs)["pred"].shape[-1] == 3 * cfg.patch_size**2

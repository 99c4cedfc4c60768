"""Per-batch transforms: shapes, dtypes, value ranges, determinism, and equality with torchvision's ops."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from arm_platform.config import DataConfig
from arm_platform.data import transforms as T


def _jpeg(h: int = 60, w: int = 80, seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth colour field plus mild texture (white noise is not what resizers see)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.clip(np.asarray(low, dtype=float) + rng.normal(0, 6, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _img(h: int = 60, w: int = 80) -> torch.Tensor:
    return T.decode_tensor(_jpeg(h, w))


def _close_to_pil(out: np.ndarray, ref: Image.Image) -> None:
    """Tensor-kernel resize vs PIL's: same filter, rounding differs by at most 2 levels."""
    diff = np.abs(out.astype(int) - np.asarray(ref).transpose(2, 0, 1).astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_decode_returns_rgb_or_none_for_garbage():
    """Valid bytes decode to RGB (tensor decode byte-identical to PIL); garbage / truncated JPEGs give None."""
    assert T.decode(_jpeg()).mode == "RGB"
    np.testing.assert_array_equal(T.decode_tensor(_jpeg()).numpy(), np.asarray(T.decode(_jpeg())).transpose(2, 0, 1))
    png = io.BytesIO()
    Image.new("L", (5, 4), 7).save(png, format="PNG")
    assert T.decode_tensor(png.getvalue()).shape == (3, 4, 5)  # non-JPEG falls back to PIL
    for bad in (b"garbage", _jpeg()[:200]):
        assert T.decode(bad) is None and T.decode_tensor(bad) is None


def test_rrc_params_stay_inside_the_image_and_respect_scale():
    """Boxes lie inside the image, with area fraction in [min_scale, 1] and aspect within (3/4, 4/3) (+rounding)."""
    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(500):
        top, left, h, w = T.rrc_params(80, 60, (0.2, 1.0), rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        fractions.append(h * w / (80 * 60))
    assert 0.18 <= min(fractions) and max(fractions) <= 1.0
    # Same distribution as torchvision's sampler (which draws from torch's RNG).
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    ref = [
        np.prod(RandomResizedCrop.get_params(torch.zeros(3, 60, 80), [0.2, 1.0], [3 / 4, 4 / 3])[2:]) / 4800
        for _ in range(500)
    ]
    assert np.mean(fractions) == pytest.approx(np.mean(ref), abs=0.03)


def test_rrc_params_fall_back_to_a_clamped_center_crop():
    """An extreme aspect ratio that never fits falls back to torchvision's center crop with the ratio clamped."""
    top, left, h, w = T.rrc_params(400, 10, (0.99, 1.0), np.random.default_rng(0))
    assert (h, w) == (10, round(10 * 4 / 3)) and top == 0 and left == (400 - w) // 2


def test_pretrain_fn_matches_torchvision_resized_crop_and_flip():
    """Our crop + bicubic resize + flip matches torchvision's PIL ops (the official pipeline) for the same box."""
    pil = T.decode(_jpeg())
    fn = T.pretrain_image_fn(32, 0.2, hflip=1.0, interpolation="bicubic")
    out = fn(_img(), np.random.default_rng(3))
    top, left, h, w = T.rrc_params(pil.width, pil.height, (0.2, 1.0), np.random.default_rng(3))
    ref = TF.hflip(TF.resized_crop(pil, top, left, h, w, [32, 32], InterpolationMode.BICUBIC))
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    _close_to_pil(out, ref)


def test_pretrain_fn_is_deterministic_under_a_seed_and_varies_without():
    fn = T.pretrain_image_fn(48, 0.2, 0.5, "bicubic")
    img = _img()
    a, b = fn(img, np.random.default_rng(7)), fn(img, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    outs = {fn(img, np.random.default_rng(s)).tobytes() for s in range(5)}
    assert len(outs) == 5


def test_eval_fn_matches_official_resize_both_sides_then_center_crop():
    """Eval = Resize((r, r)) bicubic (aspect squashed) then CenterCrop(s), as the official finetune code."""
    data = _jpeg(50, 90)
    out = T.eval_image_fn(224, 256, "bicubic")(T.decode_tensor(data), np.random.default_rng(0))
    ref = TF.center_crop(TF.resize(T.decode(data), [256, 256], InterpolationMode.BICUBIC), [224, 224])
    assert out.shape == (3, 224, 224)
    _close_to_pil(out, ref)


def test_finetune_fn_randaugment_shapes_and_seed_determinism():
    """timm's RandAugment pipeline gives uint8 (3, S, S), reproducible from the generator."""
    cfg = DataConfig(input_size=64, eval_resize=73, min_crop_scale=0.08, auto_augment="rand-m9-mstd0.5-inc1")
    fn = T.image_fn(cfg, "finetune")
    img = T.decode(_jpeg(70, 90))
    a, b = fn(img, np.random.default_rng(1)), fn(img, np.random.default_rng(1))
    c = fn(img, np.random.default_rng(2))
    assert a.shape == (3, 64, 64) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batch_transform_marks_corrupt_records_and_keeps_labels():
    """A garbage record becomes a zero image with label -1; the others keep their labels."""
    cfg = DataConfig(input_size=32, eval_resize=37)
    batch = {
        "image": np.array([_jpeg(seed=1), b"\xff\xd8 broken", _jpeg(seed=2)], dtype=object),
        "label": np.array([4, 5, 6]),
    }
    out = T.BatchTransform(cfg, "eval")(batch)
    assert out["image"].shape == (3, 3, 32, 32) and out["image"].dtype == np.uint8
    assert out["label"].tolist() == [4, -1, 6] and out["label"].dtype == np.int64
    assert out["image"][1].max() == 0 and out["image"][0].max() > 0


def test_batch_transform_seeded_is_reproducible_unseeded_is_not():
    cfg = DataConfig(input_size=32, eval_resize=37)
    batch = {"image": np.array([_jpeg(seed=i) for i in range(4)], dtype=object), "label": np.arange(4)}
    a = T.BatchTransform(cfg, "pretrain", seed=3)(batch)["image"]
    b = T.BatchTransform(cfg, "pretrain", seed=3)(batch)["image"]
    c = T.BatchTransform(cfg, "pretrain")(batch)["image"]
    d = T.BatchTransform(cfg, "pretrain")(batch)["image"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(c, d)


def test_normalize_maps_uint8_to_imagenet_standardised_floats():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    y = T.normalize(x, "cpu")
    mean, std = torch.tensor(T.IMAGENET_MEAN), torch.tensor(T.IMAGENET_STD)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 2, 2)
    torch.testing.assert_close(y[0, :, 0, 0], -mean / std)
    torch.testing.assert_close(y[1, :, 0, 0], (1 - mean) / std)


def test_random_erasing_on_normalised_batch():
    """reprob 1 erases one box per image with normal noise; reprob 0 leaves the batch alone."""
    x = torch.zeros(4, 3, 32, 32)
    erased = T.random_erasing(1.0, "cpu")(x.clone())
    assert all((erased[i] != 0).any() for i in range(4))
    torch.testing.assert_close(T.random_erasing(0.0, "cpu")(x.clone()), x)


def test_image_fn_rejects_unknown_mode_and_interpolation():
    with pytest.raises(ValueError, match="mode"):
        T.image_fn(DataConfig(), "train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interpolation"):
        T.pretrain_image_fn(32, 0.2, 0.5, "lanczos9")


@pytest.mark.parametrize(("cpus", "threads"), [(0.25, 1), (0.5, 1), (1.0, 1), (1.5, 1), (2.0, 2), (7.99, 7), (8.0, 8)])
def test_threads_come_from_the_ray_cpu_allotment(cpus, threads):
    """max(1, floor(cpus)): a fractional task or worker gets one thread, a whole-CPU one gets one per CPU."""
    assert T.threads_for(cpus) == threads


def test_decode_task_sizes_torch_threads_from_decode_cpus_not_the_environment(monkeypatch):
    """A 0.25-CPU decode task runs torch on 1 thread even when the driver exported OMP_NUM_THREADS=2."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = {"image": np.array([_jpeg(seed=1)], dtype=object), "label": np.array([3])}
        T.BatchTransform(DataConfig(input_size=32, decode_cpus=0.25), "eval")(batch)
        assert torch.get_num_threads() == 1
        T.BatchTransform(DataConfig(input_size=32, decode_cpus=2.0), "eval")(batch)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_rank_working_alone_borrows_its_node_ranks_threads_then_gives_them_back():
    """threads_of(cpus, ranks): ranks x threads_for(cpus) inside the block (rank 0's probe), the old count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with T.threads_of(0.5, 2) as threads:
            assert threads == torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError, match="probe failed"), T.threads_of(2.0, 3):
            assert torch.get_num_threads() == 6
            raise RuntimeError("probe failed")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

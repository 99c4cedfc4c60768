"""Pretraining monitors: linear probe, constant-predictor baseline, one-pass encoding, random-init baselines."""

import dataclasses

import pytest
import torch

from arm_platform import recipes
from arm_platform.models import build_model
from arm_platform.train.knn import knn_accuracy
from arm_platform.train.probes import (
    PIXELS,
    RANDOM_INIT,
    ConstantBaseline,
    PretrainMonitor,
    encode,
    fit_linear_head,
    init_head_from_probe,
    linear_probe_accuracy,
    random_init_model,
)


def _clusters(n_per_class: int, num_classes: int, noise: float, seed: int, dim: int = 16):
    centers = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)))
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    noise = noise * torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(seed))
    return centers[labels] + noise, labels


def test_linear_probe_is_perfect_on_separable_features_and_deterministic():
    train, train_y = _clusters(30, 5, 0.05, seed=1)
    test, test_y = _clusters(10, 5, 0.05, seed=2)
    acc = linear_probe_accuracy(train, train_y, test, test_y, num_classes=5)
    assert acc == {"acc1": pytest.approx(100.0), "acc5": pytest.approx(100.0)}
    assert linear_probe_accuracy(train, train_y, test, test_y, num_classes=5) == acc


def test_linear_probe_gives_chance_on_random_labels():
    train, _ = _clusters(100, 10, 1.0, seed=1)
    test, _ = _clusters(100, 10, 1.0, seed=2)
    gen = torch.Generator().manual_seed(3)
    acc = linear_probe_accuracy(
        train,
        torch.randint(0, 10, (len(train),), generator=gen),
        test,
        torch.randint(0, 10, (len(test),), generator=gen),
        num_classes=10,
    )
    assert 4.0 < acc["acc1"] < 17.0 and acc["acc5"] > acc["acc1"]


def test_linear_probe_reads_a_small_feature_that_knn_drowns_in_noise():
    """The label lives in one low-variance dimension among 63 loud ones: kNN (cosine) ~chance, linear probe ~100%."""
    gen = torch.Generator().manual_seed(0)

    def data(n):
        y = torch.randint(0, 2, (n,), generator=gen)
        x = 10 * torch.randn(n, 64, generator=gen)
        x[:, 0] = 0.1 * (2 * y - 1) + 0.01 * torch.randn(n, generator=gen)
        return x, y

    (train, train_y), (test, test_y) = data(400), data(200)
    linear = linear_probe_accuracy(train, train_y, test, test_y, num_classes=2)
    knn = knn_accuracy(train, train_y, test, test_y, num_classes=2, k=20, temperature=0.07)
    assert linear["acc1"] > 98.0 and knn["acc1"] < 65.0


def test_constant_baseline_is_the_mse_of_the_mean_predictor():
    """Streamed over uneven batches, it equals the MSE of predicting the per-(position, value) mean of all targets."""
    targets = torch.randn(13, 6, 5) * torch.linspace(0.5, 2.0, 5) + torch.arange(6.0)[:, None]
    baseline = ConstantBaseline()
    for chunk in targets.split([4, 1, 8]):
        baseline.update(chunk)
    mean_predictor = targets.mean(0, keepdim=True)
    assert baseline.loss() == pytest.approx(float(((targets - mean_predictor) ** 2).mean()), rel=1e-6)
    better_than_any_other = ((targets - (mean_predictor + 0.1)) ** 2).mean()
    assert baseline.loss() < float(better_than_any_other)


@pytest.fixture
def tiny_cfg():
    cfg = recipes.get("pretrain_tiny")
    model = dataclasses.replace(cfg.model, embed_dim=32, depth=2, decoder_dim=32, decoder_depth=1)
    return dataclasses.replace(cfg, model=model, precision="fp32")


def _batches(n_batches: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randn(4, 3, 32, 32, generator=gen), "label": torch.randint(0, 10, (4,), generator=gen)}
        for _ in range(n_batches)
    ]


def test_encode_reads_once_for_every_model_and_scores_the_first(tiny_cfg):
    """Features per model, labels in order, val_loss = mean model loss, constant baseline of the same targets."""
    trained, other = build_model(tiny_cfg.model, "pretrain"), build_model(tiny_cfg.model, "pretrain")
    batches = _batches(3, seed=0)
    feats, labels, stats = encode({"a": trained, "b": other}, batches, "fp32", losses=True)
    assert feats["a"].shape == feats["b"].shape == (12, 32) and not torch.allclose(feats["a"], feats["b"])
    assert torch.equal(labels, torch.cat([b["label"] for b in batches]))
    with torch.no_grad():
        outs = [trained(b["image"]) for b in batches]
    targets = torch.cat([o["target"] for o in outs])
    assert stats["val_loss"] == pytest.approx(sum(float(o["loss"]) for o in outs) / 3, rel=1e-5)
    assert stats["loss_constant_baseline"] == pytest.approx(float(targets.var(0, unbiased=False).mean()), rel=1e-5)


def test_random_init_model_is_the_runs_own_start_and_keeps_the_global_rng(tiny_cfg):
    torch.manual_seed(tiny_cfg.seed)
    start = build_model(tiny_cfg.model, "pretrain").state_dict()
    state = torch.random.get_rng_state()
    again = random_init_model(tiny_cfg, torch.device("cpu")).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(start[k], again[k]) for k in start)


def test_monitor_logs_baselines_once_and_warns_when_they_are_not_beaten(tiny_cfg):
    monitor = PretrainMonitor(tiny_cfg, torch.device("cpu"))
    torch.manual_seed(tiny_cfg.seed)
    model = build_model(tiny_cfg.model, "pretrain")  # untrained: exactly its random-init baseline
    probe, val = _batches(5, seed=1), _batches(3, seed=2)
    first = monitor(model, probe, val)
    names = {f"{p}_acc{k}" for p in ("knn", "probe") for k in (1, 5)}
    baselines = {f"{n}{suffix}" for n in names for suffix in (RANDOM_INIT, PIXELS)}
    assert set(first) == names | baselines | {"val_loss", "loss_constant_baseline"}
    for name in names:
        assert first[name] == first[f"{name}{RANDOM_INIT}"]  # same weights, same data
    pixels = [torch.cat([b["image"][:, :1].flatten(1) for b in batches]) for batches in (probe, val)]
    labels = [torch.cat([b["label"] for b in batches]) for batches in (probe, val)]
    by_hand = linear_probe_accuracy(pixels[0], labels[0], pixels[1], labels[1], num_classes=10)
    assert first[f"probe_acc1{PIXELS}"] == pytest.approx(by_hand["acc1"])  # the gray target channel, flattened
    warnings = monitor.warnings(first)  # kNN, linear probe, and the loss (random init is worse than a constant)
    assert sum("random-init encoder's" in w for w in warnings) == 2
    assert sum("constant predictor" in w for w in warnings) == 1
    assert first["val_loss"] > first["loss_constant_baseline"]
    assert set(monitor(model, probe, val)) == names | {"val_loss"}  # baselines only once per run
    beaten = {"knn_acc1": 101.0, "probe_acc1": 101.0, "val_loss": first["loss_constant_baseline"] - 1e-3}
    assert monitor.warnings(beaten) == []
    assert "constant predictor" in monitor.warnings({"val_loss": first["loss_constant_baseline"]})[0]


def test_fitted_head_applies_to_raw_features_and_matches_the_standardised_probe():
    """The standardisation is folded into (weight, bias): raw features give the probe's own predictions."""
    train, train_y = _clusters(30, 5, 0.4, seed=1)
    train = train * torch.linspace(0.1, 10.0, 16) + 3.0  # badly scaled, shifted features
    test, test_y = _clusters(10, 5, 0.4, seed=2)
    test = test * torch.linspace(0.1, 10.0, 16) + 3.0
    weight, bias = fit_linear_head(train, train_y, num_classes=5)
    assert weight.shape == (5, 16) and bias.shape == (5,)
    mean, std = train.mean(0), train.std(0)
    acc = linear_probe_accuracy(train, train_y, test, test_y, num_classes=5)
    pred = (test @ weight.t() + bias).argmax(1)
    assert 100 * pred.eq(test_y).float().mean().item() == pytest.approx(acc["acc1"])
    # the same logits as the head applied in the standardised space it was fitted in
    w_std = weight.t() * std[:, None]
    raw_logits = test @ weight.t() + bias
    torch.testing.assert_close((test - mean) / std @ w_std + bias + mean @ weight.t(), raw_logits, atol=1e-4, rtol=1e-4)


def test_lp_ft_head_init_makes_the_classifier_predict_like_a_probe_of_its_features(small_cfg):
    """init_head_from_probe: the classifier's own logits on labelled images become a fitted linear probe's; the
    encoder is untouched and the train mode restored."""
    cfg = small_cfg("finetune")
    model = build_model(dataclasses.replace(cfg.model, drop_path_rate=0.0), "finetune").train()
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(8)
    images = torch.randn(4, 3, 32, 32, generator=gen)[labels] + 0.3 * torch.randn(32, 3, 32, 32, generator=gen)
    batches = [{"image": images[i : i + 8], "label": labels[i : i + 8]} for i in range(0, 32, 8)]
    encoder = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    before = model.eval()(images).argmax(1).eq(labels).float().mean().item()
    model.train()
    fit = init_head_from_probe(model, batches, l2=1e-3, max_iter=100)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in encoder.items())
    with torch.no_grad():
        after = model.eval()(images).argmax(1).eq(labels).float().mean().item()
    assert fit["head_probe_train_acc1"] == pytest.approx(100 * after)
    assert after == 1.0 and before < 1.0  # 4 separable classes: the probe head fits them, the random one did not

"""Pretraining monitors that tell whether the encoder learned anything, each beside the baseline it must beat.

- kNN (`knn.knn_accuracy`) and a **linear probe** (multinomial logistic regression, full-batch L-BFGS on standardised
  frozen features) fitted on the probe split (labelled train images, eval transform) and scored on the val split:
  `knn_acc1`, `probe_acc1`.
- The same two probes on this run's **random-init** encoder (same seed, so the weights the run started from), and on
  the **raw pixels**, once per run: `knn_acc1_random_init`, `probe_acc1_random_init`, `*_pixels`. Untrained Mamba
  features are far from useless (random features of the pixels), so a trained probe must beat these, not zero.
- `val_loss`: the model's norm-pix loss on the val split, and `loss_constant_baseline` (once per run): the loss of
  the best constant predictor on the same images, i.e. the per-(position, value) mean of the normalised targets.
  It is below 1.0 because positions differ (dark borders): 0.82 on the Fashion-MNIST test images with the tiny
  recipe's gray target (`model.target_chans=1`; three normalised copies of the gray value would leave a fixed channel
  pattern a constant predicts, 0.66). A loss near it means the model predicts nothing beyond the average patch.
`PretrainMonitor.warnings` names every trained metric that does not beat its baseline.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from arm_platform.config import TrainConfig
from arm_platform.models import build_model
from arm_platform.train.engine import autocast, score_logits
from arm_platform.train.knn import knn_accuracy

RANDOM_INIT = "_random_init"
"""Metric suffix of the random-init encoder's probes."""
PIXELS = "_pixels"
"""Metric suffix of the probes on raw pixels (the normalised input flattened): what any encoder must add to."""


class PixelFeatures(nn.Module):
    """The no-encoder baseline: `embed(imgs)` = the normalised target channels flattened, (B, C' * H * W)."""

    def __init__(self, channels: int | None) -> None:
        super().__init__()
        self.channels = channels

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        return imgs[:, : self.channels].flatten(1)


@torch.no_grad()
def fit_linear_head(
    feats: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    l2: float = 1e-3,
    max_iter: int = 100,
    smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic-regression head on frozen features, as an `nn.Linear`'s (weight (C, D), bias (C,)); deterministic.

    Features are standardised with their per-dimension mean / std; the head minimises mean cross-entropy (with
    `smoothing` label smoothing) + l2 / 2 * |W|^2 (bias unpenalised, W in the standardised space) by full-batch L-BFGS
    from zero weights, on the features' device. The standardisation is folded into the returned weights, so they
    apply to raw features.

    Args:
        feats: (N, D); labels: (N,) in [0, num_classes).
    """
    mean, std = feats.float().mean(0), feats.float().std(0).clamp_min(1e-6)
    x = (feats.float() - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ weight + bias
        loss = F.cross_entropy(logits, labels.long(), label_smoothing=smoothing) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = weight.detach() / std[:, None]  # ((f - mean) / std) @ W + b = f @ (W / std) + (b - mean @ (W / std))
    return w.t().contiguous(), bias.detach() - mean @ w


@torch.no_grad()
def linear_probe_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    l2: float = 1e-3,
    max_iter: int = 100,
) -> dict[str, float]:
    """Top-1 / top-5 (percent) of `fit_linear_head` fitted on (N, D) train features, scored on (M, D) test ones."""
    weight, bias = fit_linear_head(train_feats, train_labels, num_classes=num_classes, l2=l2, max_iter=max_iter)
    scores = score_logits(test_feats.float() @ weight.t() + bias, test_labels)
    return {k: scores[k] for k in ("acc1", "acc5")}


@torch.no_grad()
def init_head_from_probe(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    l2: float,
    max_iter: int,
    smoothing: float = 0.0,
) -> dict[str, float]:
    """LP-FT's first step: set a classifier's `head` to the linear probe of its own frozen pooled features.

    Fit with the finetune criterion's label `smoothing`: the head starts at that loss's minimum for the frozen
    encoder. Without it the probe's logits grow large (1,000 near-separable images), and a smoothed loss then starts
    at ~3.7 instead of ~0.7: large early gradients reach the encoder, which LP-FT exists to avoid.

    model: a timm-style classifier (`forward_features`, `forward_head(x, pre_logits=True)` -> (B, D), `head`
    Linear(D, C)); batches: labelled images with the eval transform. Returns the head's train-set top-1 / top-5 and
    its train loss (`head_probe_train_loss`, smoothed cross-entropy).
    """
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for batch in batches:
        feats.append(model.forward_head(model.forward_features(batch["image"]), pre_logits=True).float())
        labels.append(batch["label"])
    if not feats:
        raise ValueError("head_init='probe' got no labelled images (empty train split)")
    x, y = torch.cat(feats), torch.cat(labels)
    classes = model.head.out_features
    weight, bias = fit_linear_head(x, y, num_classes=classes, l2=l2, max_iter=max_iter, smoothing=smoothing)
    model.head.weight.copy_(weight)
    model.head.bias.copy_(bias)
    model.train(was_training)
    logits = model.head(x)
    loss = F.cross_entropy(logits, y.long(), label_smoothing=smoothing).item()
    scores = score_logits(logits, y)
    return {f"head_probe_train_{k}": scores[k] for k in ("acc1", "acc5")} | {"head_probe_train_loss": loss}


class ConstantBaseline:
    """Streaming MSE of the best constant predictor of targets (B, N, P): the per-(n, p) mean over all images."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | float = 0.0
        self.sum_sq: torch.Tensor | float = 0.0

    def update(self, target: torch.Tensor) -> None:
        """target: (B, N, P) normalised patches of B images."""
        t = target.detach().double().cpu()
        self.count += t.shape[0]
        self.sum = self.sum + t.sum(0)
        self.sum_sq = self.sum_sq + t.pow(2).sum(0)

    def loss(self) -> float:
        """mean over (n, p) of E[t^2] - E[t]^2: the MSE of predicting E[t] at every position."""
        if not self.count:
            raise ValueError("constant baseline got no targets")
        mean = self.sum / self.count
        return float((self.sum_sq / self.count - mean.pow(2)).mean())


@torch.no_grad()
def encode(
    models: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    precision: str = "bf16",
    *,
    losses: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
    """One pass over `batches` for several models (the data is read once).

    Returns:
        ({name: features (N, D) float32 on CPU} from `model.embed`, labels (N,), losses) where losses (only with
        `losses`) is {"val_loss": mean norm-pix loss of the first model, "loss_constant_baseline": see
        `ConstantBaseline`}.
    """
    for model in models.values():
        model.eval()
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    labels, loss_sum, constant = [], 0.0, ConstantBaseline()
    first = next(iter(models.values()))
    for batch in batches:
        images = batch["image"]
        with autocast(images.device, precision):
            for name, model in models.items():
                feats[name].append(model.embed(images).float().cpu())
            if losses:
                out = first(images)
                loss_sum += float(out["loss"]) * len(images)
                constant.update(out["target"])
        labels.append(batch["label"].cpu())
    if not labels:
        raise ValueError("probe got no batches (empty probe or val dataset)")
    labels_t = torch.cat(labels)
    stats = {"val_loss": loss_sum / len(labels_t), "loss_constant_baseline": constant.loss()} if losses else {}
    return {name: torch.cat(f) for name, f in feats.items()}, labels_t, stats


def random_init_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The pretraining model as this run initialised it (seed cfg.seed, as world rank 0); global RNGs untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, cfg.task)
    return model.to(device).eval()


class PretrainMonitor:
    """Probes the trained encoder on every call; on the first call also its random-init baselines (once per run)."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.baselines: dict[str, float] = {}

    def __call__(
        self, model: nn.Module, probe_batches: Iterable[dict], val_batches: Iterable[dict]
    ) -> dict[str, float]:
        """{knn_acc1, knn_acc5, probe_acc1, probe_acc5, val_loss} (+ the *_random_init, *_pixels and
        loss_constant_baseline metrics on the first call). probe_batches: labelled bank (the probe split);
        val_batches: queries."""
        first = not self.baselines and self.cfg.tracking.random_init_baseline
        baselines = {
            RANDOM_INIT: random_init_model(self.cfg, self.device),
            PIXELS: PixelFeatures(self.cfg.model.target_chans),
        }
        models = {"": model} | (baselines if first else {})
        bank, bank_labels, _ = encode(models, probe_batches, self.cfg.precision)
        query, query_labels, losses = encode(models, val_batches, self.cfg.precision, losses=True)
        out = {"val_loss": losses["val_loss"]}
        for suffix in models:
            out |= self._probes(bank[suffix], bank_labels, query[suffix], query_labels, suffix)
        if first:
            out["loss_constant_baseline"] = losses["loss_constant_baseline"]
            self.baselines = {
                k: v for k, v in out.items() if k.endswith((RANDOM_INIT, PIXELS)) or k.startswith("loss_")
            }
        return out

    def _probes(
        self, bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, labels: torch.Tensor, suffix: str
    ) -> dict[str, float]:
        tcfg, classes = self.cfg.tracking, self.cfg.model.num_classes
        knn = knn_accuracy(
            bank, bank_labels, query, labels, num_classes=classes, k=tcfg.knn_k, temperature=tcfg.knn_temperature
        )
        on = self.device  # the head trains where the model runs (a GPU for the ImageNet recipes)
        linear = linear_probe_accuracy(
            bank.to(on),
            bank_labels.to(on),
            query.to(on),
            labels.to(on),
            num_classes=classes,
            l2=tcfg.linear_probe_l2,
            max_iter=tcfg.linear_probe_max_iter,
        )
        return {f"{name}_{k}{suffix}": v for name, acc in (("knn", knn), ("probe", linear)) for k, v in acc.items()}

    def warnings(self, metrics: dict[str, float]) -> list[str]:
        """One line per trained metric in `metrics` that does not beat its baseline (empty before any baseline)."""
        out = []
        for name, what in (("knn_acc1", "kNN"), ("probe_acc1", "linear probe")):
            for suffix, of in ((RANDOM_INIT, "the random-init encoder's"), (PIXELS, "raw pixels'")):
                base = self.baselines.get(f"{name}{suffix}")
                if name in metrics and base is not None and metrics[name] <= base:
                    out.append(f"{what} top-1 {metrics[name]:.1f}% does not beat {of} {base:.1f}%")
        base = self.baselines.get("loss_constant_baseline")
        if "val_loss" in metrics and base is not None and metrics["val_loss"] >= base:
            out.append(f"val loss {metrics['val_loss']:.4f} does not beat the best constant predictor's {base:.4f}")
        return out

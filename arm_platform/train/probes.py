"""Pretraining monitors that tell whether the encoder learned anything, each beside the baseline it must beat.

- kNN (`knn.knn_accuracy`) and a **linear probe** (multinomial logistic regression, full-batch L-BFGS on standardised
  frozen features) fitted on the probe split (labelled train images, eval transform) and scored on the val split:
  `knn_acc1`, `probe_acc1`.
- The same two probes on this run's **random-init** encoder (same seed, so the weights the run started from), once
  per run: `knn_acc1_random_init`, `probe_acc1_random_init`. Untrained Mamba features are far from useless (random
  features of the pixels), so a trained probe must beat these numbers, not zero.
- `val_loss`: the model's norm-pix loss on the val split, and `loss_constant_baseline` (once per run): the loss of
  the best constant predictor on the same images, i.e. the per-(position, value) mean of the normalised targets.
  Grayscale data copied to RGB leaves a fixed channel pattern in every normalised patch, so this is ~0.67 on
  Fashion-MNIST, not 1.0: a loss near it means the model predicts nothing beyond that pattern.
`PretrainMonitor.warnings` names every trained metric that does not beat its baseline.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from arm_platform.config import TrainConfig
from arm_platform.models import build_model
from arm_platform.train.engine import autocast
from arm_platform.train.knn import knn_accuracy

RANDOM_INIT = "_random_init"
"""Metric suffix of the random-init encoder's probes."""


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
    """Top-1 / top-5 (percent) of a logistic-regression head fitted on frozen features; deterministic.

    Features are standardised with the train set's per-dimension mean / std; the head minimises mean cross-entropy
    + l2 / 2 * |W|^2 (bias unpenalised) by full-batch L-BFGS from zero weights, on the features' device.

    Args:
        train_feats: (N, D); train_labels: (N,) in [0, num_classes).
        test_feats: (M, D); test_labels: (M,).
    """
    mean, std = train_feats.float().mean(0), train_feats.float().std(0).clamp_min(1e-6)
    x = (train_feats.float() - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, train_labels.long()) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    logits = ((test_feats.float() - mean) / std) @ weight + bias
    pred = logits.topk(min(5, num_classes), dim=1).indices
    target = test_labels.long()[:, None]
    total = max(len(target), 1)
    top1 = pred[:, :1].eq(target).sum().item()
    top5 = pred.eq(target).any(dim=1).sum().item()
    return {"acc1": 100 * top1 / total, "acc5": 100 * top5 / total}


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
        """{knn_acc1, knn_acc5, probe_acc1, probe_acc5, val_loss} (+ the *_random_init and loss_constant_baseline
        metrics on the first call). probe_batches: labelled bank (the probe split); val_batches: queries."""
        first = not self.baselines and self.cfg.tracking.random_init_baseline
        models = {"": model} | ({RANDOM_INIT: random_init_model(self.cfg, self.device)} if first else {})
        bank, bank_labels, _ = encode(models, probe_batches, self.cfg.precision)
        query, query_labels, losses = encode(models, val_batches, self.cfg.precision, losses=True)
        out = {"val_loss": losses["val_loss"]}
        for suffix in models:
            out |= self._probes(bank[suffix], bank_labels, query[suffix], query_labels, suffix)
        if first:
            out["loss_constant_baseline"] = losses["loss_constant_baseline"]
            self.baselines = {k: v for k, v in out.items() if k.endswith(RANDOM_INIT) or k.startswith("loss_")}
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
            base = self.baselines.get(f"{name}{RANDOM_INIT}")
            if name in metrics and base is not None and metrics[name] <= base:
                out.append(f"{what} top-1 {metrics[name]:.1f}% does not beat the random-init encoder's {base:.1f}%")
        base = self.baselines.get("loss_constant_baseline")
        if "val_loss" in metrics and base is not None and metrics["val_loss"] >= base:
            out.append(f"val loss {metrics['val_loss']:.4f} does not beat the best constant predictor's {base:.4f}")
        return out

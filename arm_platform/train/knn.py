"""Weighted k-nearest-neighbour probe of frozen features (DINO `eval_knn.py`): cosine similarity, top-k neighbours
vote with weight exp(sim / T). Lets pretraining report representation quality, which the official code cannot.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from arm_platform.train.engine import autocast


@torch.no_grad()
def extract_features(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], precision: str = "bf16"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on CPU, labels (N,)) from `model.embed(images)`."""
    model.eval()
    feats, labels = [], []
    for batch in batches:
        with autocast(batch["image"].device, precision):
            feats.append(model.embed(batch["image"]).float().cpu())
        labels.append(batch["label"].cpu())
    if not feats:
        raise ValueError("kNN probe got no batches (empty probe or val dataset)")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int,
    temperature: float,
    chunk: int = 1024,
) -> dict[str, float]:
    """Top-1 / top-5 (percent) of a weighted kNN classifier.

    Args:
        train_feats: (N, D) memory bank; train_labels: (N,).
        test_feats: (M, D) queries; test_labels: (M,).
    """
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, bank.shape[0])
    correct1 = correct5 = 0
    for start in range(0, test_feats.shape[0], chunk):
        query = F.normalize(test_feats[start : start + chunk].float(), dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1)  # (m, k)
        weights = (sim / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes).scatter_add_(1, train_labels[idx], weights)
        pred = votes.topk(min(5, num_classes), dim=1).indices
        target = test_labels[start : start + chunk, None]
        correct1 += pred[:, :1].eq(target).sum().item()
        correct5 += pred.eq(target).any(dim=1).sum().item()
    total = max(test_feats.shape[0], 1)
    return {"acc1": 100 * correct1 / total, "acc5": 100 * correct5 / total}

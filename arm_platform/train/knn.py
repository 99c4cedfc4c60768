"""Weighted k-nearest-neighbour probe of frozen features (DINO `eval_knn.py`): cosine similarity, top-k neighbours
vote with weight exp(sim / T). Lets pretraining report representation quality, which the official code cannot;
`probes.PretrainMonitor` extracts the features and runs it beside a linear probe and random-init baselines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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

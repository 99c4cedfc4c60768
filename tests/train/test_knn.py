"""Weighted kNN probe: perfect on separable features, chance-level on noise."""

import pytest
import torch

from arm_platform.train.knn import knn_accuracy


def _clusters(n_per_class: int, num_classes: int, noise: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(num_classes, 16, generator=torch.Generator().manual_seed(0)))
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centers[labels] + noise * torch.randn(len(labels), 16, generator=gen), labels


def test_separable_features_are_classified_perfectly():
    bank, bank_y = _clusters(30, 5, 0.05, seed=1)
    query, query_y = _clusters(10, 5, 0.05, seed=2)
    acc = knn_accuracy(bank, bank_y, query, query_y, num_classes=5, k=20, temperature=0.07, chunk=7)
    assert acc == {"acc1": pytest.approx(100.0), "acc5": pytest.approx(100.0)}


def test_random_labels_give_chance_accuracy():
    bank, _ = _clusters(200, 10, 1.0, seed=1)
    query, _ = _clusters(100, 10, 1.0, seed=2)
    gen = torch.Generator().manual_seed(3)
    acc = knn_accuracy(
        bank,
        torch.randint(0, 10, (len(bank),), generator=gen),
        query,
        torch.randint(0, 10, (len(query),), generator=gen),
        num_classes=10,
        k=20,
        temperature=0.07,
    )
    assert 4.0 < acc["acc1"] < 20.0 and acc["acc5"] > acc["acc1"]

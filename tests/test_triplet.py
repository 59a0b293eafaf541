"""The triplet loss and its batch-all / batch-hard / semi-hard mining against brute-force loops."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mm_lightning.losses.triplet import (
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    distance_matrix,
    mined_triplet_loss,
    semi_hard_triplet_loss,
    triplet_loss,
)


def _batch(seed: int = 0, n: int = 9, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 1])[:n]


def _d(x: torch.Tensor, i: int, j: int, squared: bool) -> float:
    d2 = float(((x[i] - x[j]) ** 2).sum())
    return d2 if squared else d2**0.5


def test_triplet_loss_matches_facenet_formula():
    a, p, n = _batch(0)[0][:3], _batch(1)[0][:3], _batch(2)[0][:3]
    margin = 0.5
    expected = [max(0.0, float(((a[i] - p[i]) ** 2).sum() - ((a[i] - n[i]) ** 2).sum()) + margin) for i in range(3)]
    assert torch.allclose(triplet_loss(a, p, n, margin, reduction="none"), torch.tensor(expected), atol=1e-5)
    assert torch.isclose(triplet_loss(a, p, n, margin), torch.tensor(expected).mean(), atol=1e-5)
    assert triplet_loss(a, a, a + 10, margin).item() == 0.0  # easy triplets cost nothing


@pytest.mark.parametrize("margin", [0.05, 0.3, 2.0])
def test_unsquared_triplet_loss_equals_torch(margin):
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(16, 8, generator=g).requires_grad_(True) for _ in range(3))
    ours = triplet_loss(a, p, n, margin, squared=False)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in (a, p, n)]
    ref = F.triplet_margin_loss(*ref_inputs, margin=margin)
    assert torch.allclose(ours, ref, atol=1e-7)
    ours.backward()
    ref.backward()
    for mine, theirs in zip((a, p, n), ref_inputs):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-7)
    assert torch.allclose(
        triplet_loss(a, p, n, margin, squared=False, reduction="none"),
        F.triplet_margin_loss(a, p, n, margin=margin, reduction="none"), atol=1e-7,
    )


@pytest.mark.parametrize("squared", [True, False])
def test_distance_matrix(squared):
    x, _ = _batch(4)
    expected = torch.cdist(x, x) ** (2 if squared else 1)
    assert torch.allclose(distance_matrix(x, squared), expected, atol=1e-4)
    # a repeated row: distance 0 with a finite gradient
    x = torch.cat([x, x[:1]]).requires_grad_(True)
    distance_matrix(x, squared).sum().backward()
    assert torch.isfinite(x.grad).all()


def _triplets(labels: torch.Tensor):
    n = len(labels)
    for a, p, q in itertools.product(range(n), repeat=3):
        if a != p and labels[a] == labels[p] and labels[q] != labels[a]:
            yield a, p, q


@pytest.mark.parametrize("squared", [True, False])
def test_batch_all_is_mean_over_active_triplets(squared):
    x, labels = _batch(5)
    margin = 1.0
    losses = [max(0.0, _d(x, a, p, squared) - _d(x, a, q, squared) + margin) for a, p, q in _triplets(labels)]
    active = [v for v in losses if v > 0]
    assert 0 < len(active) < len(losses)
    assert abs(batch_all_triplet_loss(x, labels, margin, squared).item() - sum(active) / len(active)) < 1e-4


@pytest.mark.parametrize("squared", [True, False])
def test_batch_hard_takes_farthest_positive_and_nearest_negative(squared):
    x, labels = _batch(6)
    labels = torch.cat([labels, torch.tensor([3])])  # an anchor without positive is left out
    x = torch.cat([x, torch.randn(1, x.shape[1])])
    margin = 0.5
    per_anchor = []
    for a in range(len(labels)):
        pos = [_d(x, a, p, squared) for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [_d(x, a, q, squared) for q in range(len(labels)) if labels[q] != labels[a]]
        if pos and neg:
            per_anchor.append(max(0.0, max(pos) - min(neg) + margin))
    expected = sum(per_anchor) / len(per_anchor)
    assert abs(batch_hard_triplet_loss(x, labels, margin, squared).item() - expected) < 1e-4


@pytest.mark.parametrize("squared", [True, False])
def test_semi_hard_picks_nearest_negative_beyond_the_positive(squared):
    x, labels = _batch(7)
    margin = 0.5
    losses = []
    for a in range(len(labels)):
        negs = [q for q in range(len(labels)) if labels[q] != labels[a]]
        for p in range(len(labels)):
            if p == a or labels[p] != labels[a]:
                continue
            d_ap = _d(x, a, p, squared)
            farther = [_d(x, a, q, squared) for q in negs if _d(x, a, q, squared) > d_ap]
            d_an = min(farther) if farther else max(_d(x, a, q, squared) for q in negs)
            losses.append(max(0.0, d_ap - d_an + margin))
    expected = sum(losses) / len(losses)
    assert abs(semi_hard_triplet_loss(x, labels, margin, squared).item() - expected) < 1e-4


@pytest.mark.parametrize("mining", ["batch_all", "batch_hard", "semi_hard"])
def test_mined_losses_train_and_reject_bad_input(mining):
    x, labels = _batch(8)
    x.requires_grad_(True)
    loss = mined_triplet_loss(x, labels, 0.2, True, mining)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # a batch with a single class has no triplets: 0, not NaN
    assert mined_triplet_loss(x, torch.zeros(len(labels), dtype=torch.long), 0.2, True, mining).item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        mined_triplet_loss(x, labels[:3], 0.2, True, mining)


def test_unknown_mining_is_named():
    x, labels = _batch(0)
    with pytest.raises(ValueError, match="hardest"):
        mined_triplet_loss(x, labels, mining="hardest")

"""The triplet loss (FaceNet) and its online mining strategies within a labelled batch.

Pure functions on tensors. ``d(x, y)`` is the squared Euclidean distance by default (as in
FaceNet, Schroff et al. 2015), or the Euclidean distance with ``squared=False`` (as
``torch.nn.TripletMarginLoss``).

Mining (Hermans, Beyer and Leibe 2017, "In Defense of the Triplet Loss"; FaceNet) picks
triplets ``(a, p, n)`` from one batch of embeddings with labels: ``p`` shares ``a``'s label
(``p != a``), ``n`` does not. Selection runs on the distance matrix without gradient;
the loss is then differentiated through the selected distances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_lightning.losses.contrastive import _reduce

MINING = ("batch_all", "batch_hard", "semi_hard")


def triplet_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float = 0.2,
    squared: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Triplet loss on given triplets::

        L_i = max(0, d(a_i, p_i) - d(a_i, n_i) + margin)
        L   = mean_i L_i                                  (reduction="mean")

    ``squared=True`` (default): ``d(x, y) = ||x - y||_2^2`` as in FaceNet.
    ``squared=False``: ``d(x, y) = ||x - y + eps||_2`` with ``eps = 1e-6``, exactly
    ``torch.nn.functional.triplet_margin_loss`` (which adds the same ``eps``).

    Args:
        anchor: ``(N, D)`` anchors.
        positive: ``(N, D)`` embeddings of the anchors' class.
        negative: ``(N, D)`` embeddings of other classes.
        margin: the required gap between negative and positive distance (>= 0).
        squared: squared Euclidean distance (FaceNet) or Euclidean distance.
        reduction: ``mean``, ``sum`` or ``none`` (per triplet).
    """
    if not (anchor.shape == positive.shape == negative.shape):
        raise ValueError(
            f"anchor, positive and negative must have one shape, got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if squared:
        d_ap = (anchor - positive).pow(2).sum(-1)
        d_an = (anchor - negative).pow(2).sum(-1)
    else:
        d_ap = F.pairwise_distance(anchor, positive, p=2.0, eps=1e-6)
        d_an = F.pairwise_distance(anchor, negative, p=2.0, eps=1e-6)
    return _reduce(F.relu(d_ap - d_an + margin), reduction)


def distance_matrix(x: torch.Tensor, squared: bool = True) -> torch.Tensor:
    """All pairwise distances ``D_ij = ||x_i - x_j||^2`` (or ``||x_i - x_j||``) of the rows of ``x``.

    Computed as ``|x_i|^2 - 2 x_i.x_j + |x_j|^2`` (clamped at 0, exact 0 on the diagonal); the
    square root has a finite (zero) gradient where two rows coincide.
    """
    sq = x.pow(2).sum(-1)
    d2 = (sq[:, None] - 2.0 * x @ x.T + sq[None, :]).clamp_min(0.0)
    d2 = d2 * (1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype))
    if squared:
        return d2
    return d2.clamp_min(1e-16).sqrt() * (d2 > 0).to(x.dtype)


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``positive[a, p]``: same label and ``a != p``; ``negative[a, n]``: different label."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def batch_all_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, squared: bool = True
) -> torch.Tensor:
    """Batch-all mining: every valid triplet of the batch, averaged over those with positive loss::

        l_apn = max(0, D_ap - D_an + margin)   for all a, p != a with y_p = y_a, n with y_n != y_a
        L     = sum l_apn / #{l_apn > 0}

    Averaging over the active (non-zero) triplets only (Hermans et al.'s "BA != 0") keeps
    the gradient from fading as most triplets become easy. 0 when no triplet is active.
    """
    d = distance_matrix(embeddings, squared)
    pos, neg = _masks(labels)
    loss = F.relu(d[:, :, None] - d[:, None, :] + margin)  # [a, p, n]
    valid = pos[:, :, None] & neg[:, None, :]
    loss = loss * valid.to(loss.dtype)
    active = (loss > 1e-16).sum()
    return loss.sum() / active.clamp_min(1).to(loss.dtype)


def batch_hard_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, squared: bool = True
) -> torch.Tensor:
    """Batch-hard mining: for each anchor its farthest positive and nearest negative::

        L = mean_a max(0, max_{p: y_p = y_a, p != a} D_ap - min_{n: y_n != y_a} D_an + margin)

    over the anchors that have at least one positive and one negative in the batch (0 if none).
    """
    d = distance_matrix(embeddings, squared)
    pos, neg = _masks(labels)
    ok = pos.any(1) & neg.any(1)
    if not ok.any():
        return embeddings.sum() * 0.0
    hardest_pos = d.masked_fill(~pos, float("-inf")).amax(1)
    hardest_neg = d.masked_fill(~neg, float("inf")).amin(1)
    return F.relu(hardest_pos - hardest_neg + margin)[ok].mean()


def semi_hard_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, squared: bool = True
) -> torch.Tensor:
    """Semi-hard mining (FaceNet): for each positive pair the nearest negative that is farther than the positive::

        n*(a, p) = argmin_{n: y_n != y_a, D_an > D_ap} D_an     (semi-hard negative)
                   argmax_{n: y_n != y_a} D_an                  (if no negative is farther than p)
        L = mean_{(a, p): y_p = y_a, p != a} max(0, D_ap - D_{a n*(a,p)} + margin)

    The fallback is the farthest negative, as in TensorFlow Addons' ``triplet_semihard_loss``.
    Averaged over the positive pairs of anchors that have a negative (0 if none).
    """
    d = distance_matrix(embeddings, squared)
    pos, neg = _masks(labels)
    pairs = pos & neg.any(1, keepdim=True)
    if not pairs.any():
        return embeddings.sum() * 0.0
    with torch.no_grad():
        d_ap = d[:, :, None]  # [a, p, 1]
        d_an = d[:, None, :]  # [a, 1, n]
        negs = neg[:, None, :]
        farther = negs & (d_an > d_ap)  # [a, p, n]
        semi = d_an.expand_as(farther).masked_fill(~farther, float("inf")).argmin(-1)
        fallback = d.masked_fill(~neg, float("-inf")).argmax(1, keepdim=True).expand_as(semi)
        chosen = torch.where(farther.any(-1), semi, fallback)  # [a, p] -> index of n
    d_an_chosen = d.gather(1, chosen)  # [a, p]: D[a, chosen[a, p]]
    loss = F.relu(d - d_an_chosen + margin)
    return loss[pairs].mean()


def mined_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, squared: bool = True, mining: str = "batch_hard"
) -> torch.Tensor:
    """Triplet loss of a labelled batch with the chosen ``mining``: ``batch_all``, ``batch_hard`` or ``semi_hard``
    (see the functions of the same name for their formulas)."""
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings but {labels.shape[0]} labels")
    if mining == "batch_all":
        return batch_all_triplet_loss(embeddings, labels, margin, squared)
    if mining == "batch_hard":
        return batch_hard_triplet_loss(embeddings, labels, margin, squared)
    if mining == "semi_hard":
        return semi_hard_triplet_loss(embeddings, labels, margin, squared)
    raise ValueError(f"mining must be one of {', '.join(MINING)}, got {mining!r}")

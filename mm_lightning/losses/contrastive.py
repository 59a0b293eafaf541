"""Contrastive losses: the pairwise margin loss, SimCLR's NT-Xent and MoCo's InfoNCE with a queue.

Pure functions on tensors (no models, no Lightning). Embeddings are rows: ``(N, D)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_lightning.distributed import all_gather_with_grad, is_distributed, rank

REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def contrastive_loss(
    x1: torch.Tensor, x2: torch.Tensor, same: torch.Tensor, margin: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """Pairwise margin ("contrastive") loss of Hadsell, Chopra and LeCun (2006).

    For each pair ``i`` with Euclidean distance ``d_i = ||x1_i - x2_i||_2`` and ``y_i = same_i``::

        L_i = y_i * d_i^2  +  (1 - y_i) * max(0, margin - d_i)^2
        L   = mean_i L_i                      (reduction="mean")

    Positive pairs are pulled together; negative pairs are pushed apart only until they
    are ``margin`` apart, after which they cost (and pull) nothing.

    Why the margin: the seed's unbounded form ``L = d_pos - d_neg`` has no minimum. It
    keeps decreasing as negatives move further apart, so the cheapest way down is to
    scale every embedding up: ``d_neg`` grows without bound, the loss runs to minus
    infinity and the weights diverge (and even with normalised embeddings every
    negative, however far, keeps its full gradient). The hinge ``max(0, margin - d)``
    bounds the negative term below by 0, so the loss is bounded below by 0 and
    negatives that are already far enough stop contributing.

    Args:
        x1: embeddings ``(N, D)`` of the first item of each pair.
        x2: embeddings ``(N, D)`` of the second item.
        same: ``(N,)`` 1/True where the pair is positive (same class), 0/False otherwise.
        margin: distance beyond which negative pairs cost nothing (> 0).
        reduction: ``mean``, ``sum`` or ``none`` (per pair).
    """
    if x1.shape != x2.shape:
        raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    y = same.to(x1.dtype)
    d2 = (x1 - x2).pow(2).sum(-1)
    d = d2.clamp_min(1e-12).sqrt()  # clamp: finite gradient at d = 0
    loss = y * d2 + (1.0 - y) * F.relu(margin - d).pow(2)
    return _reduce(loss, reduction)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = False) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020).

    The ``2N`` views ``u = normalize([z1; z2])`` (``u_i`` and ``u_{i+N}`` are the two views
    of sample ``i``), with ``s_ij = u_i . u_j`` their cosine similarity::

        l_i = -log( exp(s_{i,p(i)} / T) / sum_{k != i} exp(s_ik / T) )
        L   = 1/(2N) * sum_i l_i

    where ``p(i)`` is the other view of ``i``: each anchor is classified against its
    positive and the other ``2N - 2`` views (the negatives).

    With ``gather=True`` inside a process group, the views of all ranks are gathered with
    gradient (:func:`~mm_lightning.distributed.all_gather_with_grad`): each rank's anchors
    are its own ``2n`` views, its negatives are the ``2Wn - 2`` views of the global batch,
    and the returned loss is the mean over the local anchors. Averaged over ranks (as DDP
    averages gradients) this is exactly the loss and gradient of one process holding the
    whole batch.

    Args:
        z1: projections ``(N, D)`` of the first views.
        z2: projections ``(N, D)`` of the second views, row ``i`` the same sample as ``z1[i]``.
        temperature: the softmax temperature ``T`` (> 0).
        gather: gather negatives from every rank (with gradient) when running distributed.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    u1, u2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    anchors = torch.cat([u1, u2])  # (2n, D), the local anchors
    if gather and is_distributed():
        g1, g2 = all_gather_with_grad(u1), all_gather_with_grad(u2)
        offset = rank() * n
    else:
        g1, g2, offset = u1, u2, 0
    total = g1.shape[0]  # N, the global batch
    candidates = torch.cat([g1, g2])  # (2N, D)
    logits = anchors @ candidates.T / temperature  # (2n, 2N)
    local = torch.arange(n, device=z1.device) + offset
    self_index = torch.cat([local, local + total])  # where each anchor sits among the candidates
    positive = torch.cat([local + total, local])
    logits = logits.masked_fill(F.one_hot(self_index, 2 * total).bool(), float("-inf"))
    return F.cross_entropy(logits, positive)


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo's InfoNCE loss (He et al. 2020; MoCo v2, Chen et al. 2020) with a queue of negatives.

    With ``q`` and ``k`` L2-normalised (done here) and the queue rows ``n_j`` (``(K, D)``,
    already normalised keys of earlier batches)::

        logits_i = [ q_i . k_i,  q_i . n_1, ..., q_i . n_K ] / T
        L        = mean_i CrossEntropy(logits_i, target = 0)

    i.e. ``-log( exp(q.k+/T) / (exp(q.k+/T) + sum_j exp(q.n_j/T)) )``. ``k`` and ``queue``
    come from the momentum (key) encoder and are treated as constants: no gradient flows
    into them.

    Args:
        q: queries ``(N, D)`` from the query encoder.
        k: positive keys ``(N, D)`` from the key encoder, row ``i`` another view of ``q[i]``.
        queue: negatives ``(K, D)``.
        temperature: the softmax temperature ``T`` (> 0).
    """
    if q.shape != k.shape or q.ndim != 2:
        raise ValueError(f"q and k must both be (N, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must be (K, {q.shape[1]}), got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q = F.normalize(q, dim=-1)
    k = F.normalize(k.detach(), dim=-1)
    positive = (q * k).sum(-1, keepdim=True)  # (N, 1)
    negative = q @ queue.detach().to(q.dtype).T  # (N, K)
    logits = torch.cat([positive, negative], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)

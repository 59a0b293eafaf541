"""Image-text contrastive losses: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss.

Both take L2-normalised features and the already-exponentiated temperature (open_clip's
``ClipLoss`` convention: the model owns ``logit_scale`` as a log and passes ``logit_scale.exp()``).
Across ranks they score the local batch against the features of all ranks, gathered with
gradient (:func:`mm_lightning.distributed.all_gather_with_grad`), so that with DDP's gradient
averaging a run on W ranks of n samples trains exactly like one process on the global batch
of N = W n samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_lightning.distributed import all_gather_no_grad, all_gather_with_grad, rank, world_size


def _gather(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    if world_size() == 1:
        return x
    if with_grad:
        return all_gather_with_grad(x)
    # Without gradient through the other ranks' features: keep the local slice differentiable.
    gathered = list(all_gather_no_grad(x.detach()).chunk(world_size()))
    gathered[rank()] = x
    return torch.cat(gathered, dim=0)


def clip_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits_per_image, logits_per_text, labels)`` of the global batch, as :func:`clip_loss` scores them.

    On one process: ``N x N`` logits, labels ``0..N-1``. On W ranks: all features are gathered;
    without ``local_loss`` every rank builds the full ``N x N`` logits; with ``local_loss`` it scores
    only its ``n`` local rows against all ``N`` columns (``n x N``), labels offset by ``rank * n``.
    """
    n = image_features.shape[0]
    if text_features.shape[0] != n:
        raise ValueError(f"clip loss needs as many texts as images, got {n} images and {text_features.shape[0]} texts")
    if not gather or world_size() == 1:
        all_image, all_text, offset = image_features, text_features, 0
    else:
        all_image = _gather(image_features, gather_with_grad)
        all_text = _gather(text_features, gather_with_grad)
        offset = rank() * n
        if not local_loss:
            image_features, text_features, offset = all_image, all_text, 0
    logits_per_image = logit_scale * image_features @ all_text.T
    logits_per_text = logit_scale * text_features @ all_image.T
    labels = torch.arange(offset, offset + image_features.shape[0], device=image_features.device)
    return logits_per_image, logits_per_text, labels


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    gather: bool = True,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss over the global batch.

    With L2-normalised image features ``x_i``, text features ``y_i`` (``i = 1..N``, pair ``i``
    matched) and the exponentiated temperature ``s = exp(t)``, the logits are
    ``l_ij = s * <x_i, y_j>`` and::

        L = 1/2 * ( -1/N sum_i log softmax_j(l_ij)[j=i]      # image -> text
                    -1/N sum_i log softmax_j(l_ji)[j=i] )    # text -> image

    Args:
        image_features: ``(n, D)`` L2-normalised image features of this rank.
        text_features: ``(n, D)`` L2-normalised text features, row ``i`` paired with image ``i``.
        logit_scale: ``s``, already exponentiated (e.g. ``model.logit_scale.exp()``).
        local_loss: on W ranks, each rank computes the loss of its own ``n`` rows only (``n x N``
            logits instead of ``N x N``; labels offset by ``rank * n``). The mean of the ranks'
            losses is ``L`` and, through the gather's backward, the gradients are ``L``'s.
        gather_with_grad: gather the other ranks' features with gradient (exact gradients of ``L``).
            ``False`` treats them as constants: cheaper, but only the local terms train the encoders.
        gather: score against the features of all ranks; ``False`` computes ``L`` of this rank's
            batch alone (evaluation, where ranks may hold different numbers of batches).

    Returns:
        The scalar loss: ``L``, or with ``local_loss`` on W ranks this rank's share, whose mean
        over ranks is ``L``.
    """
    logits_per_image, logits_per_text, labels = clip_logits(
        image_features, text_features, logit_scale, local_loss, gather_with_grad, gather
    )
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    gather_with_grad: bool = True,
    gather: bool = True,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023) over the global batch.

    With L2-normalised ``x_i``, ``y_j``, scale ``s = exp(t)``, bias ``b`` and ``z_ij = 1`` for a
    matched pair (``i = j``), ``-1`` otherwise::

        L = -1/N sum_i sum_j log sigmoid( z_ij * (s * <x_i, y_j> + b) )

    Every pair is an independent binary classification, so no softmax over the batch is needed.
    On W ranks each rank scores its ``n`` images against the ``N`` gathered texts (labels offset
    by ``rank * n``) and returns ``-1/n`` times its rows' sum; the mean over ranks is ``L``.

    Args:
        image_features: ``(n, D)`` L2-normalised image features of this rank.
        text_features: ``(n, D)`` L2-normalised text features, row ``i`` paired with image ``i``.
        logit_scale: ``s``, already exponentiated (SigLIP initialises ``t = log 10``).
        logit_bias: ``b`` (SigLIP initialises it to -10, so training starts near the prior of rare positives).
        gather_with_grad: gather the other ranks' texts with gradient (exact gradients of ``L``).
        gather: score against the texts of all ranks; ``False``: this rank's batch alone.
    """
    n = image_features.shape[0]
    if text_features.shape[0] != n:
        raise ValueError(f"siglip loss needs as many texts as images, got {n} images and {text_features.shape[0]} texts")
    distributed = gather and world_size() > 1
    all_text = _gather(text_features, gather_with_grad) if distributed else text_features
    logits = logit_scale * image_features @ all_text.T + logit_bias
    signs = -torch.ones_like(logits)
    offset = rank() * n if distributed else 0
    signs[torch.arange(n, device=logits.device), torch.arange(offset, offset + n, device=logits.device)] = 1.0
    return -F.logsigmoid(signs * logits).sum() / n

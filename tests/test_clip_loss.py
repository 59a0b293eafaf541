"""CLIP and SigLIP losses: against their formulas written out by hand, and on 2 ranks against 1 process."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from mm_lightning.losses.clip import clip_logits, clip_loss, siglip_loss


def _features(n: int = 6, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_clip_loss_matches_the_formula_written_by_hand():
    x, y = _features()
    s = 7.3
    n = x.shape[0]
    i2t = t2i = 0.0
    for i in range(n):
        logits_i = [s * float(x[i] @ y[j]) for j in range(n)]  # image i against every text
        logits_t = [s * float(y[i] @ x[j]) for j in range(n)]  # text i against every image
        i2t += -(logits_i[i] - math.log(sum(math.exp(v) for v in logits_i)))
        t2i += -(logits_t[i] - math.log(sum(math.exp(v) for v in logits_t)))
    expected = 0.5 * (i2t / n + t2i / n)
    assert clip_loss(x, y, torch.tensor(s)).item() == pytest.approx(expected, rel=1e-5)
    # matched features give a lower loss than shuffled ones, and a perfect match tends to 0 at high scale
    assert clip_loss(x, x, 100.0) < 1e-3 < clip_loss(x, y, 100.0)


def test_siglip_loss_matches_the_formula_written_by_hand():
    x, y = _features(seed=1)
    s, b = 10.0, -3.0
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (s * float(x[i] @ y[j]) + b))))
    assert siglip_loss(x, y, s, b).item() == pytest.approx(total / n, rel=1e-5)


def test_single_process_logits_are_square_and_labels_the_diagonal():
    x, y = _features(n=4)
    per_image, per_text, labels = clip_logits(x, y, 2.0, local_loss=True)
    assert per_image.shape == per_text.shape == (4, 4)
    assert torch.allclose(per_image, per_text.T) and labels.tolist() == [0, 1, 2, 3]


def test_mismatched_batch_sizes_are_an_error():
    x, y = _features(n=4)
    with pytest.raises(ValueError, match="as many texts as images"):
        clip_loss(x, y[:3], 1.0)
    with pytest.raises(ValueError, match="as many texts as images"):
        siglip_loss(x, y[:3], 1.0, 0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_give_the_loss_and_gradients_of_one_process():
    """gloo, 2 CPU ranks, each holding half of a batch of 8: clip (gather with grad), clip local loss
    and siglip give the 1-process loss and every parameter gradient; uneven evaluation gathers work."""
    from tests.dist_clip import worker

    mp.spawn(worker, args=(2, _free_port()), nprocs=2, join=True)

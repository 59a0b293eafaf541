"""The pairwise margin loss, NT-Xent and MoCo's InfoNCE against their formulas written out by hand."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mm_lightning.losses.contrastive import contrastive_loss, moco_loss, nt_xent_loss
from mm_lightning.tasks.metric import all_pairs_contrastive_loss
from tests import dist_contrastive


def _norm(v: list[float]) -> list[float]:
    s = math.sqrt(sum(x * x for x in v))
    return [x / s for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def test_contrastive_loss_matches_hadsell_formula():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    x2[0] = x1[0]  # a positive pair at distance 0
    same = torch.tensor([1, 0, 1, 0, 0, 1])
    margin = 2.0
    expected = []
    for a, b, y in zip(x1.tolist(), x2.tolist(), same.tolist()):
        d = math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))
        expected.append(d**2 if y else max(0.0, margin - d) ** 2)
    got = contrastive_loss(x1, x2, same, margin, reduction="none")
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5)
    assert torch.isclose(contrastive_loss(x1, x2, same.bool(), margin), torch.tensor(expected).mean(), atol=1e-6)
    # negatives farther than the margin cost nothing; the loss never goes below 0
    far = contrastive_loss(torch.zeros(1, 3), torch.full((1, 3), 5.0), torch.tensor([0]), margin)
    assert far.item() == 0.0
    # finite gradient at d = 0
    x = x1.clone().requires_grad_(True)
    contrastive_loss(x, x.detach().clone(), torch.tensor([0, 0, 0, 0, 0, 0]), margin).backward()
    assert torch.isfinite(x.grad).all()


def test_all_pairs_contrastive_loss_uses_every_pair_once():
    g = torch.Generator().manual_seed(1)
    e, labels = torch.randn(5, 4, generator=g), torch.tensor([0, 1, 0, 2, 1])
    terms = []
    for i in range(5):
        for j in range(i + 1, 5):
            d = (e[i] - e[j]).norm().item()
            terms.append(d**2 if labels[i] == labels[j] else max(0.0, 1.0 - d) ** 2)
    assert math.isclose(all_pairs_contrastive_loss(e, labels, 1.0).item(), sum(terms) / len(terms), rel_tol=1e-5)


def test_nt_xent_matches_simclr_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = 0.3
    views = [_norm(v) for v in z1.tolist() + z2.tolist()]
    n2 = len(views)
    losses = []
    for i in range(n2):
        p = (i + n2 // 2) % n2
        denominator = sum(math.exp(_dot(views[i], views[k]) / t) for k in range(n2) if k != i)
        losses.append(-math.log(math.exp(_dot(views[i], views[p]) / t) / denominator))
    assert math.isclose(nt_xent_loss(z1, z2, t).item(), sum(losses) / n2, rel_tol=1e-5)
    # scale-invariant (cosine similarity) and symmetric in the two views
    assert torch.isclose(nt_xent_loss(3 * z1, z2, t), nt_xent_loss(z1, z2, t), atol=1e-6)
    assert torch.isclose(nt_xent_loss(z2, z1, t), nt_xent_loss(z1, z2, t), atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z1, z2, 0.0)


def test_moco_loss_matches_infonce_formula():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1)
    t = 0.2
    losses = []
    for qi, ki in zip(q.tolist(), k.tolist()):
        qn, kn = _norm(qi), _norm(ki)
        pos = math.exp(_dot(qn, kn) / t)
        neg = sum(math.exp(_dot(qn, n) / t) for n in queue.tolist())
        losses.append(-math.log(pos / (pos + neg)))
    assert math.isclose(moco_loss(q, k, queue, t).item(), sum(losses) / 3, rel_tol=1e-5)
    # the keys and the queue get no gradient
    kk, qq = k.clone().requires_grad_(True), queue.clone().requires_grad_(True)
    qv = q.clone().requires_grad_(True)
    moco_loss(qv, kk, qq, t).backward()
    assert qv.grad is not None and kk.grad is None and qq.grad is None
    with pytest.raises(ValueError, match="queue"):
        moco_loss(q, k, torch.randn(5, 3), t)


TOL = {"rtol": dist_contrastive.RTOL, "atol": dist_contrastive.ATOL}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_nt_xent_gathered_over_two_processes_equals_one_process(tmp_path):
    t = 0.5
    mp.spawn(dist_contrastive.nt_xent_worker, args=(_free_port(), str(tmp_path), t), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref = dist_contrastive.reference(t)
    n, world = dist_contrastive.N_LOCAL, dist_contrastive.WORLD
    assert ref["loss"].dtype == torch.float64  # identities checked in float64 (float32 differs between CPUs)
    # the global loss is the mean of the ranks' losses (equal local batches)
    assert torch.allclose(sum(r["loss"] for r in ranks) / world, ref["loss"], **TOL)
    # each rank's input gradient, averaged as DDP averages, is the one-process gradient of its rows
    for r, out in enumerate(ranks):
        rows = slice(r * n, (r + 1) * n)
        assert torch.allclose(out["grad1"] / world, ref["grad1"][rows], **TOL)
        assert torch.allclose(out["grad2"] / world, ref["grad2"][rows], **TOL)
        # through DDP: the parameter gradient equals one process on the whole batch
        assert torch.allclose(out["weight_grad"], ref["weight_grad"], **TOL)
    # without gathering it would not: each rank would only see its own negatives
    local = nt_xent_loss(dist_contrastive.make_inputs()["x1"][:n], dist_contrastive.make_inputs()["x2"][:n], t)
    assert not torch.isclose(local, ranks[0]["loss"], atol=1e-4)


@pytest.mark.slow
def test_moco_enqueues_keys_gathered_from_all_ranks(tmp_path):
    mp.spawn(dist_contrastive.moco_queue_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    gathered = torch.cat([ranks[0]["keys"], ranks[1]["keys"]])  # (8, D): rank 0's keys, then rank 1's
    for out in ranks:
        assert out["ptr"] == 8
        assert out["queue"].dtype == torch.float64
        assert torch.allclose(out["queue"][:8], gathered, **TOL)
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])

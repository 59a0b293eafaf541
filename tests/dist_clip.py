"""Workers for tests/test_clip_loss.py: the CLIP/SigLIP losses on 2 CPU ranks (gloo) against 1 process.

Each rank builds the same tiny :class:`CLIPTask` (same seed), computes the loss of the whole
batch on its own (``gather=False``: the 1-process reference), then the loss of its half of the
batch across both ranks, and averages the gradients over ranks as DDP does. Loss and every
parameter gradient must match the reference.

Everything runs in float64: the check is of an identity, and float32 kernels differ between CPUs
and between 1 and 2 processes (a float32 gradient differed by 1.67e-06 on another CPU). In float64
both sides agree to ~1e-15; the tolerance (:data:`RTOL`, :data:`ATOL`) sits far above that and far
below the 1e-4 that a real error (the control below: gathering without gradient) makes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mm_lightning.callbacks.retrieval import RetrievalEvaluation, gather_rows, retrieval_metrics
from mm_lightning.tasks.clip import CLIPTask

BATCH = 8
RTOL, ATOL = 1e-9, 1e-12  # float64: ~1e-15 apart when right, > 1e-4 when wrong


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL)


def tiny_task(loss: str) -> CLIPTask:
    torch.manual_seed(0)
    task = CLIPTask(
        image_backbone="vit_tiny_patch16_224",
        image_backbone_kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
        embed_dim=16,
        vocab_size=50,
        context_length=8,
        text_width=32,
        text_layers=1,
        text_heads=2,
        loss=loss,
        init_logit_scale=1.5,
    )
    return task.double()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 9, (BATCH,), generator=g)
    mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    return {
        "image": torch.randn(BATCH, 3, 16, 16, generator=g, dtype=torch.float64),
        "input_ids": torch.randint(3, 50, (BATCH, 8), generator=g) * mask,
        "attention_mask": mask,
    }


def _grads(task: CLIPTask) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in task.named_parameters() if p.grad is not None}


def check_losses(rank: int, world: int) -> None:
    """Compare 2-rank and 1-process loss and gradients for clip (gathered, local) and siglip."""
    data = batch()
    n = BATCH // world
    half = {k: v[rank * n : (rank + 1) * n] for k, v in data.items()}
    for loss_name, local in (("clip", False), ("clip", True), ("siglip", False)):
        task = tiny_task(loss_name)
        task.local_loss = local
        # 1 process, whole batch
        ref = task.contrastive_loss(*task(data["image"], data["input_ids"], data["attention_mask"]), gather=False)
        ref.backward()
        ref_grads = _grads(task)
        task.zero_grad()
        # 2 ranks, half each; DDP averages the gradients over ranks
        loss = task.contrastive_loss(*task(half["image"], half["input_ids"], half["attention_mask"]))
        loss.backward()
        grads = _grads(task)
        assert set(grads) == set(ref_grads) and len(grads) == sum(p.requires_grad for p in task.parameters())
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        label = f"{loss_name} local_loss={local}"
        assert ref.dtype == torch.float64
        assert close(mean_loss, ref), (label, float(mean_loss), float(ref))
        if loss_name == "clip" and not local:  # every rank holds the global loss itself
            assert close(loss, ref), (label, float(loss), float(ref))
        for name, g in grads.items():
            assert close(g, ref_grads[name]), (label, name, float((g - ref_grads[name]).abs().max()))
        if loss_name == "clip" and local:  # the logits really are n x N
            from mm_lightning.losses.clip import clip_logits

            with torch.no_grad():
                f = task(half["image"], half["input_ids"], half["attention_mask"])
                logits, _, labels = clip_logits(*f, 1.0, local_loss=True)
            assert logits.shape == (n, BATCH) and labels.tolist() == list(range(rank * n, (rank + 1) * n))
    # Control: gathering without gradient loses the other ranks' terms, and the check above notices.
    task = tiny_task("clip")
    task.gather_with_grad = False
    task.contrastive_loss(*task(data["image"], data["input_ids"], data["attention_mask"]), gather=False).backward()
    ref_grads = _grads(task)
    task.zero_grad()
    task.contrastive_loss(*task(half["image"], half["input_ids"], half["attention_mask"])).backward()
    grads = _grads(task)
    differs = torch.tensor(0.0)
    for name, g in grads.items():
        dist.all_reduce(g)
        differs = torch.maximum(differs, (g / world - ref_grads[name]).abs().max())
    assert differs > 1e-4, float(differs)


def check_uneven_retrieval(rank: int, world: int) -> None:
    """Evaluation features gathered from ranks with 5, 3 (and 0) rows give the metrics of the whole set."""
    g = torch.Generator().manual_seed(2)
    images = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=-1)  # exact gathers: float32 is fine
    texts = torch.nn.functional.normalize(images + 0.7 * torch.randn(8, 4, generator=g), dim=-1)
    ids = torch.tensor([[1, 2], [1, 3], [1, 2], [4, 4], [5, 1], [1, 3], [6, 6], [7, 0]])
    whole = retrieval_metrics(images, texts, ids, ks=(1, 2))
    rows = slice(0, 5) if rank == 0 else slice(5, 8)
    gathered = [gather_rows(x[rows]) for x in (images, texts, ids)]
    assert torch.equal(gathered[2], ids)
    assert retrieval_metrics(*gathered, ks=(1, 2)) == whole
    empty = gather_rows(ids if rank == 0 else torch.zeros(0, 0, dtype=torch.long))
    assert torch.equal(empty, ids)
    # several captions per image: rank 0 holds images 0-2 and captions 0-4, rank 1 image 3-4 and captions 5-7
    owner = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])
    whole = retrieval_metrics(images[:5], texts, ids, ks=(1, 2), owner=owner)
    callback = RetrievalEvaluation()
    mine = slice(0, 3) if rank == 0 else slice(3, 5)
    caps = slice(0, 5) if rank == 0 else slice(5, 8)
    callback.image_features, callback.text_features = [images[:5][mine]], [texts[caps]]
    callback.input_ids, callback.owner, callback.num_images = [ids[caps]], [owner[caps] - mine.start], 3 if rank == 0 else 2
    g_images, g_texts, g_ids, g_owner = callback.gathered(torch.device("cpu"))
    assert torch.equal(g_owner, owner) and torch.equal(g_images, images[:5])
    assert retrieval_metrics(g_images, g_texts, g_ids, ks=(1, 2), owner=g_owner) == whole


def worker(rank: int, world: int, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        check_losses(rank, world)
        check_uneven_retrieval(rank, world)
    finally:
        dist.destroy_process_group()

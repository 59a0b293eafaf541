"""The model, data and trainer settings shared by the 1-process references and tests/dist_parallel.py."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

STEPS = 4
GLOBAL_BATCH = 16


class TinyImages(Dataset):
    """64 fixed random 16 px images with 4 labels, as batch dicts (``image``, ``label``)."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(123)
        self.images = torch.randn(n, 3, 16, 16, generator=g)
        self.labels = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


def make_task(**kwargs: Any):
    """A tiny ViT classifier (2 heads: splits over 2 tensor-parallel ranks), identical for a fixed seed."""
    from mm_lightning.tasks.classification import ImageClassifier

    L.seed_everything(7, verbose=False)
    return ImageClassifier(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
        num_classes=4,
        lr=3e-3,
        weight_decay=0.05,
        schedule="constant",
        **kwargs,
    )


def make_loader(per_rank_batch: int = GLOBAL_BATCH, rank: int = 0, replicas: int = 1) -> DataLoader:
    """In-order batches; with ``replicas`` data-parallel ranks, samples are interleaved so that the ranks'
    batches of step k together are the 1-process batch k."""
    dataset = TinyImages()
    sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler)


def trainer_kwargs() -> dict[str, Any]:
    return {
        "accelerator": "cpu",
        "max_steps": STEPS,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "use_distributed_sampler": False,  # make_loader splits the data itself
    }


class LossRecorder(L.Callback):
    """Per-step training loss, averaged over ranks (the loss of the global batch)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"].detach().clone()
        self.losses.append(float(trainer.strategy.reduce(loss, reduce_op="mean")))


def reference_run() -> tuple[list[float], dict[str, torch.Tensor]]:
    """1 process, global batch: per-step losses and the trained backbone's weights."""
    task = make_task()
    recorder = LossRecorder()
    trainer = L.Trainer(devices=1, callbacks=[recorder], **trainer_kwargs())
    trainer.fit(task, train_dataloaders=make_loader())
    return recorder.losses, {k: v.detach().clone() for k, v in task.model.state_dict().items()}

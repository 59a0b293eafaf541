"""Test-only callbacks and tasks for tests/test_reliability.py, importable by class path from the CLI."""

from __future__ import annotations

import os
import resource

import lightning as L
import torch

from mm_lightning.tasks.classification import ImageClassifier


class NanLossOnBatches(ImageClassifier):
    """An ImageClassifier whose training loss is NaN on the given batch indices of every epoch."""

    def __init__(self, nan_batches: list[int] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_batches = set(nan_batches or [])

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx in self.nan_batches:
            loss = loss * float("nan")
        self.log("train/returned_loss", loss.detach(), on_step=True, on_epoch=False)
        return loss


class PoisonWeights(L.Callback):
    """Sets every weight to NaN at the start of training (a model that has diverged)."""

    def on_train_start(self, trainer, pl_module) -> None:
        with torch.no_grad():
            for p in pl_module.parameters():
                p.fill_(float("nan"))


class BreakCheckpointDir(L.Callback):
    """After ``after_step`` optimizer steps, makes checkpoint writes fail: ``mode="readonly"`` makes the
    checkpoint directory unwritable (chmod 0555), ``mode="full"`` caps the size of files this process may
    write (RLIMIT_FSIZE, so a checkpoint write fails part-way with EFBIG, as on a full disk)."""

    def __init__(self, after_step: int = 3, mode: str = "readonly") -> None:
        self.after_step = after_step
        self.mode = mode
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.done or trainer.global_step < self.after_step:
            return
        self.done = True
        if self.mode == "readonly":
            os.chmod(os.path.join(trainer.default_root_dir, "checkpoints"), 0o555)
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

"""Image classification with any timm backbone (ViT, ResNet, ...), with timm's training features."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mm_lightning.models.vision import create_backbone
from mm_lightning.tasks.base import Task


class ImageClassifier(Task):
    """Supervised classification: cross-entropy (label smoothing, mixup/cutmix), top-1/top-5 accuracy.

    Args:
        backbone: timm model name, e.g. ``vit_tiny_patch16_224`` or ``resnet18``.
        backbone_kwargs: extra arguments for ``timm.create_model`` (``img_size``, ``patch_size``,
            ``embed_dim``, ``depth``, ``num_heads``, ...).
        num_classes: number of classes; labels must lie in ``[0, num_classes)``.
        pretrained: load timm's pretrained weights (downloads; off by default, never in tests).
        label_smoothing: label smoothing of the cross-entropy target.
        mixup_alpha: timm Mixup alpha (0 disables).
        cutmix_alpha: timm CutMix alpha (0 disables).
        drop_path_rate: stochastic depth rate of the backbone.
        ema_decay: keep an exponential moving average of the weights with this decay and
            evaluate it at validation and test (``None`` disables).
        **kwargs: optimizer settings of :class:`~mm_lightning.tasks.base.Task` (``lr``, ``weight_decay``, ...).
    """

    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        pretrained: bool = False,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        drop_path_rate: float = 0.0,
        ema_decay: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {num_classes}")
        extra = dict(backbone_kwargs or {})
        if drop_path_rate:
            extra["drop_path_rate"] = drop_path_rate
        self.model = create_backbone(backbone, num_classes=num_classes, pretrained=pretrained, **extra)
        self._backbone_args = {"name": backbone, "num_classes": num_classes, "pretrained": False, **extra}
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing, num_classes=num_classes
            )
            self.soft_ce = SoftTargetCrossEntropy()
        self.ema = ModelEmaV3(self.model, decay=ema_decay) if ema_decay else None
        self._ema_step = 0  # the global step of the last EMA update
        top5 = min(5, num_classes)
        for split in ("val", "test"):
            setattr(self, f"{split}_acc", MulticlassAccuracy(num_classes, top_k=1, average="micro"))
            setattr(self, f"{split}_acc_top5", MulticlassAccuracy(num_classes, top_k=top5, average="micro"))
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    def optimized_module(self) -> torch.nn.Module:
        return self.model

    def model_spec(self) -> dict[str, Any]:
        """The timm model's :func:`~mm_lightning.models.vision.create_backbone` arguments (see ``Task.model_spec``)."""
        from mm_lightning.models.loading import model_spec

        return model_spec(self.model, self._backbone_args)

    def configure_model(self) -> None:
        if self.ema is not None and self._model_parallel_strategy() is not None:
            raise ValueError(
                "model.ema_decay: the weight EMA keeps an unsharded copy of the model, which FSDP / tensor parallel"
                " (ModelParallel strategies) do not support; unset model.ema_decay or use DDP"
            )
        super().configure_model()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (for probes, kNN and hand-over to other tasks)."""
        return self.model.forward_head(self.model.forward_features(image), pre_logits=True)

    def _check_labels(self, label: torch.Tensor) -> None:
        if label.numel() and (int(label.max()) >= self.num_classes or int(label.min()) < 0):
            raise ValueError(
                f"label {int(label.max())} is outside [0, {self.num_classes}): set model.num_classes to the data's class count"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image, label = batch["image"], batch["label"]
        if batch_idx == 0:
            self._check_labels(label)
        if self.mixup is not None and image.shape[0] % 2 == 0:
            image, target = self.mixup(image, label)
            loss = self.soft_ce(self(image), target)
        else:
            loss = F.cross_entropy(self(image), label, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=image.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # once per optimizer step, as timm's train loop does: with gradient accumulation the micro-batches between
        # two steps leave the weights unchanged, and updating after each would decay the average k times a step
        if self.ema is not None and self.global_step != self._ema_step:
            self._ema_step = self.global_step
            self.ema.update(self.model, step=self.global_step)

    def _eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        image, label = batch["image"], batch["label"]
        self._check_labels(label)
        logits = self._eval_model()(image)
        n = image.shape[0]
        self.log(f"{split}/loss", F.cross_entropy(logits, label), batch_size=n, sync_dist=True)
        for name in ("acc", "acc_top5"):
            metric = getattr(self, f"{split}_{name}")
            metric(logits, label)
            self.log(f"{split}/{name}", metric, batch_size=n, prog_bar=name == "acc")
        if split == "test":
            self.test_confusion.update(logits.argmax(-1), label)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self._eval_model()(batch["image"]).softmax(-1)
        return {"probs": probs, "pred": probs.argmax(-1)}

    def on_test_epoch_end(self) -> None:
        matrix = self.test_confusion.compute().cpu()
        if self.trainer.is_global_zero:
            names = getattr(self.trainer.datamodule, "class_names", None)
            save_confusion_matrix(self.test_confusion, matrix, names, self.trainer)
        self.test_confusion.reset()


def save_confusion_matrix(metric: MulticlassConfusionMatrix, matrix: torch.Tensor, names: list[str] | None,
                          trainer: Any) -> str:
    """Plot the confusion matrix (torchmetrics' ``plot``), save ``confusion_matrix.png`` in the run directory, log
    it to W&B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = matrix.shape[0]
    names = names if names and len(names) == n else [str(i) for i in range(n)]
    fig, _ = metric.plot(matrix, labels=names, cmap="Blues")
    fig.set_size_inches(1.5 + 0.5 * n, 1.5 + 0.5 * n)
    path = os.path.join(trainer.default_root_dir, "confusion_matrix.png")
    os.makedirs(trainer.default_root_dir, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key="test/confusion_matrix", images=[path])
    return path

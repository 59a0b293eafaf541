"""Metric learning from labelled shards: a triplet loss with in-batch mining, or the pairwise margin loss."""

from __future__ import annotations

from typing import Any, Literal

import torch

from mm_lightning.losses.contrastive import contrastive_loss
from mm_lightning.losses.triplet import mined_triplet_loss
from mm_lightning.models.metric import MetricEmbedder
from mm_lightning.tasks.base import Task


@torch.no_grad()
def recall_at_1(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Leave-one-out Recall@1: the fraction of items whose nearest other item (Euclidean) shares their label."""
    if embeddings.shape[0] < 2:
        return torch.tensor(float("nan"), device=embeddings.device)
    d = torch.cdist(embeddings.float(), embeddings.float())
    d.fill_diagonal_(float("inf"))
    return (labels[d.argmin(1)] == labels).float().mean()


def all_pairs_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """:func:`~mm_lightning.losses.contrastive.contrastive_loss` over every pair ``i < j`` of a labelled batch
    (positive when the labels match)."""
    i, j = torch.triu_indices(embeddings.shape[0], embeddings.shape[0], offset=1, device=embeddings.device)
    return contrastive_loss(embeddings[i], embeddings[j], labels[i] == labels[j], margin)


class MetricLearner(Task):
    """Learn an embedding where distance means "same class" (FaceNet-style), from ``image`` + ``label`` batches.

    ``e = normalize(head(backbone(x)))`` (normalisation optional; the network is
    :class:`mm_lightning.models.metric.MetricEmbedder`, ``task.model``); the loss is the triplet loss
    with ``batch_all``, ``batch_hard`` or ``semi_hard`` mining within the batch
    (:mod:`mm_lightning.losses.triplet`), or the pairwise margin loss over all pairs of the
    batch (``loss: contrastive``). :meth:`embed` returns ``e``, so the kNN and probe callbacks
    measure the learned metric. Validation and test log the loss and ``recall_at_1`` (leave-one-out
    nearest neighbour within the split, per rank); the best checkpoint maximises
    ``val/recall_at_1`` (the mined losses are no quality measure: batch-all's mean over active
    triplets grows as triplets become easy).

    Args:
        backbone: timm model name, e.g. ``vit_tiny_patch16_224`` or ``resnet18``.
        backbone_kwargs: extra arguments for ``timm.create_model``.
        pretrained: load timm's pretrained weights (downloads; off by default).
        embed_dim: width of the embedding.
        head_layers: linear layers of the embedding head (1: a linear map).
        head_hidden_dim: hidden width of the head when ``head_layers > 1``.
        normalize: L2-normalise the embedding (then squared distances lie in [0, 4]).
        loss: ``triplet`` or ``contrastive`` (pairwise margin).
        mining: triplet mining: ``batch_all``, ``batch_hard`` or ``semi_hard``.
        margin: the loss's margin (triplet: gap between distances, e.g. 0.2 squared on the unit
            sphere; contrastive: distance beyond which negatives cost nothing, e.g. 1.0).
        squared: triplet distances squared (FaceNet) or plain Euclidean.
        num_classes: how many classes the labels name, if known (the loss itself takes any integer labels):
            ``experiments.run`` hands it to the data module, which skips and counts a sample whose label lies
            outside ``[0, num_classes)``, and the Probe's classifiers take it as their class count.
        **kwargs: optimizer settings of :class:`~mm_lightning.tasks.base.Task` (``lr``, ``weight_decay``, ...).
    """

    monitor = "val/recall_at_1"
    monitor_mode = "max"

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        embed_dim: int = 64,
        head_layers: int = 1,
        head_hidden_dim: int = 256,
        normalize: bool = True,
        loss: Literal["triplet", "contrastive"] = "triplet",
        mining: Literal["batch_all", "batch_hard", "semi_hard"] = "batch_hard",
        margin: float = 0.2,
        squared: bool = True,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if loss not in ("triplet", "contrastive"):
            raise ValueError(f"model.loss must be 'triplet' or 'contrastive', got {loss!r}")
        if mining not in ("batch_all", "batch_hard", "semi_hard"):
            raise ValueError(f"model.mining must be batch_all, batch_hard or semi_hard, got {mining!r}")
        if margin <= 0:
            raise ValueError(f"model.margin must be > 0, got {margin}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {num_classes}")
        self.model = MetricEmbedder(backbone, backbone_kwargs, pretrained, embed_dim, head_layers, head_hidden_dim,
                                    normalize)
        self.normalize = normalize
        self.loss_name = loss
        self.mining = mining
        self.margin = margin
        self.squared = squared
        self.num_classes = num_classes
        self._eval_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def optimized_module(self) -> torch.nn.Module:
        return self.model

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """The learned embedding ``(B, embed_dim)`` (L2-normalised with ``normalize``)."""
        return self.model(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.embed(image)

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "contrastive":
            return all_pairs_contrastive_loss(embeddings, labels, self.margin)
        return mined_triplet_loss(embeddings, labels, self.margin, self.squared, self.mining)

    def _labels(self, batch: dict[str, Any]) -> torch.Tensor:
        if "label" not in batch:
            raise KeyError("metric learning needs labelled batches: the shards need a .cls member "
                           "(data.pipeline: mm_lightning.data.samples.ClassificationPipeline)")
        return batch["label"]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        label = self._labels(batch)
        e = self.embed(batch["image"])
        loss = self.compute_loss(e, label)
        self.log("train/loss", loss, prog_bar=True, batch_size=e.shape[0])
        return {"loss": loss, "features": e.detach()}

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        e, label = self.embed(batch["image"]), self._labels(batch)
        self.log(f"{split}/loss", self.compute_loss(e, label), batch_size=e.shape[0], sync_dist=True)
        self._eval_outputs.append((e.detach(), label))

    def _eval_epoch_end(self, split: str) -> None:
        if self._eval_outputs:
            e = torch.cat([x for x, _ in self._eval_outputs])
            label = torch.cat([y for _, y in self._eval_outputs])
            self.log(f"{split}/recall_at_1", recall_at_1(e, label), sync_dist=True)
        self._eval_outputs = []

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs = []

    def on_test_epoch_start(self) -> None:
        self._eval_outputs = []

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")


"""SimCLR: a backbone and a projection MLP trained with NT-Xent on two augmented views of each image."""

from __future__ import annotations

from typing import Any

import torch

from mm_lightning.losses.contrastive import nt_xent_loss
from mm_lightning.models.ssl import SSLEncoder
from mm_lightning.tasks.base import Task


class SimCLR(Task):
    """SimCLR (Chen et al. 2020): ``z = g(f(x))``, NT-Xent between the two views of each sample.

    The network ``f``, ``g`` is :class:`mm_lightning.models.ssl.SSLEncoder` (``task.model``).

    Batches come from :class:`~mm_lightning.data.samples.TwoViewPipeline` (``view1``, ``view2``;
    ``label`` is ignored by the loss). The representation is the backbone's pooled features
    ``f(x)`` (:meth:`embed`), judged by the probe callbacks
    (:mod:`mm_lightning.callbacks.probe`). No label-based checkpoint selection: the best
    checkpoint is the last one. A validation/test loss is logged when the evaluation
    batches carry views (``TwoViewPipeline(eval_views=True)``).

    Args:
        backbone: timm model name, e.g. ``vit_tiny_patch16_224`` or ``resnet18``.
        backbone_kwargs: extra arguments for ``timm.create_model`` (``img_size``, ``patch_size``,
            ``embed_dim``, ``depth``, ``num_heads``, ``global_pool``, ...).
        pretrained: load timm's pretrained weights (downloads; off by default).
        proj_hidden_dim: hidden width of the projection MLP.
        proj_dim: output width of the projection MLP (the loss space).
        proj_layers: linear layers in the projection MLP.
        proj_batch_norm: BatchNorm1d in the projection MLP's hidden layers.
        temperature: NT-Xent temperature.
        gather: take negatives from all ranks (all-gather with gradient) under DDP.
        **kwargs: optimizer settings of :class:`~mm_lightning.tasks.base.Task` (``lr``, ``weight_decay``, ...).
    """

    monitor = None  # self-supervised: keep the last checkpoint, select nothing on labels

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        proj_layers: int = 2,
        proj_batch_norm: bool = True,
        temperature: float = 0.5,
        gather: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        self.model = SSLEncoder(backbone, backbone_kwargs, pretrained, proj_hidden_dim, proj_dim, proj_layers,
                                proj_batch_norm)
        self.temperature = temperature
        self.gather = gather

    def optimized_module(self) -> torch.nn.Module:
        return self.model

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """The representation: pooled backbone features ``(B, num_features)``."""
        return self.model.embed(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def _loss(self, batch: dict[str, Any], gather: bool) -> tuple[torch.Tensor, torch.Tensor]:
        v1, v2 = batch["view1"], batch["view2"]
        h = self.model.backbone(torch.cat([v1, v2]))  # one pass: BatchNorm sees both views, as in SimCLR
        z1, z2 = self.model.projector(h).chunk(2)
        return nt_xent_loss(z1, z2, self.temperature, gather=gather), h[: v1.shape[0]]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        loss, h1 = self._loss(batch, self.gather)
        self.log("train/loss", loss, prog_bar=True, batch_size=h1.shape[0])
        # detached features of view1 (aligned with batch["label"]) for the probe / collapse callbacks
        return {"loss": loss, "features": h1.detach()}

    def _eval_step(self, batch: dict[str, Any], split: str) -> None:
        if "view1" in batch:  # evaluation batches may differ in size across ranks: no gathering
            loss, h1 = self._loss(batch, gather=False)
            self.log(f"{split}/loss", loss, batch_size=h1.shape[0], sync_dist=True)

"""The network of the self-supervised tasks (SimCLR, MoCo): a backbone and a projection head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from mm_lightning.models.heads import ProjectionHead
from mm_lightning.models.vision import create_backbone


class SSLEncoder(nn.Module):
    """``z = g(f(x))``: backbone ``f`` (its pooled features are the representation, :meth:`embed`) and
    projection MLP ``g`` (the space the contrastive loss works in, :meth:`forward`).

    Args:
        backbone: timm model name (``vit_shapes``, ``vit_tiny_patch16_224``, ``resnet18``, ...).
        backbone_kwargs: extra arguments for ``timm.create_model`` (``global_pool``, ...).
        pretrained: timm's pretrained weights (downloads; off by default).
        proj_hidden_dim: hidden width of the projection MLP.
        proj_dim: output width (the loss space).
        proj_layers: linear layers of the MLP.
        proj_batch_norm: BatchNorm1d in its hidden layers.

    ``config`` holds these arguments (plain values), which :func:`mm_lightning.models.load_model` rebuilds it from.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        proj_layers: int = 2,
        proj_batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.config = {"backbone": backbone, "backbone_kwargs": dict(backbone_kwargs or {}), "pretrained": False,
                       "proj_hidden_dim": proj_hidden_dim, "proj_dim": proj_dim, "proj_layers": proj_layers,
                       "proj_batch_norm": proj_batch_norm}
        self.backbone = create_backbone(backbone, num_classes=0, pretrained=pretrained, **dict(backbone_kwargs or {}))
        self.projector = ProjectionHead(
            self.backbone.num_features, proj_hidden_dim, proj_dim, proj_layers, batch_norm=proj_batch_norm
        )

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """The representation: pooled backbone features ``(B, num_features)``."""
        return self.backbone(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Projections ``(B, proj_dim)`` (unnormalised; the losses normalise)."""
        return self.projector(self.backbone(image))

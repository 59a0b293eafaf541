"""The network of metric learning: a backbone and an embedding head, optionally L2-normalised."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mm_lightning.models.heads import ProjectionHead
from mm_lightning.models.vision import create_backbone


class MetricEmbedder(nn.Module):
    """``e = normalize(head(backbone(x)))``: an embedding where distance means "same class" (FaceNet).

    Args:
        backbone: timm model name.
        backbone_kwargs: extra arguments for ``timm.create_model``.
        pretrained: timm's pretrained weights (downloads; off by default).
        embed_dim: width of the embedding.
        head_layers: linear layers of the head (1: a linear map).
        head_hidden_dim: hidden width when ``head_layers > 1``.
        normalize: L2-normalise the embedding.

    ``config`` holds these arguments (plain values), which :func:`mm_lightning.models.load_model` rebuilds it from.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        embed_dim: int = 64,
        head_layers: int = 1,
        head_hidden_dim: int = 256,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.config = {"backbone": backbone, "backbone_kwargs": dict(backbone_kwargs or {}), "pretrained": False,
                       "embed_dim": embed_dim, "head_layers": head_layers, "head_hidden_dim": head_hidden_dim,
                       "normalize": normalize}
        self.backbone = create_backbone(backbone, num_classes=0, pretrained=pretrained, **dict(backbone_kwargs or {}))
        self.head = ProjectionHead(self.backbone.num_features, head_hidden_dim, embed_dim, head_layers, batch_norm=True)
        self.normalize = normalize

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """The embedding ``(B, embed_dim)``."""
        e = self.head(self.backbone(image))
        return F.normalize(e, dim=-1) if self.normalize else e

"""Projection heads for self-supervised and metric learning (plain nn.Modules)."""

from __future__ import annotations

import torch
import torch.nn as nn


class ProjectionHead(nn.Module):
    """MLP ``in_dim -> hidden_dim -> ... -> out_dim`` that maps backbone features to the loss space.

    SimCLR (v1: 2 layers, v2: 3 layers, BatchNorm) and MoCo v2 (2 layers, no BatchNorm) put the
    contrastive loss on such a head and keep the features *before* it as the representation:
    the head absorbs the augmentation invariances the loss forces, which the downstream tasks
    may need. ``num_layers=1`` is a single linear map (an embedding layer, as in FaceNet).

    Args:
        in_dim: width of the backbone features.
        hidden_dim: width of the hidden layers.
        out_dim: width of the output (the loss space).
        num_layers: number of linear layers (>= 1).
        batch_norm: BatchNorm1d after each hidden linear layer.
        last_batch_norm: BatchNorm1d (without affine parameters) on the output, as in SimCLR v2 / MoCo v3.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 512,
        out_dim: int = 128,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_batch_norm))
        if last_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

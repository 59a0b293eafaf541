"""Vision backbones: any timm model by name, built from its config (no download unless asked)."""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch.nn as nn


def create_backbone(name: str, num_classes: int = 0, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build timm model ``name`` (e.g. ``vit_tiny_patch16_224`` with ``img_size=32, patch_size=4``).

    ``num_classes=0`` returns a feature extractor (pooled features, ``model.num_features`` wide).
    ``pretrained`` is opt-in: it downloads weights, so tests and default configs never set it.
    Unknown names fail naming the closest timm models.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
        raise ValueError(f"unknown timm model {name!r}{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise TypeError(f"timm model {name!r} rejected its arguments {sorted(kwargs)}: {e}") from e

"""Vision backbones: any timm model by name, built from its config (no download unless asked).

``vit_shapes`` is registered here as a timm model: the small ViT every shapes/digits config uses
(32 px images, patch 4, width 96, depth 4, 3 heads, MLP ratio 2; 0.31 M parameters), defined once
instead of in each config. Its settings can still be overridden by ``backbone_kwargs``
(``global_pool: max``, ``class_token: false``, ...). It has no pretrained weights.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

#: the architecture of ``vit_shapes`` (timm ``VisionTransformer`` arguments)
VIT_SHAPES = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 2.0}

# timm reads the pretrained-config registry of the module that registers a model (no weights: url "")
default_cfgs = generate_default_cfgs(
    {"vit_shapes": {"url": "", "input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "num_classes": 0}}
)


@register_model
def vit_shapes(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The shapes world's ViT (see the module docstring); ``kwargs`` override its settings."""
    return _create_vision_transformer("vit_shapes", pretrained=pretrained, **{**VIT_SHAPES, **kwargs})


def create_backbone(name: str, num_classes: int = 0, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build timm model ``name`` (e.g. ``vit_shapes``, or ``vit_tiny_patch16_224`` with ``img_size=32, patch_size=4``).

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

"""CLIP as a plain ``nn.Module``: image tower + text tower + projections + temperature; and backbone hand-over.

:class:`CLIP` is what :class:`~mm_lightning.tasks.clip.CLIPTask` trains (``task.model``); it runs,
exports and benchmarks without Lightning. :func:`load_backbone_weights` copies a backbone's weights out
of another run's checkpoint (classification, self-supervised, CLIP): CLIP's ``image_init`` and the
multimodal LLM's ``vision_init`` use it.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mm_lightning.checkpoint import state_dict_of
from mm_lightning.models.text import HFTextEncoder, Pooling, TextTransformer
from mm_lightning.models.vision import create_backbone


class CheckpointMismatchError(ValueError):
    """A checkpoint's weights do not fit the backbone they should initialise."""


def backbone_prefix(state: dict[str, torch.Tensor], wanted: set[str]) -> list[str]:
    """The key prefixes under which ``state`` holds every key of ``wanted`` (shortest first)."""
    counts: Counter[str] = Counter()
    for key in state:
        for name in wanted:
            if key.endswith(name) and (len(key) == len(name) or key[-len(name) - 1] == "."):
                counts[key[: len(key) - len(name)]] += 1
    return sorted((p for p, c in counts.items() if c >= len(wanted)), key=lambda p: (len(p), p))


def load_backbone_weights(
    backbone: nn.Module, path: str | os.PathLike, prefix: str | None = None, what: str = "model.image_init"
) -> str:
    """Copy a backbone's weights from a checkpoint of another run (classification, SSL, CLIP, ...).

    The checkpoint's ``state_dict`` keys under ``prefix`` (e.g. ``model.`` for a classifier,
    ``model.image_encoder.`` for CLIP) must hold every parameter and buffer of ``backbone`` with the
    same shape; a classifier head the backbone lacks is ignored. Without ``prefix`` the shortest
    prefix that holds all of them is used. Loaded weights-only (:func:`mm_lightning.checkpoint.state_dict_of`).
    ``what`` names the setting that gave ``path`` in errors. Returns the prefix used; raises
    :class:`CheckpointMismatchError` naming the checkpoint and the keys that do not fit.
    """
    path = os.fspath(path)
    try:
        state = state_dict_of(path, what)
    except ValueError as err:
        raise CheckpointMismatchError(str(err)) from None
    own = backbone.state_dict()
    if prefix is None:
        found = backbone_prefix(state, set(own))
        if not found:
            sample = ", ".join(list(state)[:5])
            raise CheckpointMismatchError(
                f"{what} {path!r} holds no weights that fit the backbone (wanted keys such as "
                f"{', '.join(list(own)[:3])}; the checkpoint has {sample}, ...): is it a checkpoint of the same "
                f"architecture and backbone_kwargs? Set {what}_prefix if its keys carry a prefix"
            )
        prefix = found[0]
    missing = [k for k in own if prefix + k not in state]
    if missing:
        raise CheckpointMismatchError(
            f"{what} {path!r} lacks {len(missing)} backbone weight(s) under prefix {prefix!r}, e.g. "
            f"{', '.join(prefix + k for k in missing[:5])}"
        )
    wrong = [f"{prefix + k}: {tuple(state[prefix + k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if state[prefix + k].shape != v.shape]
    if wrong:
        raise CheckpointMismatchError(
            f"{what} {path!r}: {len(wrong)} weight(s) have another shape than the backbone's "
            f"(checkpoint vs model): {'; '.join(wrong[:5])}"
        )
    backbone.load_state_dict({k: state[prefix + k] for k in own})
    return prefix


class CLIP(nn.Module):
    """Image tower + text tower, each projected into one ``embed_dim`` space, and a learned temperature.

    Args:
        image_backbone: timm model name of the image tower (``vit_shapes``, ``vit_tiny_patch16_224``, ``resnet18``).
        image_backbone_kwargs: extra arguments for ``timm.create_model``.
        image_pretrained: timm's pretrained weights (downloads; off by default).
        embed_dim: width of the joint space.
        vocab_size: rows of the text transformer's token table (the tokenizer's ``vocab_size``).
        context_length: longest text in tokens (the tokenizer's ``context_length``).
        text_width: hidden size of the text transformer.
        text_layers: its blocks.
        text_heads: its attention heads.
        text_mlp_ratio: its MLP width as a multiple of ``text_width``.
        text_causal: causal attention (CLIP) instead of bidirectional.
        text_pooling: ``eot``, ``first`` or ``mean``; default ``eot`` (transformer), ``mean`` (``text_model``).
        text_model: a local Hugging Face encoder directory as the text tower instead.
        init_logit_scale: initial log temperature ``t`` (logits scaled by ``exp(t)``).
        learn_logit_scale: learn ``t``.
        init_logit_bias: a learned logit bias starting here (SigLIP); ``None``: no bias.

    ``config`` holds these arguments (plain values), which :func:`mm_lightning.models.load_model` rebuilds it from.
    """

    def __init__(
        self,
        image_backbone: str = "vit_tiny_patch16_224",
        image_backbone_kwargs: dict[str, Any] | None = None,
        image_pretrained: bool = False,
        embed_dim: int = 128,
        vocab_size: int = 1024,
        context_length: int = 32,
        text_width: int = 128,
        text_layers: int = 3,
        text_heads: int = 4,
        text_mlp_ratio: float = 4.0,
        text_causal: bool = True,
        text_pooling: Pooling | None = None,
        text_model: str | None = None,
        init_logit_scale: float = math.log(1 / 0.07),
        learn_logit_scale: bool = True,
        init_logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.config["image_backbone_kwargs"] = dict(image_backbone_kwargs or {})
        self.config["image_pretrained"] = False  # a rebuilt model takes its weights from the checkpoint
        self.image_encoder = create_backbone(
            image_backbone, num_classes=0, pretrained=image_pretrained, **dict(image_backbone_kwargs or {})
        )
        width = self.image_encoder.num_features
        self.image_projection = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=width**-0.5)
        if text_model:
            self.text_encoder: nn.Module = HFTextEncoder(text_model, embed_dim, pooling=text_pooling or "mean")
        else:
            self.text_encoder = TextTransformer(
                vocab_size=vocab_size,
                embed_dim=embed_dim,
                context_length=context_length,
                width=text_width,
                layers=text_layers,
                heads=text_heads,
                mlp_ratio=text_mlp_ratio,
                causal=text_causal,
                pooling=text_pooling or "eot",
            )
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=learn_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None

    def no_weight_decay(self) -> set[str]:
        """The temperature and the bias never take weight decay."""
        return {"logit_scale", "logit_bias"}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image-tower features before the projection (for probes, kNN and hand-over)."""
        return self.image_encoder(images)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image features in the joint space ``(B, embed_dim)``, L2-normalised unless ``normalize=False``."""
        features = self.image_projection(self.image_encoder(images))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Text features in the joint space ``(B, embed_dim)``, L2-normalised unless ``normalize=False``."""
        features = self.text_encoder(input_ids, attention_mask)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``(image_features, text_features)`` of matched pairs."""
        return self.encode_image(image), self.encode_text(input_ids, attention_mask)

    @torch.no_grad()
    def clamp_logit_scale(self, max_logit_scale: float = math.log(100)) -> None:
        """Clamp ``t`` to ``[0, max_logit_scale]`` (CLIP: the scale never exceeds 100)."""
        self.logit_scale.clamp_(0.0, max_logit_scale)

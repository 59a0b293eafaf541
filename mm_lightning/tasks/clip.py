"""CLIP pretraining: an image tower and a text tower trained with a contrastive loss into one space.

The image tower is any timm backbone (optionally initialised from another task's checkpoint);
the text tower is :class:`~mm_lightning.models.text.TextTransformer` or a local Hugging Face
encoder. Zero-shot classification and retrieval are measured by the callbacks in
:mod:`mm_lightning.callbacks.zeroshot` and :mod:`mm_lightning.callbacks.retrieval`, which use
:meth:`CLIPTask.encode_image` / :meth:`CLIPTask.encode_text` and the features that
``validation_step`` / ``test_step`` return.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from mm_lightning.checkpoint import state_dict_of
from mm_lightning.data.tokenizer import Tokenizer
from mm_lightning.losses.clip import clip_loss, siglip_loss
from mm_lightning.models.text import HFTextEncoder, Pooling, TextTransformer
from mm_lightning.models.vision import create_backbone
from mm_lightning.tasks.base import Task


class CheckpointMismatchError(ValueError):
    """A checkpoint's weights do not fit the backbone they should initialise."""


def _state_dict_of(path: str) -> dict[str, torch.Tensor]:
    try:
        return state_dict_of(path, "model.image_init")
    except ValueError as err:
        raise CheckpointMismatchError(str(err)) from None


def backbone_prefix(state: dict[str, torch.Tensor], wanted: set[str]) -> list[str]:
    """The key prefixes under which ``state`` holds every key of ``wanted`` (shortest first)."""
    counts: Counter[str] = Counter()
    for key in state:
        for name in wanted:
            if key.endswith(name) and (len(key) == len(name) or key[-len(name) - 1] == "."):
                counts[key[: len(key) - len(name)]] += 1
    return sorted((p for p, c in counts.items() if c >= len(wanted)), key=lambda p: (len(p), p))


def load_backbone_weights(backbone: nn.Module, path: str, prefix: str | None = None) -> str:
    """Copy a backbone's weights from a Lightning checkpoint of another task (classification, SSL, ...).

    The checkpoint's ``state_dict`` keys under ``prefix`` (e.g. ``model.`` for
    :class:`~mm_lightning.tasks.classification.ImageClassifier`) must hold every parameter and buffer
    of ``backbone`` with the same shape; a classifier head the backbone lacks is ignored. Without
    ``prefix`` the shortest prefix that holds all of them is used. Returns the prefix used.
    Raises :class:`CheckpointMismatchError` naming the checkpoint and the keys that do not fit.
    """
    state = _state_dict_of(path)
    own = backbone.state_dict()
    if prefix is None:
        found = backbone_prefix(state, set(own))
        if not found:
            sample = ", ".join(list(state)[:5])
            raise CheckpointMismatchError(
                f"model.image_init {path!r} holds no weights that fit model.image_backbone (wanted keys such as "
                f"{', '.join(list(own)[:3])}; the checkpoint has {sample}, ...): is it a checkpoint of the same "
                "architecture and backbone_kwargs? Set model.image_init_prefix if its keys carry a prefix"
            )
        prefix = found[0]
    missing = [k for k in own if prefix + k not in state]
    if missing:
        raise CheckpointMismatchError(
            f"model.image_init {path!r} lacks {len(missing)} backbone weight(s) under prefix {prefix!r}, e.g. "
            f"{', '.join(prefix + k for k in missing[:5])}"
        )
    wrong = [f"{prefix + k}: {tuple(state[prefix + k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if state[prefix + k].shape != v.shape]
    if wrong:
        raise CheckpointMismatchError(
            f"model.image_init {path!r}: {len(wrong)} weight(s) have another shape than model.image_backbone's "
            f"(checkpoint vs model): {'; '.join(wrong[:5])}"
        )
    backbone.load_state_dict({k: state[prefix + k] for k in own})
    return prefix


def text_sizes(
    tokenizer: Tokenizer | None, vocab_size: int | None, context_length: int | None, text_model: str | None = None
) -> tuple[int, int]:
    """The text tower's ``(vocab_size, context_length)``: the tokenizer's, or the explicit values of a model
    built in code without one. Both given, or neither, is an error naming the setting."""
    if tokenizer is not None:
        given = [n for n, v in (("vocab_size", vocab_size), ("context_length", context_length)) if v is not None]
        if given:
            raise ValueError(
                f"model.{' and model.'.join(given)}: read from the tokenizer ({tokenizer!r}); remove the setting "
                "(the config's top-level `tokenizer:` section sets it once)"
            )
        length = getattr(tokenizer, "context_length", None)
        if length is None:
            raise ValueError(f"tokenizer {tokenizer!r} has no context_length for the CLIP text tower")
        return int(tokenizer.vocab_size), int(length)
    if text_model:  # a Hugging Face text tower brings its own sizes
        return int(vocab_size or 0), int(context_length or 0)
    if vocab_size is None or context_length is None:
        raise ValueError(
            "CLIPTask needs a tokenizer: give the config a top-level `tokenizer:` section (class_path "
            "mm_lightning.data.tokenizer.TextTokenizer, init_args {path: ..., context_length: ...}), or, building "
            "the task in code, vocab_size and context_length"
        )
    return vocab_size, context_length


class CLIPTask(Task):
    """Contrastive image-text pretraining (CLIP, or SigLIP with ``loss: siglip``).

    Batches hold ``image`` ``(B, 3, H, W)`` and the caption's ``input_ids`` / ``attention_mask``
    ``(B, L)`` (:class:`~mm_lightning.data.samples.ImageTextPipeline`).

    Args:
        image_backbone: timm model name of the image tower, e.g. ``vit_tiny_patch16_224`` or ``resnet18``.
        image_backbone_kwargs: extra arguments for ``timm.create_model`` (``img_size``, ``patch_size``,
            ``embed_dim``, ``depth``, ``num_heads``, ...).
        image_pretrained: load timm's pretrained weights (downloads; off by default, never in tests).
        image_init: a ``.ckpt`` of another task (classification, self-supervised) whose backbone
            initialises the image tower at the start of ``fit``.
        image_init_prefix: key prefix of the backbone in ``image_init``'s state dict (e.g. ``model.``);
            found automatically when unset.
        lock_image: freeze the image tower (LiT: only the projection and the text tower train).
        tokenizer: the run's tokenizer (the config's top-level ``tokenizer:`` section, linked here by
            ``experiments.run``): the text tower's vocabulary size and context length are its ``vocab_size``
            and ``context_length``. Not saved in the hyper-parameters.
        embed_dim: width of the joint embedding space.
        vocab_size: rows of the text tower's token table, only for a model built in code without a
            tokenizer (a run reads it from the tokenizer; giving both is an error).
        context_length: longest caption in tokens, likewise only without a tokenizer.
        text_width: hidden size of the text transformer.
        text_layers: transformer blocks of the text tower.
        text_heads: attention heads of the text tower.
        text_mlp_ratio: MLP hidden size of the text tower as a multiple of ``text_width``.
        text_causal: causal attention (CLIP) instead of bidirectional attention.
        text_pooling: ``eot`` (end-of-text token), ``first`` or ``mean``; by default ``eot`` for the text
            transformer (CLIP) and ``mean`` for a Hugging Face ``text_model``.
        text_model: a local Hugging Face encoder directory to use as the text tower instead of the
            text transformer (its own tokenizer directory then goes into the pipeline's ``tokenizer``).
        loss: ``clip`` (symmetric InfoNCE) or ``siglip`` (pairwise sigmoid).
        local_loss: on several ranks, score only the local features against all gathered ones
            (``n x N`` logits instead of ``N x N``); same loss and gradients, less memory.
        gather_with_grad: gather the other ranks' features with gradient (exact global-batch gradients).
        init_logit_scale: initial log temperature ``t`` (the logits are scaled by ``exp(t)``);
            default ``log(1/0.07)`` for ``clip``, ``log(10)`` for ``siglip``.
        max_logit_scale: ``t`` is clamped to ``[0, max_logit_scale]`` after every optimizer step.
        learn_logit_scale: learn ``t`` (otherwise it stays fixed).
        init_logit_bias: initial bias of the SigLIP loss.
        **kwargs: optimizer settings of :class:`~mm_lightning.tasks.base.Task` (``lr``, ``weight_decay``, ...).
    """

    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(
        self,
        image_backbone: str = "vit_tiny_patch16_224",
        image_backbone_kwargs: dict[str, Any] | None = None,
        image_pretrained: bool = False,
        image_init: str | None = None,
        image_init_prefix: str | None = None,
        lock_image: bool = False,
        tokenizer: Tokenizer | None = None,
        embed_dim: int = 128,
        vocab_size: int | None = None,
        context_length: int | None = None,
        text_width: int = 128,
        text_layers: int = 3,
        text_heads: int = 4,
        text_mlp_ratio: float = 4.0,
        text_causal: bool = True,
        text_pooling: Pooling | None = None,
        text_model: str | None = None,
        loss: Literal["clip", "siglip"] = "clip",
        local_loss: bool = False,
        gather_with_grad: bool = True,
        init_logit_scale: float | None = None,
        max_logit_scale: float = math.log(100),
        learn_logit_scale: bool = True,
        init_logit_bias: float = -10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["tokenizer"])
        if loss not in ("clip", "siglip"):
            raise ValueError(f"model.loss must be 'clip' or 'siglip', got {loss!r}")
        self.tokenizer = tokenizer
        vocab_size, context_length = text_sizes(tokenizer, vocab_size, context_length, text_model)
        self.image_encoder = create_backbone(
            image_backbone, num_classes=0, pretrained=image_pretrained, **dict(image_backbone_kwargs or {})
        )
        self.image_projection = nn.Linear(self.image_encoder.num_features, embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=self.image_encoder.num_features**-0.5)
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
        if init_logit_scale is None:
            init_logit_scale = math.log(1 / 0.07) if loss == "clip" else math.log(10.0)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=learn_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if loss == "siglip" else None
        self.loss_name = loss
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.max_logit_scale = max_logit_scale
        self.image_init = image_init
        self.image_init_prefix = image_init_prefix
        self.lock_image = lock_image
        if lock_image:
            self.image_encoder.requires_grad_(False)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        """Check the tokenizer against a Hugging Face text tower; load ``image_init`` before ``fit`` (a resumed
        run's own checkpoint is restored afterwards and wins)."""
        tokenizer = self.tokenizer
        if tokenizer is not None and isinstance(self.text_encoder, HFTextEncoder):
            if tokenizer.vocab_size > self.text_encoder.vocab_size:
                raise ValueError(
                    f"tokenizer {tokenizer!r} has {tokenizer.vocab_size} tokens but model.text_model has only "
                    f"{self.text_encoder.vocab_size} embeddings: use the text model's own tokenizer"
                )
        if stage == "fit" and self.image_init:
            prefix = load_backbone_weights(self.image_encoder, self.image_init, self.image_init_prefix)
            rank_zero_info(f"image tower initialised from {self.image_init} (keys under {prefix!r})")

    def train(self, mode: bool = True) -> CLIPTask:
        super().train(mode)
        if self.lock_image:  # a locked tower stays in eval mode (no dropout, fixed norms)
            self.image_encoder.eval()
        return self

    def no_weight_decay_extra(self) -> set[str]:
        """The temperature and the SigLIP bias never take weight decay."""
        return {"logit_scale"} | ({"logit_bias"} if self.logit_bias is not None else set())

    # --------------------------------------------------------------- encoders
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image-tower features before the projection (for linear probes, kNN and hand-over)."""
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

    # ------------------------------------------------------------------- loss
    def contrastive_loss(
        self, image_features: torch.Tensor, text_features: torch.Tensor, gather: bool = True
    ) -> torch.Tensor:
        """The configured loss; ``gather=False`` scores this rank's batch only (evaluation)."""
        scale = self.logit_scale.exp()
        if self.loss_name == "siglip":
            return siglip_loss(image_features, text_features, scale, self.logit_bias, self.gather_with_grad, gather)
        return clip_loss(image_features, text_features, scale, self.local_loss, self.gather_with_grad, gather)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image_features, text_features = self(batch["image"], batch["input_ids"], batch.get("attention_mask"))
        loss = self.contrastive_loss(image_features, text_features)
        n = image_features.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/logit_scale", self.logit_scale.detach().exp(), batch_size=n)
        if self.logit_bias is not None:
            self.log("train/logit_bias", self.logit_bias.detach(), batch_size=n)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then clamp the log temperature to ``[0, max_logit_scale]`` (CLIP: at most ln 100)."""
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, self.max_logit_scale)

    # ------------------------------------------------------------- evaluation
    def _eval_step(self, batch: dict[str, Any], split: str) -> dict[str, torch.Tensor]:
        image_features, text_features = self(batch["image"], batch["input_ids"], batch.get("attention_mask"))
        # Evaluation batches may differ in number between ranks: no collective inside the step.
        loss = self.contrastive_loss(image_features, text_features, gather=False)
        self.log(f"{split}/loss", loss, batch_size=image_features.shape[0], sync_dist=True, prog_bar=split == "val")
        return {"image_features": image_features, "text_features": text_features}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        out = {"image_features": self.encode_image(batch["image"])}
        if "input_ids" in batch:
            out["text_features"] = self.encode_text(batch["input_ids"], batch.get("attention_mask"))
        return out

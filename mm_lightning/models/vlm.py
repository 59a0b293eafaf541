"""VisionLanguageModel: a vision tower + a connector + a Hugging Face causal LM.

Data path (one for every connector): the tower's token features (:mod:`mm_lightning.models.towers`: timm's
``forward_features`` or a transformers model's ``hidden_states[vision_feature_layer]``, class / register
tokens dropped only when the tower has them) -> the connector -> the LM.
Token connectors (``mlp``, ``qformer``, ``resampler``) replace the embeddings of the
``<image>`` tokens of ``input_ids`` with their output, row by row in order (``masked_scatter``);
each row must hold exactly ``num_image_tokens`` of them, or a :class:`ImageTokenMismatchError`
names the row. The fusion connector (``xattn``) leaves the embeddings alone and conditions the
gated cross-attention blocks it hooked into the LM. The LM receives ``inputs_embeds`` and
``position_ids`` counted over the attention mask (``cumsum - 1``, as Hugging Face generation does),
so left-padded and right-padded rows see the same positions.

No Lightning imports: the task (:mod:`mm_lightning.tasks.vlm`) wraps this module.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from mm_lightning.models import towers
from mm_lightning.models.connectors import Connector, ConnectorKind, GatedCrossAttentionFusion, build_connector
from mm_lightning.models.towers import VisionTower, tower_tokens


class ImageTokenMismatchError(ValueError):
    """A row's number of ``<image>`` tokens differs from what the connector produces."""


# ---------------------------------------------------------------------------------------- vision
def vision_tokens(vision: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Token features ``(B, N, D)`` of a vision tower (:mod:`mm_lightning.models.towers`: timm, transformers).

    A :class:`~mm_lightning.models.towers.VisionTower` gives what its source and options select
    (LLaVA's feature layer and class-token rule). A bare timm backbone gives ``forward_features`` without its
    ``num_prefix_tokens`` leading tokens (class / register tokens) and only those: a tower built without a
    class token keeps every patch. CNNs (``(B, C, H, W)``) give their ``H * W`` grid cells, row by row.
    """
    return tower_tokens(vision, image)


def tower_image_size(vision: nn.Module) -> int:
    """The square input side of a vision tower (a bare timm one: ``patch_embed.img_size``, else its config)."""
    return towers.tower_image_size(vision)


@torch.no_grad()
def vision_token_shape(vision: nn.Module, image_size: int) -> tuple[int, int]:
    """``(num_tokens, width)`` of :func:`vision_tokens` for ``image_size`` images."""
    if isinstance(vision, VisionTower):
        return vision.token_shape(image_size)
    was_training = vision.training
    vision.eval()
    try:
        param = next(vision.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = vision_tokens(vision, torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        vision.train(was_training)
    return int(out.shape[1]), int(out.shape[2])


# ------------------------------------------------------------------------------------------- LM
def build_lm(
    lm: dict[str, Any] | str | os.PathLike,
    vocab_size: int | None = None,
    special_tokens: dict[str, int | None] | None = None,
    random_init: bool = False,
) -> nn.Module:
    """A Hugging Face causal LM from a config dict, a hub id or a local directory.

    ``lm`` as a dict: ``{"model_type": "llama", "hidden_size": 128, ...}`` (``AutoConfig.for_model``),
    randomly initialised, with ``vocab_size`` rows. As a string: a hub id
    (``HuggingFaceTB/SmolLM2-135M-Instruct``) or a local directory, loaded by
    :func:`mm_lightning.models.lm.load_causal_lm` (downloaded only when online, the HF cache when
    offline, safetensors only, never remote code, weights that do not fit their config refused;
    ``random_init``: its config alone, no weights read). ``special_tokens`` (``pad_token_id``,
    ``bos_token_id``, ``eos_token_id``) are written into the config. The embeddings are resized to
    ``vocab_size`` when the tokenizer has more tokens than the LM (tokens were added, e.g. ``<image>``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from mm_lightning.models.lm import load_causal_lm

    if isinstance(lm, (str, os.PathLike)):
        model = load_causal_lm(lm, "model.lm", random_init=random_init)
    else:
        settings = dict(lm)
        model_type = settings.pop("model_type", None)
        if not model_type:
            raise ValueError("model.lm needs a model_type (e.g. llama) when given as a config")
        if vocab_size is not None:
            settings.setdefault("vocab_size", vocab_size)
        settings.setdefault("attn_implementation", "sdpa")
        attn = settings.pop("attn_implementation")
        config = AutoConfig.for_model(model_type, **settings)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    for name, value in (special_tokens or {}).items():
        if value is not None:
            setattr(model.config, name, value)
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, name, value)
    weight = model.get_input_embeddings().weight
    if vocab_size is not None and vocab_size > weight.shape[0]:
        # transformers fills the added rows from the old rows' mean and covariance, which reads values that a model
        # built on the meta device (parameter counts of real-size configs) does not have
        model.resize_token_embeddings(vocab_size, mean_resizing=weight.device.type != "meta")
    return model


def decoder_layers(lm: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder stack of a Hugging Face causal LM (``get_decoder()``) and its list of layers."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    for name in ("layers", "h", "blocks", "block"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return decoder, layers
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__} (looked for .layers, .h, .blocks)")


def lm_hidden_size(lm: nn.Module) -> int:
    return int(lm.get_input_embeddings().weight.shape[1])


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the attention mask (``cumsum - 1``, 0 on padding), as HF generation does."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


# ---------------------------------------------------------------------------------------- model
class VisionLanguageModel(nn.Module):
    """Vision tower + connector + causal LM (see the module docstring).

    Args:
        vision: a :class:`~mm_lightning.models.towers.VisionTower` (or a bare timm backbone, read as
            :func:`vision_tokens` says).
        connector: a :class:`~mm_lightning.models.connectors.Connector` matching the tower and the LM.
        lm: a Hugging Face causal LM (or a peft model wrapping one).
        image_token_id: the id of ``<image>`` in ``input_ids``.
    """

    def __init__(self, vision: nn.Module, connector: Connector, lm: nn.Module, image_token_id: int) -> None:
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.lm = lm
        self.image_token_id = int(image_token_id)
        self.vision_frozen = False  # a frozen tower runs without autograd (set by the task)
        if connector.fusion:
            self.attach_fusion()

    def attach_fusion(self) -> None:
        """(Re)hook the fusion connector into the LM's decoder layers (after wrapping the LM, e.g. peft)."""
        if isinstance(self.connector, GatedCrossAttentionFusion):
            self.connector.attach(*decoder_layers(self.lm))

    @property
    def num_image_tokens(self) -> int:
        return self.connector.num_image_tokens

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> VisionLanguageModel:
        """A model written by ``experiments.export --to mm-lightning`` (:mod:`mm_lightning.models.vlm_pretrained`:
        config.json + model.safetensors + the tokenizer), rebuilt from that directory alone."""
        from mm_lightning.models.vlm_pretrained import load_vlm

        return load_vlm(directory)

    # ------------------------------------------------------------------------- inputs
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """The tower's token features ``(B, Nv, Dv)`` (without autograd when the tower is frozen)."""
        if self.vision_frozen:
            with torch.no_grad():
                return vision_tokens(self.vision, image)
        return vision_tokens(self.vision, image)

    def check_image_tokens(self, input_ids: torch.Tensor, has_image: bool) -> torch.Tensor:
        """Per row, the count of ``<image>`` tokens; raises naming the first row that does not fit."""
        counts = (input_ids == self.image_token_id).sum(dim=1)
        expected = self.num_image_tokens if has_image else 0
        bad = (counts != expected).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            if not has_image:
                raise ImageTokenMismatchError(
                    f"sample {i} of the batch holds {int(counts[i])} <image> token(s) but the batch has no image"
                )
            raise ImageTokenMismatchError(
                f"sample {i} of the batch holds {int(counts[i])} <image> token(s), but the "
                f"{type(self.connector).__name__} connector gives {expected} per image: the pipeline's "
                f"num_image_tokens must equal the connector's ({expected})"
            )
        return counts

    def prepare_inputs(
        self, image: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``inputs_embeds``, ``attention_mask`` and ``position_ids`` for the LM; conditions a fusion
        connector (call :meth:`release` after the LM ran)."""
        self.check_image_tokens(input_ids, image is not None)
        embed = self.lm.get_input_embeddings()
        is_image = input_ids == self.image_token_id
        positions = positions_from_mask(attention_mask)
        if image is None:
            return {"inputs_embeds": embed(input_ids), "attention_mask": attention_mask, "position_ids": positions}
        visual = self.encode_image(image)
        if self.connector.fusion:
            embeds = embed(input_ids)
            big = torch.iinfo(positions.dtype).max
            first = torch.where(is_image, positions, torch.full_like(positions, big)).amin(dim=1)
            self.connector.condition(self.connector.resample(visual), first)
            return {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": positions}
        tokens = self.connector(visual)
        # the image token's own embedding is never used by token connectors: look up a valid id instead
        embeds = embed(input_ids.masked_fill(is_image, 0))
        embeds = embeds.masked_scatter(is_image[..., None], tokens.to(embeds.dtype))
        return {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": positions}

    def release(self) -> None:
        """Drop a fusion connector's conditioning (visual tokens) after the LM ran."""
        if self.connector.fusion:
            self.connector.clear()

    # ------------------------------------------------------------------------ forward
    def forward(
        self,
        image: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The LM's output (``.logits``; ``.loss`` when ``labels`` are given, shifted once by the LM).

        ``image`` ``None`` runs the LM on text alone (the ``lm`` stage).
        """
        inputs = self.prepare_inputs(image, input_ids, attention_mask)
        try:
            return self.lm(**inputs, labels=labels, use_cache=False, **kwargs)
        finally:
            self.release()

    def sequence_logprobs(
        self,
        image: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Summed log-probabilities ``(B,)`` of the tokens whose label is not -100 (TRL's convention:
        ``log_softmax(logits[:, :-1]).gather(labels[:, 1:])``); for DPO and reward models."""
        logits = self(image, input_ids, attention_mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != -100
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return (logp * mask).sum(dim=1)

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int = 16,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy (unless ``kwargs`` say otherwise) generation from LEFT-padded prompts with the KV cache.

        Returns only the new tokens ``(B, T)``; rows that stopped early are filled with ``pad_token_id``.
        """
        if attention_mask.shape[1] and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs left-padded prompts: a row ends in padding")
        inputs = self.prepare_inputs(image, input_ids, attention_mask)
        options = {"do_sample": False, **kwargs}
        if pad_token_id is None:
            pad_token_id = getattr(self.lm.config, "pad_token_id", None)
        try:
            return self.lm.generate(
                inputs_embeds=inputs["inputs_embeds"],
                attention_mask=inputs["attention_mask"],
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                **options,
            )
        finally:
            self.release()


def build_vlm(
    vision: nn.Module,
    lm: nn.Module,
    connector: ConnectorKind,
    image_token_id: int,
    image_size: int | None = None,
    **connector_kwargs: Any,
) -> VisionLanguageModel:
    """Join ``vision`` and ``lm`` with a new connector of kind ``connector`` sized for both."""
    size = image_size or tower_image_size(vision)
    num_tokens, width = vision_token_shape(vision, size)
    _, layers = decoder_layers(lm)
    conn = build_connector(connector, width, num_tokens, lm_hidden_size(lm), len(layers), **connector_kwargs)
    return VisionLanguageModel(vision, conn, lm, image_token_id)

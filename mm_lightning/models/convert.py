"""Weights of our towers into the ecosystem's classes, so what we train loads without us.

:func:`timm_vit_to_siglip` turns a timm ``VisionTransformer`` without a class token (the towers of the
shapes configs, ``vit_shapes``) into a transformers ``SiglipVisionModel``: SigLIP's vision tower has the
same pre-norm blocks, learned position embeddings of the patches only, and a final LayerNorm
(``post_layernorm``), so the mapping is a renaming plus the split of timm's fused ``qkv``. The blocks' output,
``hidden_states[-1]`` (the features LLaVA-style models take), equals timm's ``forward_features`` to float
rounding when timm's final ``norm`` is an identity (``global_pool`` avg/max towers, whose norm timm applies
after pooling as ``fc_norm``: that norm becomes ``post_layernorm``); otherwise ``last_hidden_state`` does.
Towers it cannot represent (a class or register token, layer scale, q/k norm, another activation)
are refused naming what differs.

:func:`portable_timm_model` rebuilds one of our timm models under an architecture timm registers itself
(``vit_shapes`` -> ``vit_tiny_patch16_224`` with its settings spelled out), so timm's ``config.json``
(:func:`timm_config`) builds it without us. :func:`clip_to_open_clip` maps our CLIP onto open_clip's ``CLIP``
(timm image tower, its text transformer), refusing the text towers open_clip cannot represent
(:func:`check_open_clip_text`). No Lightning imports.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class ConversionError(ValueError):
    """A model whose architecture the target class cannot represent (names what differs)."""


def _siglip_config_of(vit: nn.Module) -> dict[str, Any]:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise ConversionError(f"only a timm VisionTransformer converts to SigLIP, not {type(vit).__name__}")
    if getattr(vit, "num_prefix_tokens", 0):
        raise ConversionError(f"the ViT has {vit.num_prefix_tokens} class/register token(s); SigLIP's tower has none "
                              "(build it with class_token: false)")
    if not isinstance(vit.norm_pre, nn.Identity):
        raise ConversionError("the ViT has a pre-norm before its blocks (CLIP-style); SigLIP has none")
    block = vit.blocks[0]
    for name in ("ls1", "ls2"):
        if not isinstance(getattr(block, name, nn.Identity()), nn.Identity):
            raise ConversionError("the ViT uses layer scale; SigLIP's blocks have none")
    if not (isinstance(block.attn.q_norm, nn.Identity) and isinstance(block.attn.k_norm, nn.Identity)):
        raise ConversionError("the ViT normalises q and k; SigLIP's attention does not")
    act = block.mlp.act
    if not (isinstance(act, nn.GELU) and act.approximate == "none"):
        raise ConversionError(f"the ViT's MLP activation is {act}; only exact GELU is converted")
    size = vit.patch_embed.img_size
    patch = vit.patch_embed.patch_size
    if size[0] != size[1] or patch[0] != patch[1]:
        raise ConversionError(f"non-square images {size} or patches {patch} do not convert to SigLIP")
    if vit.pos_embed is None or vit.pos_embed.shape[1] != vit.patch_embed.num_patches:
        raise ConversionError("the ViT's position embedding does not hold exactly one entry per patch")
    return {
        "hidden_size": int(vit.embed_dim),
        "intermediate_size": int(block.mlp.fc1.out_features),
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": int(block.attn.num_heads),
        "num_channels": int(vit.patch_embed.proj.in_channels),
        "image_size": int(size[0]),
        "patch_size": int(patch[0]),
        "hidden_act": "gelu",
        "layer_norm_eps": float(block.norm1.eps),
        "vision_use_head": False,
    }


@torch.no_grad()
def timm_vit_to_siglip(vit: nn.Module) -> nn.Module:
    """A ``transformers.SiglipVisionModel`` holding ``vit``'s weights (see the module docstring)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(**_siglip_config_of(vit))
    model = SiglipVisionModel(config).eval()
    source = {k: v.detach().float().cpu() for k, v in vit.state_dict().items()}
    # the key prefix of the tower's modules ("vision_model." in transformers 4, "" in 5)
    top = next(k for k in model.state_dict() if k.endswith("embeddings.patch_embedding.weight"))[:-len("embeddings.patch_embedding.weight")]
    width = config.hidden_size
    state: dict[str, torch.Tensor] = {
        f"{top}embeddings.patch_embedding.weight": source["patch_embed.proj.weight"],
        f"{top}embeddings.patch_embedding.bias": source["patch_embed.proj.bias"],
        f"{top}embeddings.position_embedding.weight": source["pos_embed"][0],
    }
    final = "norm" if "norm.weight" in source else "fc_norm"  # timm moves the final norm after pooling (fc_norm)
    if f"{final}.weight" in source:
        state[f"{top}post_layernorm.weight"] = source[f"{final}.weight"]
        state[f"{top}post_layernorm.bias"] = source[f"{final}.bias"]
    else:
        state[f"{top}post_layernorm.weight"] = torch.ones(width)
        state[f"{top}post_layernorm.bias"] = torch.zeros(width)
    renames = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(config.num_hidden_layers):
        ours, theirs = f"blocks.{i}.", f"{top}encoder.layers.{i}."
        for a, b in renames.items():
            for kind in ("weight", "bias"):
                state[f"{theirs}{b}.{kind}"] = source[f"{ours}{a}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = source[f"{ours}attn.qkv.{kind}"].split(width, dim=0)
            for name, value in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                state[f"{theirs}self_attn.{name}.{kind}"] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ConversionError(f"timm -> SigLIP mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


# --- timm: an architecture timm builds without mm-lightning ------------------------------------------------------

#: keys of a timm ``pretrained_cfg`` that describe where a registered architecture's published weights came from;
#: an export under that architecture's name holds other weights, so they are dropped from its config
PROVENANCE_KEYS = ("tag", "license", "paper_ids", "paper_name", "notes", "origin_url", "hf_hub_id", "url", "file",
                   "source", "hf_hub_filename")


def portable_timm_args(name: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(architecture, arguments)``: a timm-registered architecture and the ``timm.create_model`` arguments that
    build the same network as ``create_backbone(name, **kwargs)``, so timm (and open_clip's timm tower) build it
    without our code. ``vit_shapes`` (registered by :mod:`mm_lightning.models.vision`) becomes
    ``vit_tiny_patch16_224`` with every ``VIT_SHAPES`` setting spelled out (that entry point only passes its
    arguments to timm's ``VisionTransformer``); a timm model name stays as is; a model registered elsewhere is
    refused (timm cannot build it without that code)."""
    from timm.models import model_entrypoint

    from mm_lightning.models.vision import VIT_SHAPES

    if name == "vit_shapes":
        return "vit_tiny_patch16_224", {**VIT_SHAPES, **kwargs}
    try:
        module = model_entrypoint(name).__module__
    except RuntimeError:
        raise ConversionError(f"unknown timm model {name!r}") from None
    if not module.startswith("timm."):
        raise ConversionError(f"timm model {name!r} is registered by {module}, outside timm: timm cannot build it "
                              "without that code")
    return name, dict(kwargs)


@torch.no_grad()
def portable_timm_model(model: nn.Module, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``model`` (built as ``create_backbone(name, **kwargs)``) rebuilt under :func:`portable_timm_args`'s
    architecture, holding its weights: every key and shape must match (``load_state_dict(strict=True)``), so a
    mapping that builds another network is refused rather than written."""
    import timm

    arch, args = portable_timm_args(name, kwargs)
    rebuilt = timm.create_model(arch, pretrained=False, **args)
    try:
        rebuilt.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ConversionError(f"timm's {arch} with {sorted(args)} is not the network of {name!r}: "
                              f"{' '.join(first[:2])[:300]}") from None
    return rebuilt.eval()


def timm_config(model: nn.Module, data_config: dict[str, Any], label_names: list[str] | None = None) -> dict[str, Any]:
    """timm's own ``config.json`` for ``model`` (``timm.models.save_for_hf`` writes it: ``architecture``,
    ``num_classes``, ``model_args``, ``pretrained_cfg``), with the preprocessing of ``data_config`` (``input_size``,
    ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``) and without the provenance of the
    architecture's published weights (:data:`PROVENANCE_KEYS`)."""
    import json
    import tempfile
    from pathlib import Path

    from timm.models._hub import save_config_for_hf

    extra = {"label_names": list(label_names)} if label_names else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        save_config_for_hf(model, path, model_config=extra, data_config=data_config)
        config = json.loads(path.read_text())
    for key in PROVENANCE_KEYS:
        config["pretrained_cfg"].pop(key, None)
    return config


# --- open_clip -------------------------------------------------------------------------------------------------------

#: timm settings of the image tower that open_clip's ``TimmModel`` passes on itself (the others it cannot pass)
_OPEN_CLIP_TIMM_ARGS = {"drop_path_rate": "timm_drop_path"}


def check_open_clip_text(text: nn.Module) -> None:
    """Raise a ConversionError naming the setting of our text tower that open_clip's CLIP text tower cannot
    represent (see :func:`open_clip_text_cfg`)."""
    import torch.nn.functional as F

    from mm_lightning.models.text import TextTransformer

    if not isinstance(text, TextTransformer):
        raise ConversionError(
            "model.text_model: a Hugging Face text tower does not export to open_clip (open_clip's HFTextEncoder "
            "masks pads by pad id, has no final norm and builds the encoder from a hub id); only our "
            "TextTransformer does")
    if not text.causal:
        raise ConversionError(
            "model.text_causal: false: open_clip's CLIP text tower without its causal mask attends to the pad tokens "
            "(its pad mask is not reachable from a model config); only causal text towers export")
    if text.pooling not in ("eot", "first"):
        raise ConversionError(f"model.text_pooling: {text.pooling}: open_clip's text tower pools the first, last, "
                              "argmax or end-of-text token only")
    activation = text.transformer.layers[0].activation
    if activation is not F.gelu:
        raise ConversionError(f"the text tower's activation {activation} is not exact GELU, open_clip's")


def open_clip_text_cfg(text: nn.Module, eos_token_id: int | None) -> dict[str, Any]:
    """open_clip ``text_cfg`` of our :class:`~mm_lightning.models.text.TextTransformer`, or a ConversionError
    naming the setting open_clip's CLIP text tower cannot represent (:func:`check_open_clip_text`).

    Both are pre-norm transformers (token + learned position embeddings, exact GELU, LayerNorm, a final LayerNorm
    on every token, a bias-free projection); the causal mask is the same. Our ``eot`` pooling (the last unmasked
    position) is open_clip's ``eos`` pooling (the first ``eos_id``) when the tokenizer ends every text with that
    one token (the caller checks the tokenizer); ``first`` is ``first``.
    """
    check_open_clip_text(text)
    if text.pooling == "eot":
        if eos_token_id is None:
            raise ConversionError("model.text_pooling: eot needs a tokenizer with an end-of-text token")
        pool = {"pool_type": "eos", "eos_id": int(eos_token_id)}
    else:
        pool = {"pool_type": "first"}
    block = text.transformer.layers[0]
    eps = float(block.norm1.eps)
    cfg: dict[str, Any] = {
        "context_length": int(text.context_length),
        "vocab_size": int(text.token_embedding.num_embeddings),
        "width": int(text.token_embedding.embedding_dim),
        "heads": int(block.self_attn.num_heads),
        "layers": len(text.transformer.layers),
        "mlp_ratio": block.linear1.out_features / block.linear1.in_features,
        "no_causal_mask": False,
        "proj_bias": False,
        **pool,
    }
    if eps != 1e-5:
        cfg["norm_kwargs"] = {"eps": eps}
    return cfg


@torch.no_grad()
def clip_to_open_clip(clip: nn.Module, eos_token_id: int | None, image_size: int,
                      tower_dir: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], nn.Module | None]:
    """``(model_cfg, state_dict, timm_tower)``: our :class:`~mm_lightning.models.clip.CLIP` as open_clip's ``CLIP``.

    The image tower is open_clip's ``TimmModel`` (``vision_cfg.timm_model_name``; ``visual.trunk`` is the timm model,
    ``visual.head.proj`` our bias-free image projection). open_clip builds it as ``timm.create_model(name)``, passing
    no architecture arguments: a timm model name built without arguments is written as that name; any other tower
    (``vit_shapes``, ``image_backbone_kwargs``) as ``local-dir:<tower_dir>``, where the caller writes timm's
    ``config.json`` of ``timm_tower`` (architecture + ``model_args``; timm reads it, no code of ours).
    ``timm_tower`` is ``None`` when no directory is needed. The text tower: :func:`open_clip_text_cfg`.
    The temperature ``logit_scale`` (and a SigLIP ``logit_bias``) carry over.
    """
    config = clip.config
    text_cfg = open_clip_text_cfg(clip.text_encoder, eos_token_id)
    name, kwargs = config["image_backbone"], dict(config.get("image_backbone_kwargs") or {})
    arch, args = portable_timm_args(name, kwargs)
    vision_cfg: dict[str, Any] = {"image_size": int(image_size), "timm_pool": "", "timm_proj": "linear",
                                  "timm_proj_bias": False}
    plain = {k: v for k, v in args.items() if k not in _OPEN_CLIP_TIMM_ARGS}
    tower = None
    if arch == name and not plain:  # timm builds it from the name alone
        vision_cfg["timm_model_name"] = name
        for key, option in _OPEN_CLIP_TIMM_ARGS.items():
            if key in args:
                vision_cfg[option] = args[key]
    else:
        tower = portable_timm_model(clip.image_encoder, name, {"num_classes": 0, **kwargs})
        vision_cfg["timm_model_name"] = f"local-dir:{tower_dir}"
    model_cfg: dict[str, Any] = {"embed_dim": int(clip.image_projection.out_features), "quick_gelu": False,
                                 "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if clip.logit_bias is not None:
        model_cfg["init_logit_bias"] = float(clip.logit_bias)

    text = clip.text_encoder
    source = {k: v.detach().float().cpu().contiguous() for k, v in clip.state_dict().items()}
    state: dict[str, torch.Tensor] = {f"visual.trunk.{k[len('image_encoder.'):]}": v for k, v in source.items()
                                      if k.startswith("image_encoder.")}
    state["visual.head.proj.weight"] = source["image_projection.weight"]
    state["token_embedding.weight"] = source["text_encoder.token_embedding.weight"]
    state["positional_embedding"] = source["text_encoder.positional_embedding"]
    renames = {"norm1": "ln_1", "norm2": "ln_2", "self_attn.out_proj": "attn.out_proj", "linear1": "mlp.c_fc",
               "linear2": "mlp.c_proj"}
    for i in range(len(text.transformer.layers)):
        ours, theirs = f"text_encoder.transformer.layers.{i}.", f"transformer.resblocks.{i}."
        for a, b in renames.items():
            for kind in ("weight", "bias"):
                state[f"{theirs}{b}.{kind}"] = source[f"{ours}{a}.{kind}"]
        state[f"{theirs}attn.in_proj_weight"] = source[f"{ours}self_attn.in_proj_weight"]
        state[f"{theirs}attn.in_proj_bias"] = source[f"{ours}self_attn.in_proj_bias"]
    state["ln_final.weight"] = source["text_encoder.ln_final.weight"]
    state["ln_final.bias"] = source["text_encoder.ln_final.bias"]
    state["text_projection"] = source["text_encoder.text_projection.weight"].t().contiguous()
    state["logit_scale"] = source["logit_scale"]
    if clip.logit_bias is not None:
        state["logit_bias"] = source["logit_bias"]
    return model_cfg, state, tower

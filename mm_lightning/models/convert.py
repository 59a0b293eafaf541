"""Weights of our towers into the ecosystem's classes, so what we train loads without us.

:func:`timm_vit_to_siglip` turns a timm ``VisionTransformer`` without a class token (the towers of the
shapes configs, ``vit_shapes``) into a transformers ``SiglipVisionModel``: SigLIP's vision tower has the
same pre-norm blocks, learned position embeddings of the patches only, and a final LayerNorm
(``post_layernorm``), so the mapping is a renaming plus the split of timm's fused ``qkv``. The blocks' output,
``hidden_states[-1]`` (the features LLaVA-style models take), equals timm's ``forward_features`` to float
rounding when timm's final ``norm`` is an identity (``global_pool`` avg/max towers, whose norm timm applies
after pooling as ``fc_norm``: that norm becomes ``post_layernorm``); otherwise ``last_hidden_state`` does.
Towers it cannot represent (a class or register token, layer scale, q/k norm, another activation)
are refused naming what differs. No Lightning imports.
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

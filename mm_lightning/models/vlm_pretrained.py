"""This framework's own directory layout of a multimodal LLM, for what no ecosystem class holds (the ``qformer``,
``resampler`` and ``xattn`` connectors, ``mlp`` with pixel shuffle, timm towers): ``experiments.export --to
mm-lightning`` writes it, :meth:`VisionLanguageModel.from_pretrained` reads it back with no checkpoint, run
directory or source model directory.

``DIR/config.json``::

    {"model_type": "mm_lightning_vlm", "format_version": 1, "image_token_id": 5,
     "vision": {"source": "transformers", "config": {...the tower's transformers config...}, "feature_layer": -1,
                "select": "full", "image_size": 32, "mean": [...], "std": [...]}
            or {"source": "timm", "name": "vit_tiny_patch16_224", "kwargs": {...timm.create_model arguments...},
                "feature_layer": null, "select": "default", "image_size": 32},
     "connector": {"kind": "qformer", "kwargs": {...the connector's options...}},
     "lm": {...the causal LM's transformers config...},
     "hyper_parameters": {...the task's, for the record...}}

``DIR/model.safetensors`` holds the model's state dict (LoRA adapters merged; tied tensors stored once), and the
tokenizer (with its chat template and ``<image>``) is saved beside them, so ``ChatTokenizer(DIR)`` reads it.
Everything is rebuilt from ``config.json`` alone (nothing is downloaded: timm towers by name without pretrained
weights, transformers towers and LMs from their configs) and the weights loaded strictly.

No Lightning imports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from mm_lightning.models.convert import ConversionError
from mm_lightning.models.hub import PretrainedError

MODEL_TYPE = "mm_lightning_vlm"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def tower_spec(tower: nn.Module, vision_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """How :func:`load_vlm` rebuilds ``tower`` (a transformers tower from its config, a timm tower by name)."""
    from mm_lightning.models.towers import TimmTower, TransformersTower

    common = {"feature_layer": tower.feature_layer if hasattr(tower, "feature_layer") else None,
              "select": getattr(tower, "select", "default"), "image_size": getattr(tower, "image_size", None)}
    if isinstance(tower, TransformersTower):
        return {"source": "transformers", "config": tower.model.config.to_dict(), **common,
                "mean": list(tower.mean), "std": list(tower.std)}
    if isinstance(tower, TimmTower) and not tower.name.startswith(("hf-hub:", "local-dir:")):
        return {"source": "timm", "name": tower.name, "kwargs": dict(vision_kwargs or {}), **common}
    name = getattr(tower, "name", type(tower).__name__)
    raise ConversionError(f"the vision tower {name!r} comes from a timm directory or hub repository, which --to "
                          "mm-lightning does not rebuild (timm towers by name only): export it with --to siglip and "
                          "train with that directory")


def save_vlm(model: nn.Module, directory: str | os.PathLike, connector: str, connector_kwargs: dict[str, Any] | None,
             vision_kwargs: dict[str, Any] | None = None, tokenizer: Any = None,
             hyper_parameters: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a :class:`~mm_lightning.models.vlm.VisionLanguageModel` whose LM is plain, LoRA merged) in the
    layout of the module docstring. ``connector`` / ``connector_kwargs`` / ``vision_kwargs``: the options it was
    built with (the task's); ``tokenizer``: a Hugging Face tokenizer saved beside it."""
    from safetensors.torch import save_model

    lm = model.lm
    if hasattr(lm, "get_base_model"):
        raise ConversionError("the LM carries LoRA adapters: merge them first (VisionLanguageTask.merge_lora)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, "image_token_id": int(model.image_token_id),
        "vision": tower_spec(model.vision, vision_kwargs),
        "connector": {"kind": connector, "kwargs": dict(connector_kwargs or {})},
        "lm": lm.config.to_dict(),
        "hyper_parameters": dict(hyper_parameters or {}),
    }
    save_model(model, str(out / WEIGHTS))  # shared (tied) tensors once
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _build_tower(spec: dict[str, Any], where: str) -> nn.Module:
    import transformers

    from mm_lightning.models.towers import HF_TOWERS, TransformersTower, build_tower

    if spec.get("source") == "timm":
        return build_tower(spec["name"], spec.get("kwargs"), source="timm", feature_layer=spec.get("feature_layer"),
                           select=spec.get("select", "default"), image_size=spec.get("image_size"))
    if spec.get("source") != "transformers":
        raise PretrainedError(f"{where}: vision.source must be timm or transformers, got {spec.get('source')!r}")
    config = dict(spec["config"])
    kind = HF_TOWERS.get(config.get("model_type"))
    if kind is None:
        raise PretrainedError(f"{where}: the vision tower's model_type {config.get('model_type')!r} is not supported")
    cls = getattr(transformers, kind.cls)
    model = cls._from_config(cls.config_class.from_dict(config)).eval()
    return TransformersTower(model, where, kind, int(spec["image_size"]), tuple(spec["mean"]), tuple(spec["std"]),
                             feature_layer=spec.get("feature_layer"), select=spec.get("select", "default"))


def load_vlm(directory: str | os.PathLike) -> nn.Module:
    """The :class:`~mm_lightning.models.vlm.VisionLanguageModel` saved by :func:`save_vlm` in ``directory``."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from mm_lightning.models.vlm import VisionLanguageModel, build_vlm

    where = f"mm-lightning model {os.fspath(directory)!r}"
    path = Path(directory)
    if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
        raise PretrainedError(f"{where}: needs config.json and {WEIGHTS} (written by experiments.export --to "
                              "mm-lightning)")
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as err:
        raise PretrainedError(f"{where}: config.json is not JSON: {err}") from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise PretrainedError(f"{where}: config.json has model_type {found!r}, not {MODEL_TYPE!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise PretrainedError(f"{where}: format_version {config.get('format_version')!r}; this version reads "
                              f"{FORMAT_VERSION}")
    tower = _build_tower(config["vision"], where)
    lm_config = dict(config["lm"])
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(lm_config.pop("model_type"), **lm_config))
    connector = config["connector"]
    model = build_vlm(tower, lm, connector["kind"], int(config["image_token_id"]), tower.image_size,
                      **connector["kwargs"])
    assert isinstance(model, VisionLanguageModel)
    try:
        load_model(model, str(path / WEIGHTS), strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PretrainedError(f"{where}: {WEIGHTS} does not fit its config.json: {first}") from None
    return model.eval()

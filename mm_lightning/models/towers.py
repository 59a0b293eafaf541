"""Vision towers of the multimodal LLM from every source a user has, behind one interface.

:func:`build_tower` turns ``model.vision`` (and its options) into a :class:`VisionTower`:

- a timm model by name (``vit_tiny_patch16_224``, ``vit_base_patch16_siglip_224.webli``), built from
  ``vision_kwargs``; ``vision_pretrained`` loads timm's pretrained weights (``pretrained=True``: the
  hub when online, the HF cache and ``HF_HUB_OFFLINE`` honoured) and ``vision_weights`` a local
  safetensors file (timm's ``pretrained_cfg_overlay=dict(file=...)``); ``hf-hub:org/name`` as timm reads it;
- a transformers vision model by hub id or local directory: ``SiglipVisionModel``, ``CLIPVisionModel``,
  ``Dinov2Model`` (``Dinov2WithRegistersModel``), or the vision half of a full CLIP / SigLIP checkpoint
  (only ``vision_model.*`` is read);
- a timm model directory (``config.json`` with timm's ``architecture`` key, as ``save_for_hf`` writes it).

The source (``vision_source: auto``): an existing directory is read by its ``config.json``
(``model_type`` -> transformers, ``architecture`` -> timm); ``hf-hub:`` -> timm; a hub id
``org/name`` -> its config decides the same way; anything else is a timm name.

Token features (``(B, N, D)``, what the connector reads) follow LLaVA (``LlavaModel.get_image_features``):
a transformers tower runs with ``output_hidden_states=True`` and gives ``hidden_states[vision_feature_layer]``
(default -2 for CLIP as LLaVA-1.5, -1 for SigLIP and DINOv2: the last block's output; nanoVLM also
applies SigLIP's ``post_layernorm``, which is not done here); that is
the encoder output before any final norm (CLIP's ``post_layernorm`` only touches the pooled token,
SigLIP's ``post_layernorm`` and DINOv2's ``layernorm`` are NOT applied: ``last_hidden_state`` differs
from ``hidden_states[-1]`` there). ``vision_select: default`` drops the tokens that are not patches
(CLIP's and DINOv2's class token, DINOv2-with-registers' class and register tokens; SigLIP has none and
keeps every patch, unlike LLaVA's unconditional ``[:, 1:]``), ``full`` keeps them. A timm tower gives
``forward_features`` (final norm applied) without ``vision_feature_layer``, or the pre-norm output of
block ``vision_feature_layer`` (same indexing as ``hidden_states``: -1 the last block, 1 the first) with it;
``default`` drops its ``num_prefix_tokens`` (class and register tokens).

Each tower reports the preprocessing it was trained with (:attr:`VisionTower.preprocessing`:
``image_size``, ``mean``, ``std``): timm's ``pretrained_cfg`` (the built model's ``img_size``), a
transformers directory's ``preprocessor_config.json`` (e.g. SigLIP 0.5 / 0.5, CLIP OpenAI's), else
the vision config's ``image_size`` and the processor class's published default normalisation.

Every failure is one line (:class:`~mm_lightning.models.hub.PretrainedError`, a ``ValueError``) naming
the option and the path or id. No Lightning imports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from mm_lightning.models.hub import (
    CONFIG_FILE,
    PretrainedError,
    check_cached,
    check_local_dir,
    from_pretrained_kwargs,
    is_offline,
    looks_like_hub_id,
    read_json,
    resolve,
)

TowerSource = Literal["auto", "timm", "transformers"]
SelectStrategy = Literal["default", "full"]
PREPROCESSOR_FILE = "preprocessor_config.json"
OPTION = "model.vision"

# published normalisations of the processor classes (transformers.image_utils constants, spelled out)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class HFTowerKind:
    """How a transformers vision model of one ``model_type`` is loaded and read."""

    cls: str  # the transformers class holding the vision encoder (vision half of a full checkpoint)
    feature_layer: int  # LLaVA's vision_feature_layer default for it
    prefix_tokens: Callable[[Any], int]  # non-patch tokens at the front of its hidden states
    mean: tuple[float, float, float]  # normalisation of its processor class when no preprocessor_config.json
    std: tuple[float, float, float]
    interpolate_kwarg: bool  # forward takes interpolate_pos_encoding (DINOv2 always interpolates)


_CLIP = HFTowerKind("CLIPVisionModel", -2, lambda c: 1, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, True)
_SIGLIP = HFTowerKind("SiglipVisionModel", -1, lambda c: 0, HALF, HALF, True)
_DINOV2 = HFTowerKind("Dinov2Model", -1, lambda c: 1, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, False)
_DINOV2_REG = HFTowerKind("Dinov2WithRegistersModel", -1, lambda c: 1 + int(c.num_register_tokens),
                          IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, False)
#: transformers ``model_type`` -> how to load it (full CLIP / SigLIP checkpoints: only their vision model)
HF_TOWERS: dict[str, HFTowerKind] = {
    "clip": _CLIP, "clip_vision_model": _CLIP,
    "siglip": _SIGLIP, "siglip_vision_model": _SIGLIP,
    "dinov2": _DINOV2, "dinov2_with_registers": _DINOV2_REG,
}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _triple(values: Any, what: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) == 1:
        out = out * 3
    if len(out) != 3:
        raise PretrainedError(f"{what} is {values!r}, not three per-channel values")
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ the wrappers
class VisionTower(nn.Module):
    """A vision encoder (``self.model``) with the interface of the multimodal LLM.

    ``forward(image)`` -> token features ``(B, N, D)``; :attr:`image_size` the square input side;
    :meth:`token_shape` ``(N, D)``; :attr:`preprocessing` ``{"image_size", "mean", "std"}``.
    """

    source: str = ""

    def __init__(self, model: nn.Module, name: str, select: SelectStrategy, image_size: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        if select not in ("default", "full"):
            raise ValueError(f"model.vision_select must be 'default' or 'full', got {select!r}")
        self.model = model
        self.name = name
        self.select = select
        self.image_size = int(image_size)
        self.mean, self.std = mean, std

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What the data pipeline must give this tower: ``image_size``, ``mean``, ``std``."""
        return {"image_size": self.image_size, "mean": tuple(self.mean), "std": tuple(self.std)}

    def token_shape(self, image_size: int | None = None) -> tuple[int, int]:
        """``(num_tokens, width)`` of :meth:`forward` for ``image_size`` images (one dry run)."""
        size = int(image_size or self.image_size)
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            with torch.no_grad():
                out = self(torch.zeros(1, 3, size, size, device=device))
        finally:
            self.train(was_training)
        return int(out.shape[1]), int(out.shape[2])

    def extra_repr(self) -> str:
        return f"source={self.source}, name={self.name!r}, select={self.select}, image_size={self.image_size}"


def _legacy_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints written before the timm model was wrapped hold ``vision.<timm key>``: read them as
    ``vision.model.<timm key>``."""
    own = prefix + "model."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]:
        state_dict[own + key[len(prefix):]] = state_dict.pop(key)


class TimmTower(VisionTower):
    """A timm backbone: ``forward_features`` (or one block's output) with its prefix tokens dropped by ``default``.

    CNNs (``(B, C, H, W)`` features) give their ``H * W`` grid cells, row by row.
    """

    source = "timm"

    def __init__(self, model: nn.Module, name: str, feature_layer: int | None = None, select: SelectStrategy = "default",
                 image_size: int | None = None) -> None:
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(model)
        super().__init__(model, name, select, image_size or timm_image_size(model),
                         _triple(config["mean"], f"{OPTION} {name!r}: pretrained_cfg mean"),
                         _triple(config["std"], f"{OPTION} {name!r}: pretrained_cfg std"))
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.feature_layer = feature_layer
        self.block_index: int | None = None
        if feature_layer is not None:
            blocks = getattr(model, "blocks", None)
            if blocks is None or not hasattr(model, "forward_intermediates"):
                raise ValueError(f"model.vision_feature_layer {feature_layer}: the timm tower {name!r} has no transformer "
                                 "blocks to take it from (a ViT-like model is needed); leave it unset")
            depth = len(blocks)
            index = depth + feature_layer if feature_layer < 0 else feature_layer - 1  # hidden_states[0] = embeddings
            if not 0 <= index < depth:
                raise ValueError(f"model.vision_feature_layer {feature_layer} is outside the timm tower {name!r}'s "
                                 f"{depth} blocks (use -{depth}..-1 or 1..{depth})")
            self.block_index = index
        self.register_load_state_dict_pre_hook(_legacy_keys)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return timm_features(self.model, image, self.select, self.block_index)

    def token_shape(self, image_size: int | None = None) -> tuple[int, int]:
        try:
            return super().token_shape(image_size)
        except (AssertionError, RuntimeError) as err:  # timm asserts on an input size it was not built for
            raise ValueError(f"model.image_size {image_size or self.image_size} does not fit the timm tower {self.name!r} "
                             f"(built for {timm_image_size(self.model)} px: set vision_kwargs.img_size): "
                             f"{_first_line(err)}") from None


class TransformersTower(VisionTower):
    """A transformers vision model: ``hidden_states[feature_layer]`` (LLaVA's ``get_image_features``), its class and
    register tokens dropped by ``default``."""

    source = "transformers"

    def __init__(self, model: nn.Module, name: str, kind: HFTowerKind, image_size: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float],
                 feature_layer: int | None = None, select: SelectStrategy = "default") -> None:
        super().__init__(model, name, select, image_size, mean, std)
        config = model.config
        self.model_type = str(config.model_type)
        self.patch_size = int(config.patch_size)
        self.width = int(config.hidden_size)
        layers = int(config.num_hidden_layers)
        layer = kind.feature_layer if feature_layer is None else int(feature_layer)
        if not -(layers + 1) <= layer <= layers:
            raise ValueError(f"model.vision_feature_layer {layer} is outside the {layers} layers of {name!r} "
                             f"(hidden_states has {layers + 1} entries: -{layers + 1}..{layers})")
        self.feature_layer = layer
        self.num_prefix_tokens = kind.prefix_tokens(config)
        native = int(config.image_size)
        self.interpolate = kind.interpolate_kwarg and self.image_size != native

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.model(pixel_values=image, output_hidden_states=True, return_dict=True, **kwargs)
        hidden = out.hidden_states[self.feature_layer]
        if self.select == "default" and self.num_prefix_tokens:
            return hidden[:, self.num_prefix_tokens:]
        return hidden

    def token_shape(self, image_size: int | None = None) -> tuple[int, int]:
        side = int(image_size or self.image_size) // self.patch_size
        kept = 0 if self.select == "default" else self.num_prefix_tokens
        return side * side + kept, self.width


# --------------------------------------------------------------------------- the VLM's interface
def tower_tokens(vision: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Token features ``(B, N, D)`` of a :class:`VisionTower` or of a bare timm backbone (prefix tokens dropped)."""
    if isinstance(vision, VisionTower):
        return vision(image)
    return timm_features(vision, image)


def timm_features(model: nn.Module, image: torch.Tensor, select: SelectStrategy = "default",
                  block_index: int | None = None) -> torch.Tensor:
    """A timm model's token features: ``forward_features`` (or block ``block_index``'s pre-norm output), its
    ``num_prefix_tokens`` leading tokens (class / register tokens, only those it has) dropped unless
    ``select`` is ``full``; a CNN's ``(B, C, H, W)`` grid as ``H * W`` tokens, row by row."""
    if block_index is not None:
        patches, prefix = model.forward_intermediates(
            image, indices=[block_index], norm=False, output_fmt="NLC", intermediates_only=True,
            return_prefix_tokens=True, stop_early=True,
        )[0]
        if select == "full" and prefix is not None and prefix.shape[1]:
            return torch.cat([prefix, patches], dim=1)
        return patches
    features = model.forward_features(image)
    if isinstance(features, (tuple, list)):
        features = features[0]
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2)
    if features.ndim != 3:
        raise ValueError(f"the vision tower's forward_features gave shape {tuple(features.shape)}, not (B, N, D)")
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    return features[:, prefix:] if select == "default" and prefix else features


def timm_image_size(model: nn.Module) -> int:
    """The square input side a timm model was built for (``patch_embed.img_size``, else its ``pretrained_cfg``)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:]
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    if size[0] != size[1]:
        raise ValueError(f"the vision tower expects non-square {size} images; only square images are supported")
    return int(size[0])


def tower_image_size(vision: nn.Module) -> int:
    """The square input side of a :class:`VisionTower` or a bare timm backbone."""
    return vision.image_size if isinstance(vision, VisionTower) else timm_image_size(vision)


def backbone_of(vision: nn.Module) -> nn.Module:
    """The wrapped encoder of a :class:`VisionTower` (what this framework's own checkpoints hold), else ``vision``."""
    return vision.model if isinstance(vision, VisionTower) else vision


# -------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class TowerRef:
    """Where a tower comes from: ``kind`` ``timm`` (``name`` as ``timm.create_model`` takes it) or
    ``transformers`` (``name`` a directory or hub id, ``config`` its ``config.json``)."""

    kind: str
    name: str
    config: dict[str, Any] | None = None
    directory: bool = False
    bundled: bool = False  # a directory or a hub id: its weights come with it (a timm name: only if asked)


def _hub_file(repo_id: str, filename: str, required: bool = True) -> str | None:
    """``filename`` of hub repository ``repo_id`` (downloaded when online, from the HF cache otherwise)."""
    from transformers.utils import cached_file

    if required:
        check_cached(repo_id, OPTION, filename)
    try:
        return cached_file(repo_id, filename, local_files_only=is_offline(), _raise_exceptions_for_missing_entries=required,
                           _raise_exceptions_for_connection_errors=required)
    except (OSError, ValueError) as err:
        raise PretrainedError(f"{OPTION} {repo_id!r}: cannot read its {filename}: {_first_line(err)}") from None


def _supported() -> str:
    return ", ".join(sorted(HF_TOWERS))


def locate_tower(name: str, source: TowerSource = "auto") -> TowerRef:
    """Decide where ``model.vision`` comes from (see the module docstring); one-line errors name it."""
    if source not in ("auto", "timm", "transformers"):
        raise ValueError(f"model.vision_source must be auto, timm or transformers, got {source!r}")
    text = os.fspath(name).strip()
    if not text:
        raise ValueError(f"{OPTION} is empty: give a timm model name, a hub id (org/name) or a local directory")
    if text.startswith("hf-hub:") or text.startswith("local-dir:"):
        if source == "transformers":
            raise ValueError(f"{OPTION} {text!r} is a timm name, but model.vision_source is transformers")
        if text.startswith("hf-hub:"):
            check_cached(text[len("hf-hub:"):].split("@")[0], OPTION)
        else:
            check_local_dir(text[len("local-dir:"):], OPTION)
        local = text.startswith("local-dir:")
        return TowerRef("timm", text, directory=local, bundled=local)
    path = Path(text).expanduser()
    if path.is_dir():
        directory = check_local_dir(path, OPTION)
        config = read_json(directory / CONFIG_FILE, f"{OPTION} config")
        kind = source if source != "auto" else _kind_of(config, text)
        if kind == "timm":
            return TowerRef("timm", f"local-dir:{directory}", config, directory=True, bundled=True)
        _hf_kind(config, text)
        return TowerRef("transformers", os.fspath(directory), config, directory=True, bundled=True)
    if looks_like_hub_id(text):
        if source == "timm":
            check_cached(text, OPTION)
            return TowerRef("timm", f"hf-hub:{text}", bundled=True)
        config = read_json(_hub_file(text, CONFIG_FILE), f"{OPTION} config of")
        kind = source if source != "auto" else _kind_of(config, text)
        if kind == "timm":
            return TowerRef("timm", f"hf-hub:{text}", config, bundled=True)
        _hf_kind(config, text)
        return TowerRef("transformers", text, config, bundled=True)
    if source == "transformers" or os.sep in text or text.startswith((".", "~")):
        raise PretrainedError(f"{OPTION} {text!r}: no such directory and not a hub id (org/name)"
                              + ("" if source == "transformers" else " or timm model name"))
    return TowerRef("timm", text)


def _kind_of(config: dict[str, Any], name: str) -> str:
    if "model_type" in config:
        return "transformers"
    if "architecture" in config:
        return "timm"
    raise PretrainedError(f"{OPTION} {name!r}: its config.json has neither model_type (a transformers model) nor "
                          f"architecture (a timm model); supported: transformers {_supported()}, or a timm model")


def _hf_kind(config: dict[str, Any], name: str) -> HFTowerKind:
    model_type = config.get("model_type")
    if model_type not in HF_TOWERS:
        raise PretrainedError(f"{OPTION} {name!r}: model_type {model_type!r} is not a supported vision tower "
                              f"(supported: {_supported()}; or a timm model)")
    return HF_TOWERS[model_type]


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load report lists the text half of a full CLIP / SigLIP as unexpected: we check what matters."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _processor_size(processor: dict[str, Any]) -> int | None:
    """The square side a transformers image processor hands the model (its center crop, else its resize)."""
    candidates = []
    if processor.get("do_center_crop", "crop_size" in processor):
        candidates.append(processor.get("crop_size"))
    candidates.append(processor.get("size"))
    for value in candidates:
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            if "height" in value and "width" in value:
                if value["height"] != value["width"]:
                    raise PretrainedError(f"{OPTION}: the image processor gives non-square {value} images; only square "
                                          "images are supported")
                return int(value["height"])
            if "shortest_edge" in value:
                return int(value["shortest_edge"])
    return None


def hf_preprocessing(ref: TowerRef, kind: HFTowerKind, vision_config: Any) -> tuple[int, tuple, tuple]:
    """``(image_size, mean, std)`` of a transformers tower: its ``preprocessor_config.json`` when it has one,
    else the vision config's ``image_size`` and the processor class's default normalisation."""
    if ref.directory:
        found = Path(ref.name) / PREPROCESSOR_FILE
        path = os.fspath(found) if found.is_file() else None
    else:
        path = _hub_file(ref.name, PREPROCESSOR_FILE, required=False)
    processor = read_json(path, f"{OPTION} image processor") if path else {}
    where = f"{OPTION} {ref.name!r}: {PREPROCESSOR_FILE}"
    mean = _triple(processor["image_mean"], f"{where} image_mean") if "image_mean" in processor else kind.mean
    std = _triple(processor["image_std"], f"{where} image_std") if "image_std" in processor else kind.std
    size = _processor_size(processor) or int(vision_config.image_size)
    return size, mean, std


def _build_transformers(ref: TowerRef, kwargs: dict[str, Any], random_init: bool) -> tuple[nn.Module, HFTowerKind]:
    import transformers

    kind = _hf_kind(ref.config or {}, ref.name)
    cls = getattr(transformers, kind.cls)
    overrides = dict(kwargs)
    attn = overrides.pop("attn_implementation", None)
    attn_kw = {"attn_implementation": attn} if attn else {}
    if random_init:  # the config alone: no weight file is opened
        try:
            config = cls.config_class.from_pretrained(resolve(ref.name, OPTION), local_files_only=is_offline(),
                                                      **overrides)
        except (OSError, ValueError, TypeError) as err:
            raise PretrainedError(f"{OPTION} {ref.name!r}: cannot build its config: {_first_line(err)}") from None
        return cls._from_config(config, **attn_kw), kind
    source = resolve(ref.name, OPTION)
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(source, **{**from_pretrained_kwargs(), **attn_kw, **overrides},
                                              output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PretrainedError(f"{OPTION} {source!r} could not be loaded: {_first_line(err)}") from None
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    if mismatched:
        shown = "; ".join(f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched[:2])
        raise PretrainedError(f"{OPTION} {source!r}: {len(mismatched)} weight(s) do not fit its config.json (weights vs "
                              f"config: {shown}): are the weights of another model width or patch size?")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise PretrainedError(f"{OPTION} {source!r}: its weights lack {len(missing)} tensor(s) of {kind.cls} (e.g. "
                              f"{', '.join(missing[:3])}): are they the weights of another model?")
    return model.eval(), kind


def _size_mismatch(err: BaseException) -> str:
    """The first ``size mismatch`` line of a ``load_state_dict`` error (else its first line)."""
    found = re.search(r"size mismatch for [^\n]*", str(err))
    return found.group(0).strip() if found else _first_line(err)


def _build_timm(ref: TowerRef, kwargs: dict[str, Any], pretrained: bool, weights: str | None,
                random_init: bool) -> nn.Module:
    import timm

    from mm_lightning.models.vision import create_backbone

    options = {"num_classes": 0, **kwargs}
    load = False
    what = OPTION
    if ref.bundled:
        if weights is not None:
            raise ValueError(f"model.vision_weights {weights!r}: {OPTION} {ref.name.split(':', 1)[1]!r} is a model "
                             "directory or hub id, which brings its own weights; give one or the other")
        load = not random_init
    elif weights is not None and not random_init:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"model.vision_weights {weights!r}: no such file")
        if not weights.endswith(".safetensors"):
            raise PretrainedError(f"model.vision_weights {weights!r}: only safetensors files are read (a pickle is never "
                                  "unpickled here); save the state dict with safetensors.torch.save_file")
        options["pretrained_cfg_overlay"] = {"file": os.fspath(weights)}
        load, what = True, f"model.vision_weights {weights!r}"
    elif pretrained and not random_init:
        load, what = True, f"{OPTION} {ref.name!r} (vision_pretrained)"
    if not (ref.name.startswith(("hf-hub:", "local-dir:")) or timm.is_model(ref.name.split(".")[0])):
        return create_backbone(ref.name, **options)  # the unknown-name error naming the closest timm models
    try:
        return timm.create_model(ref.name, pretrained=load, **options)
    except RuntimeError as err:
        if "size mismatch" in str(err) or "Missing key" in str(err) or "Unexpected key" in str(err):
            raise PretrainedError(f"{what} does not fit the timm model {ref.name!r} built with vision_kwargs "
                                  f"{kwargs}: {_size_mismatch(err)}") from None
        raise PretrainedError(f"{what}: timm could not build it: {_first_line(err)}") from None
    except (OSError, ValueError, AssertionError) as err:
        raise PretrainedError(f"{what}: timm could not build it: {_first_line(err)}") from None
    except TypeError as err:
        raise TypeError(f"timm model {ref.name!r} rejected its arguments {sorted(kwargs)}: {_first_line(err)}") from None


def build_tower(
    name: str,
    kwargs: dict[str, Any] | None = None,
    source: TowerSource = "auto",
    pretrained: bool = False,
    weights: str | None = None,
    feature_layer: int | None = None,
    select: SelectStrategy = "default",
    image_size: int | None = None,
    random_init: bool = False,
) -> VisionTower:
    """The vision tower ``name`` (see the module docstring), wrapped as a :class:`VisionTower`.

    Args:
        name: a timm name (``vit_tiny_patch16_224``, ``hf-hub:timm/...``), a hub id or a local directory.
        kwargs: timm ``create_model`` arguments, or transformers config overrides (and ``attn_implementation``).
        source: ``auto``, ``timm`` or ``transformers``: how to read ``name``.
        pretrained: timm's ``pretrained=True`` for a timm name (directories and hub ids always bring their weights).
        weights: a local safetensors file of a timm model's weights.
        feature_layer: LLaVA's ``vision_feature_layer`` (default per model type; timm: ``forward_features``).
        select: ``default`` drops class / register tokens, ``full`` keeps them.
        image_size: input side (default: the tower's own).
        random_init: build from the config alone, reading no weights.
    """
    ref = locate_tower(name, source)
    kwargs = dict(kwargs or {})
    if ref.kind == "timm":
        model = _build_timm(ref, kwargs, pretrained, weights, random_init)
        return TimmTower(model, name, feature_layer, select, image_size)
    if weights is not None:
        raise ValueError(f"model.vision_weights {weights!r} is for timm towers; the transformers tower {name!r} loads "
                         "the weights of its directory or hub id")
    model, kind = _build_transformers(ref, kwargs, random_init)
    size, mean, std = hf_preprocessing(ref, kind, model.config)
    return TransformersTower(model, name, kind, image_size or size, mean, std, feature_layer, select)

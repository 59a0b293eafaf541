"""Rebuild a task's network from a run's checkpoint, without Lightning.

Every task writes its network's *spec* into the checkpoints it saves (``checkpoint["model_spec"]``:
the model class's registered name and its constructor arguments as plain values), next to the
``state_dict`` whose ``model.`` keys are the network's weights. :func:`load_model` reads both with the
weights-only loader (:mod:`mm_lightning.checkpoint`) and returns the plain ``nn.Module``::

    from mm_lightning.models import load_model
    clip = load_model("runs/clip_shapes/.../checkpoints/best.ckpt")   # a mm_lightning.models.CLIP, eval mode
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from mm_lightning.checkpoint import load_checkpoint

SPEC_KEY = "model_spec"


def _builders() -> dict[str, Callable[..., nn.Module]]:
    from mm_lightning.models.clip import CLIP
    from mm_lightning.models.metric import MetricEmbedder
    from mm_lightning.models.ssl import SSLEncoder
    from mm_lightning.models.vision import create_backbone

    return {"CLIP": CLIP, "SSLEncoder": SSLEncoder, "MetricEmbedder": MetricEmbedder, "timm": create_backbone}


def model_spec(model: nn.Module, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"class": name, "config": arguments}`` of one of our models (its ``config``), or of a timm model built by
    :func:`~mm_lightning.models.vision.create_backbone` (``class`` ``"timm"``, ``config`` given)."""
    if config is not None:
        return {"class": "timm", "config": dict(config)}
    for name, builder in _builders().items():  # isinstance: FSDP2 and compile swap in subclasses
        if isinstance(builder, type) and isinstance(model, builder) and isinstance(getattr(model, "config", None), dict):
            return {"class": name, "config": dict(model.config)}
    raise TypeError(f"{type(model).__name__} has no model spec: give its create_backbone arguments as config")


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A freshly initialised model from a spec (see :func:`model_spec`)."""
    builders = _builders()
    name = spec.get("class") if isinstance(spec, dict) else None
    if name not in builders:
        raise ValueError(f"unknown model class {name!r} in the model spec; known: {', '.join(builders)}")
    return builders[name](**dict(spec.get("config") or {}))


def load_model(path: str | os.PathLike, prefix: str = "model.", strict: bool = True) -> nn.Module:
    """The network of a run's checkpoint, built from its spec with the weights under ``prefix``, in eval mode.

    ``prefix`` picks other weights the checkpoint holds (a classifier's EMA copy: ``ema.module.``).
    Raises naming the file when the checkpoint has no spec (not written by a task of this framework)
    or its weights do not fit.
    """
    path = os.fspath(path)
    ckpt = load_checkpoint(path, "checkpoint")
    spec = ckpt.get(SPEC_KEY) if isinstance(ckpt, dict) else None
    if spec is None:
        raise ValueError(f"checkpoint {path!r} holds no {SPEC_KEY!r}: it was not saved by a task of this framework "
                         "(or by an older version); build the task from its config and load the checkpoint into it")
    state = ckpt.get("state_dict", {})
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"checkpoint {path!r} holds no weights under {prefix!r}")
    model = build_model(spec)
    try:
        model.load_state_dict(weights, strict=strict)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path!r}: the weights under {prefix!r} do not fit its model spec: {err}") from None
    return model.eval()

"""Activation checkpointing through the models' own switches, and per-block ``torch.compile``.

timm models have ``set_grad_checkpointing`` (their blocks then run under ``torch.utils.checkpoint``),
Hugging Face models ``activation_checkpointing_enable`` (formerly ``gradient_checkpointing_enable``), and our text tower
(:class:`~mm_lightning.models.text.TextTransformer`) the same switch as timm's. Switching them on keeps
every module, parameter name and state-dict key as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn as nn


def apply_activation_checkpointing(module: nn.Module) -> list[nn.Module]:
    """Recompute activations in the backward pass instead of storing them, in every part of ``module`` that can.

    Each Hugging Face model (``activation_checkpointing_enable``, non-reentrant) and each module with a
    timm-style ``set_grad_checkpointing`` (timm backbones, our text tower) gets its switch turned on;
    their children are left to them. Activations inside a checkpointed block are not kept but
    recomputed, ~30% more compute for activation memory that no longer grows with depth. Returns the
    modules switched (empty: nothing in ``module`` supports it).
    """
    switched: list[nn.Module] = []
    done: set[int] = set()
    for sub in module.modules():
        if id(sub) in done:
            continue
        if callable(getattr(sub, "activation_checkpointing_enable", None)) and getattr(
            sub, "supports_gradient_checkpointing", False
        ):  # transformers >= 5.2x (gradient_checkpointing_enable is its deprecated alias)
            sub.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif callable(getattr(sub, "gradient_checkpointing_enable", None)) and getattr(
            sub, "supports_gradient_checkpointing", False
        ):  # older transformers
            sub.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif callable(getattr(sub, "set_grad_checkpointing", None)):
            sub.set_grad_checkpointing(True)
        else:
            continue
        switched.append(sub)
        done.update(id(m) for m in sub.modules())
    return switched


def compile_modules(modules: Iterable[nn.Module], **kwargs: Any) -> None:
    """``torch.compile`` each module in place (``nn.Module.compile``: names and state dict unchanged).

    Compiling block by block (as torchtitan does) reuses one compiled graph for all blocks of a
    shape, keeps FSDP's per-block hooks outside the graphs, and compiles faster than the whole model.
    """
    for module in modules:
        module.compile(**kwargs)

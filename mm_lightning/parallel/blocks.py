"""Finding a model's transformer blocks: the units that FSDP shards and tensor parallelism splits."""

from __future__ import annotations

import torch.nn as nn

_BLOCK_TYPES: list[type[nn.Module]] = []


def register_block_type(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare ``cls`` a transformer block (usable as a class decorator)."""
    if cls not in _BLOCK_TYPES:
        _BLOCK_TYPES.append(cls)
    return cls


def _default_block_types() -> tuple[type[nn.Module], ...]:
    import timm.models.vision_transformer as vt

    names = ("Block", "ResPostBlock", "ParallelScalingBlock", "ParallelThingsBlock")
    torch_layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)  # e.g. our CLIP text tower
    return tuple(getattr(vt, n) for n in names if hasattr(vt, n)) + torch_layers + tuple(_BLOCK_TYPES)


def _outermost(modules: list[nn.Module]) -> list[nn.Module]:
    """Drop modules nested inside another module of the list (keeps the order)."""
    inner: set[int] = set()
    for m in modules:
        for sub in m.modules():
            if sub is not m:
                inner.add(id(sub))
    return [m for m in modules if id(m) not in inner]


def find_transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``module``, in forward order: the units for FSDP, TP and checkpointing.

    Looked up in this order:

    1. Hugging Face models: the classes named in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``).
    2. timm's ViT blocks, ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (the CLIP
       text tower) and classes added with :func:`register_block_type`.
    3. Generically: the module class that occurs most often (by parameter count) as an element of an
       ``nn.ModuleList`` / ``nn.Sequential`` (a ResNet's ``BasicBlock``, a text encoder's layers).

    Returns an empty list when nothing repeats.
    """
    no_split: set[str] = set()
    for sub in module.modules():
        names = getattr(sub, "_no_split_modules", None)
        if names:
            no_split.update(names)
    if no_split:
        found = [m for m in module.modules() if type(m).__name__ in no_split]
        if found:
            return _outermost(found)
    known = _default_block_types()
    found = [m for m in module.modules() if isinstance(m, known)]
    if found:
        return _outermost(found)
    weight: dict[type, int] = {}
    members: dict[type, list[nn.Module]] = {}
    for container in module.modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        for child in container:
            n = sum(p.numel() for p in child.parameters())
            if n == 0 or isinstance(child, (nn.ModuleList, nn.Sequential)):
                continue
            cls = type(child)
            members.setdefault(cls, []).append(child)
            weight[cls] = weight.get(cls, 0) + n
    repeated = [c for c in members if len(members[c]) >= 2]
    if not repeated:
        return []
    best = max(repeated, key=lambda c: weight[c])
    return _outermost(members[best])

"""Load checkpoints safely: ``torch.load(weights_only=True)`` only, never an arbitrary pickle.

A checkpoint is a pickle, and unpickling can run any code its author chose. Every checkpoint
this project reads (resume, ``image_init``/``vision_init``, quantization, model loaders) goes
through :func:`load_checkpoint`, which lets the unpickler build tensors and plain containers only
and refuses the rest with an error that names the file. No Lightning import: the model loaders of
``mm_lightning.models`` use it too.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds objects that a weights-only load does not build (it may run code)."""


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``what`` names the option that gave ``path``.

    Raises ``FileNotFoundError`` for a missing file and :class:`UnsafeCheckpointError` for a pickle
    that asks for anything beyond tensors and plain containers.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(
            f"{what} {path!r} was refused: it holds objects that a weights-only load does not build, and "
            f"unpickling them could run code ({first}); load only checkpoints written by this framework"
        ) from None


def state_dict_of(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``state_dict`` (name -> tensor) of a Lightning checkpoint, or of a bare saved state dict."""
    ckpt = load_checkpoint(path, what)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {os.fspath(path)!r} holds no state_dict of tensors")
    return state

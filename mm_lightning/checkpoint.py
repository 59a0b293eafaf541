"""Load checkpoints safely: ``torch.load(weights_only=True)`` only, never an arbitrary pickle.

A checkpoint is a pickle, and unpickling can run any code its author chose. Every checkpoint
this project reads (resume, ``image_init``/``vision_init``, quantization, model loaders) goes
through :func:`load_checkpoint`, which lets the unpickler build tensors and plain containers only
and refuses the rest with an error that names the file. No Lightning import: the model loaders of
``mm_lightning.models`` use it too.

The checkpoints this project writes (Lightning's ``state_dict``, loops, callbacks, optimizer and
scheduler states, hyper-parameters of plain values, the precision plugins' scaler state) hold
nothing beyond what ``weights_only=True`` builds by default, so :data:`SAFE_GLOBALS` is empty:
a type is added there only when a checkpoint of ours needs it, and only a plain data type.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch

#: Extra types the weights-only unpickler may build (``torch.serialization.add_safe_globals``).
#: Empty: every checkpoint this project writes loads without any (``tests/test_reliability.py`` checks).
SAFE_GLOBALS: list[Any] = []


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds objects that a weights-only load does not build (it may run code)."""


class UnreadableCheckpointError(ValueError):
    """A file that is not a readable checkpoint (truncated, corrupt, or not a checkpoint at all)."""


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")


def _first_line(err: BaseException) -> str:
    """The informative line of torch's message (e.g. the blocked global), without its boilerplate."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_BOILERPLATE)]
    return (useful or lines or [type(err).__name__])[0]


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``what`` names the option that gave ``path``.

    ``mmap=True`` maps the tensors instead of reading them (cheap when only metadata is needed).
    Raises ``FileNotFoundError`` for a missing file, :class:`UnsafeCheckpointError` for a pickle
    that asks for anything beyond tensors and plain containers, and
    :class:`UnreadableCheckpointError` for a file that is no checkpoint; each names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # garbage bytes ("Unsupported operand"), not a blocked class
            raise UnreadableCheckpointError(f"{what} {path!r} is not a readable checkpoint ({_first_line(err)})") from None
        raise UnsafeCheckpointError(
            f"{what} {path!r} was refused: it holds objects that a weights-only load does not build, and "
            f"unpickling them could run code ({_first_line(err)}); load only checkpoints written by this framework"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # truncated zip, empty file, not a zip ...
        raise UnreadableCheckpointError(f"{what} {path!r} is not a readable checkpoint ({_first_line(err)})") from None


def state_dict_of(path: str | os.PathLike, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``state_dict`` (name -> tensor) of a Lightning checkpoint, or of a bare saved state dict."""
    ckpt = load_checkpoint(path, what)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {os.fspath(path)!r} holds no state_dict of tensors")
    return state

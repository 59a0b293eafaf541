"""Lightning's checkpoint input/output for local files: a save that fails raises, a load is weights-only.

Lightning's ``TorchCheckpointIO`` saves through ``fsspec`` transactions that write a temporary file
in ``$TMPDIR`` and move it into place; when the move fails with a ``PermissionError`` (an
unwritable checkpoint directory) the error is swallowed: the run goes on, exits 0, and leaves the
temporary file behind (``lightning.fabric.utilities.cloud_io._atomic_save``). Here a local save
writes a temporary file beside its target, ``fsync``s it and renames it over the target (atomic on
POSIX); on any failure the temporary file is removed, the previous checkpoint is untouched, and
:class:`CheckpointSaveError` names the path. Remote paths (``s3://``, ...) keep Lightning's code.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mm_lightning.checkpoint import UnsafeCheckpointError, load_checkpoint


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the run stops and the previous checkpoint stays as it was."""


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` into ``path`` through a temporary file in the same directory, renamed into place."""
    path = os.fspath(path).removeprefix("file://")
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        buffer = io.BytesIO()  # serialise first: a failing write then reports its own OSError (ENOSPC, EACCES, ...)
        torch.save(obj, buffer)
        candidate = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        with open(candidate, "xb") as f:  # the usual permissions (umask), unlike mkstemp's 0600
            tmp = candidate
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except Exception as err:
        reason = f"{err.strerror} (errno {err.errno})" if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
        raise CheckpointSaveError(f"could not save checkpoint {path}: {reason}; the previous checkpoint is kept") from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves fail loudly and atomically and whose loads are weights-only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(os.fspath(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        if weights_only is False:
            raise UnsafeCheckpointError(f"checkpoint {os.fspath(path)!r}: a load that is not weights-only is refused (it can run code)")
        if not _is_local(os.fspath(path)):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint(os.fspath(path).removeprefix("file://"), "--ckpt_path")

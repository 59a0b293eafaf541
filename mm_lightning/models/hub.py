"""Pretrained parts named as users know them: a Hugging Face hub id or a local directory.

One rule for every part that comes from the hub (vision towers, language models, tokenizers):

- a local directory is read as it is (``config.json`` required, weights only from safetensors);
- a hub id (``org/name``) is handed to ``from_pretrained``, which downloads it when online and reads
  the HF cache (``HF_HOME``, ``HF_HUB_CACHE``) otherwise. ``local_files_only`` is set only when the
  user is offline (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), so nothing here decides to download;
- remote code never runs (``trust_remote_code=False``) and pickled weights are never unpickled
  (``use_safetensors=True``: a directory holding only ``pytorch_model.bin`` is refused naming the file).

Every failure is one line (:class:`PretrainedError`) naming the option, the id or path, and what to do.
No Lightning imports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "pytorch_model.pt")
_TRUE = {"1", "true", "yes", "on"}


class PretrainedError(ValueError):
    """A pretrained part that cannot be loaded as named (not cached, no config, pickled weights, ...)."""


def is_offline() -> bool:
    """Whether the user asked for no network (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set true)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` (one slash, no leading ``.`` or ``/``, not an existing path): how the hub names a repository."""
    if os.path.exists(name) or name.startswith((".", "/", "~")) or "\\" in name:
        return False
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def check_local_dir(path: str | os.PathLike, option: str, config_file: str = CONFIG_FILE) -> Path:
    """A local model directory that holds ``config_file`` and no weights that only a pickle can read.

    Raises :class:`PretrainedError` naming ``option`` and the path otherwise.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise PretrainedError(f"{option} {os.fspath(path)!r}: no such directory and not a hub id (org/name)")
    if not (directory / config_file).is_file():
        raise PretrainedError(f"{option} {os.fspath(path)!r}: the directory holds no {config_file} (is it a model "
                              "saved with save_pretrained?)")
    safetensors = list(directory.glob("*.safetensors")) + list(directory.glob("*.safetensors.index.json"))
    pickled = [name for name in PICKLED_WEIGHTS if (directory / name).exists()]
    if pickled and not safetensors:
        raise PretrainedError(f"{option} {os.fspath(path)!r}: its weights are only in {pickled[0]} (a pickle, which "
                              "is never unpickled here): convert them to safetensors (save_pretrained(..., "
                              "safe_serialization=True)) and try again")
    return directory


def check_cached(repo_id: str, option: str, filename: str = CONFIG_FILE) -> None:
    """Offline, a hub id must be in the HF cache: raise :class:`PretrainedError` naming it and the fix otherwise."""
    if not is_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    if not isinstance(found, str):
        raise PretrainedError(f"{option} {repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                              f"download it first (hf download {repo_id}) or unset HF_HUB_OFFLINE")


def resolve(name: str | os.PathLike, option: str, config_file: str = CONFIG_FILE) -> str:
    """``name`` checked: a local directory (see :func:`check_local_dir`) or a hub id (cached when offline)."""
    text = os.fspath(name)
    if looks_like_hub_id(text):
        check_cached(text, option, config_file)
        return text
    return os.fspath(check_local_dir(text, option, config_file))


def from_pretrained_kwargs() -> dict[str, Any]:
    """The keyword arguments every ``from_pretrained`` call of this framework passes (see the module docstring)."""
    return {"local_files_only": is_offline(), "trust_remote_code": False, "use_safetensors": True}


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON object from ``path`` (a config.json, a preprocessor_config.json); one-line :class:`PretrainedError`
    naming ``what`` and the path when it cannot be read or is not an object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PretrainedError(f"{what} {os.fspath(path)!r} cannot be read: {first}") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{what} {os.fspath(path)!r} is not a JSON object")
    return data


def load_pretrained(loader: Any, name: str | os.PathLike, option: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name, ...)`` after :func:`resolve`, its errors turned into one line naming ``option``."""
    source = resolve(name, option)
    try:
        return loader.from_pretrained(source, **{**from_pretrained_kwargs(), **kwargs})
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PretrainedError(f"{option} {source!r} could not be loaded: {first}") from err

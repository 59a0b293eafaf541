"""The built-in data sets (shapes, digits) the runner writes on first use: ``experiments.run`` calls
:func:`pending_builtin` and :func:`ensure_builtin` for every shard spec it is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import braceexpand

from data.prepare_digits import prepare_digits
from data.prepare_shapes import prepare_shapes
from mm_lightning.data import synthetic
from mm_lightning.data.chat_tokenizer import CHATML_TOKENIZER_DIR, train_chat_tokenizer_from_shards
from mm_lightning.data.shards import MANIFEST_FILE
from mm_lightning.data.tokenizer import TOKENIZER_FILE, train_tokenizer_from_shards


BUILTIN_DATASETS: dict[str, Callable[..., dict[str, Any]]] = {
    "data/shards/shapes": prepare_shapes,
    "data/shards/digits": prepare_digits,
}


def is_prepared(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a complete data set: a manifest whose every split's shards exist."""
    manifest_path = Path(directory) / MANIFEST_FILE
    if not manifest_path.is_file():
        return False
    try:
        splits = json.loads(manifest_path.read_text()).get("splits") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return bool(splits) and all(
        (Path(directory) / shard).is_file()
        for entry in splits.values() for shard in braceexpand.braceexpand(entry["pattern"]))


def builtin_locations(spec: str | Sequence[str]) -> list[str]:
    """The built-in data set directories (keys of :data:`BUILTIN_DATASETS`) that ``spec`` points into."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    roots = {key: os.path.realpath(key) for key in BUILTIN_DATASETS}
    found: list[str] = []
    for part in parts:
        for piece in str(part).split("::"):
            piece = os.path.expanduser(piece.strip())
            for name in (braceexpand.braceexpand(piece) if piece else []):
                path = os.path.realpath(name)
                for key, root in roots.items():
                    if (path == root or path.startswith(root + os.sep)) and key not in found:
                        found.append(key)
    return found


@contextlib.contextmanager
def _lock(directory: str) -> Iterator[None]:
    """An exclusive file lock beside ``directory``, so concurrent processes (DDP ranks) generate once."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, f".{os.path.basename(directory)}.lock"), "w") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; run one process first
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _missing_tokenizers(directory: str | os.PathLike) -> list[str]:
    """The tokenizers a complete data set should have and lacks: ``tokenizer.json`` (training captions) and, next to
    a chat tokenizer (conversations), the ChatML one (written by versions after the shards were)."""
    manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text())
    if not (manifest.get("splits") or {}).get("train"):
        return []
    missing = []
    if not (Path(directory) / TOKENIZER_FILE).is_file() and "txt" in (manifest.get("members") or []):
        missing.append(TOKENIZER_FILE)
    if manifest.get("chat_tokenizer") and not (Path(directory) / CHATML_TOKENIZER_DIR).is_dir():
        missing.append(CHATML_TOKENIZER_DIR)
    return missing


def _tokenizer_missing(directory: str | os.PathLike) -> bool:
    return bool(_missing_tokenizers(directory))


def ensure_tokenizer(directory: str | os.PathLike) -> bool:
    """Train the tokenizers (:func:`_missing_tokenizers`) of a complete data set that lacks them."""
    missing = _missing_tokenizers(directory)
    if not missing:
        return False
    manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text())
    shards = [str(Path(directory) / name) for name in braceexpand.braceexpand(manifest["splits"]["train"]["pattern"])]
    if TOKENIZER_FILE in missing:
        train_tokenizer_from_shards(shards, Path(directory) / TOKENIZER_FILE)
    if CHATML_TOKENIZER_DIR in missing:
        train_chat_tokenizer_from_shards(shards, Path(directory) / CHATML_TOKENIZER_DIR, layout="chatml")
    return True


def _stale(directory: str) -> bool:
    """Whether built-in shapes shards were written by an older version of the shapes generator."""
    manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text())
    return manifest.get("generator") == "mm_lightning.data.synthetic" and manifest.get("generator_version") != synthetic.VERSION


def pending_builtin(spec: str | Sequence[str]) -> list[str]:
    """The built-in data set directories ``spec`` points into that still need writing (checked without a lock).

    A directory is done when complete, written by the current generator and, with captions, tokenized.
    """
    return [key for key in builtin_locations(spec)
            if not (is_prepared(key) and not _stale(key) and not _tokenizer_missing(key))]


def ensure_builtin(spec: str | Sequence[str]) -> bool:
    """Generate a built-in data set (with its defaults) if ``spec`` points into its empty default location.

    ``spec`` is a shard specification as :func:`mm_lightning.data.shards.list_shards` takes it.
    Returns True when something was generated; False (doing nothing) for other paths or when the
    data set is already complete. A directory with shards but no manifest (an interrupted run) is
    regenerated.
    """
    generated = False
    for key in pending_builtin(spec):  # complete ones are only read: no lock file (a read-only volume works)
        with _lock(key):
            if is_prepared(key) and not _stale(key):
                ensure_tokenizer(key)  # shards written before tokenizer.json existed
                continue
            name = key.rsplit("/", 1)[-1]
            print(f"mm-lightning: {key}/ has no complete data set yet; generating the built-in '{name}' "
                  f"data set with its defaults (python -m data.prepare {name})", file=sys.stderr, flush=True)
            BUILTIN_DATASETS[key](out_dir=key)
            generated = True
    return generated

"""Write WebDataset shards, list them, and read their sizes manifest.

Shards are plain tar files written with ``webdataset.ShardWriter``. Next to them
lives ``sizes.json`` (open_clip's convention: ``{"shard-000000.tar": n, ...}``)
so that readers know how many samples a shard list holds without reading it,
and optionally ``manifest.json`` with data-set level facts (class names, image
size, the splits written).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds

SIZES_FILE = "sizes.json"
MANIFEST_FILE = "manifest.json"

ShardSpec = str | Sequence[str]


class ShardSpecError(ValueError):
    """A shard specification names nothing usable (missing path, empty list, ...)."""


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    prefix: str,
    max_count: int = 1000,
    max_size: float = 1e9,
) -> dict[str, int]:
    """Write ``samples`` into ``out_dir/{prefix}-000000.tar, ...`` and update ``sizes.json``.

    Each sample is a dict with ``__key__`` and one entry per member (``"png": bytes``,
    ``"cls": 3``, ``"txt": "..."``, ``"json": {...}``), as ``webdataset.ShardWriter`` takes it.
    Returns ``{shard_name: sample_count}`` for the shards written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Remove stale shards of the same prefix first, so a smaller rewrite leaves no leftovers.
    for old in out.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        old.unlink()
    counts: dict[str, int] = {}
    current: list[str] = []

    def _opener(name: str):  # track which shard each sample lands in
        current.append(os.path.basename(name))
        return open(name, "wb")

    pattern = str(out / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, verbose=0, opener=_opener) as sink:
        for sample in samples:
            if "__key__" not in sample:
                raise ValueError(f"sample written to {prefix} has no '__key__': {sorted(sample)}")
            sink.write(sample)
            counts[current[-1]] = counts.get(current[-1], 0) + 1
    update_sizes(out, counts)
    return counts


def update_sizes(directory: str | os.PathLike, counts: dict[str, int]) -> None:
    """Merge ``counts`` into ``directory/sizes.json``, dropping entries whose shard file is gone."""
    path = Path(directory) / SIZES_FILE
    sizes = json.loads(path.read_text()) if path.exists() else {}
    sizes.update(counts)
    sizes = {k: v for k, v in sorted(sizes.items()) if (Path(directory) / k).exists()}
    _write_json_atomic(path, sizes)


def write_manifest(directory: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``directory/manifest.json`` (data-set facts: classes, splits, ...)."""
    path = Path(directory) / MANIFEST_FILE
    manifest = json.loads(path.read_text()) if path.exists() else {}
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    _write_json_atomic(path, manifest)
    return manifest


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def list_shards(spec: ShardSpec) -> list[str]:
    """Expand a shard specification into a sorted list of existing shard paths.

    ``spec`` may be a directory (every ``*.tar`` in it), a brace pattern
    (``shapes-train-{000000..000009}.tar``), a glob (``shapes-train-*.tar``), several of
    these joined by ``::``, or a list of any of them. Raises :class:`ShardSpecError`
    naming the part that matched nothing.
    """
    parts: list[str] = [spec] if isinstance(spec, str) else list(spec)
    if not parts:
        raise ShardSpecError("the shard list is empty: give a directory, a brace pattern or a list of .tar files")
    shards: list[str] = []
    for part in parts:
        for piece in str(part).split("::"):
            piece = os.path.expanduser(piece.strip())
            if not piece:
                continue
            shards.extend(_expand_one(piece))
    if not shards:
        raise ShardSpecError(f"no shards in {spec!r}")
    return shards


def _expand_one(piece: str) -> list[str]:
    if os.path.isdir(piece):
        found = sorted(str(p) for p in Path(piece).glob("*.tar"))
        if not found:
            raise ShardSpecError(f"directory {piece!r} holds no .tar shards")
        return found
    found: list[str] = []
    for name in braceexpand.braceexpand(piece):
        if any(c in name for c in "*?["):
            matched = sorted(glob.glob(name))
            if not matched:
                raise ShardSpecError(f"no shard matches {name!r} (from {piece!r})")
            found.extend(matched)
        elif os.path.isfile(name):
            found.append(name)
        else:
            raise ShardSpecError(f"shard {name!r} does not exist (from {piece!r})")
    return found


def read_sizes(shards: Iterable[str]) -> dict[str, int | None]:
    """Sample counts of ``shards`` from the ``sizes.json`` beside each (``None`` where unknown)."""
    cache: dict[str, dict[str, int]] = {}
    out: dict[str, int | None] = {}
    for shard in shards:
        directory = os.path.dirname(os.path.abspath(shard))
        if directory not in cache:
            path = os.path.join(directory, SIZES_FILE)
            cache[directory] = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
        out[shard] = cache[directory].get(os.path.basename(shard))
    return out


def count_samples(shards: Iterable[str]) -> int | None:
    """Total sample count of ``shards`` from their manifests, or ``None`` if any shard is unlisted."""
    sizes = read_sizes(shards)
    if any(v is None for v in sizes.values()):
        return None
    return sum(v for v in sizes.values() if v is not None)


def read_manifest(shards: Sequence[str]) -> dict[str, Any]:
    """The ``manifest.json`` next to the first shard (or its parent directory), ``{}`` if none."""
    if not shards:
        return {}
    directory = Path(os.path.abspath(shards[0])).parent
    for candidate in (directory / MANIFEST_FILE, directory.parent / MANIFEST_FILE):
        if candidate.exists():
            return json.loads(candidate.read_text())
    return {}

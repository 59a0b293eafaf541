"""Write WebDataset shards, list them, and read their sizes manifest.

Shards are plain tar files written with ``webdataset.ShardWriter``. Next to them
lives ``sizes.json`` (open_clip's convention: ``{"shard-000000.tar": n, ...}``)
so that readers know how many samples a shard list holds without reading it,
and optionally ``manifest.json`` with data-set level facts (class names, image
size, the splits written). Shards without ``sizes.json`` are counted from
img2dataset's per-shard ``<shard>_stats.json`` (its ``successes``), else by reading
their tar headers; a shard that is empty, truncated or not a tar is counted for
what it holds readable, and :func:`tar_samples` reports where it breaks.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from mm_lightning.data.tar_reader import TarReadError, tar_members

SIZES_FILE = "sizes.json"
MANIFEST_FILE = "manifest.json"
STATS_SUFFIX = "_stats.json"  # img2dataset writes <shard>_stats.json next to each <shard>.tar

ShardSpec = str | Sequence[str]


class ShardSpecError(ValueError):
    """A shard specification names nothing usable (missing path, empty list, ...)."""


class ShardReadError(ValueError):
    """A shard breaks off: it is empty, truncated (inside a member or a header), or not a tar."""


#: what reading a broken tar raises (tarfile's errors, I/O errors, a corrupt gzip stream)
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


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
    """Sample counts of ``shards`` from the ``sizes.json`` beside each, else from img2dataset's
    ``<shard>_stats.json`` (``successes``: the samples it wrote); ``None`` where neither knows."""
    cache: dict[str, dict[str, int]] = {}
    out: dict[str, int | None] = {}
    for shard in shards:
        directory = os.path.dirname(os.path.abspath(shard))
        if directory not in cache:
            path = os.path.join(directory, SIZES_FILE)
            cache[directory] = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
        out[shard] = cache[directory].get(os.path.basename(shard))
        if out[shard] is None:
            out[shard] = _img2dataset_count(shard)
    return out


def _img2dataset_count(shard: str) -> int | None:
    stem = shard[: -len(".tar")] if shard.endswith(".tar") else os.path.splitext(shard)[0]
    try:
        stats = json.loads(Path(stem + STATS_SUFFIX).read_text())
        return int(stats["successes"])
    except (OSError, ValueError, KeyError, TypeError):  # no stats file, or not img2dataset's
        return None


def _sample_key(name: str) -> tuple[str | None, str]:
    """WebDataset's key and extension of a member name; key ``None`` for a member that is no sample's."""
    key, ext = base_plus_ext(name)
    if key is None or (key.startswith("__") and key.endswith("__")):
        return None, ""
    return key, ext.lower()


def tar_samples(shard: str, on_error: Callable[[str, str | None, Exception], None]) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard in order: ``{"__key__", "__url__", <ext>: bytes, ...}``, members grouped
    by key as WebDataset does (the key is the member name up to the first dot of its base name).

    Members come from :func:`mm_lightning.data.tar_reader.tar_members` (headers parsed directly, several
    times faster than ``tarfile``). Where the shard breaks off, ``on_error(shard, key, error)`` is told once
    with a :class:`ShardReadError` and reading stops: ``key`` is the sample cut inside one of its members
    (that sample is dropped; the complete ones before it were yielded), or ``None`` when the shard is not a
    tar or a header is cut (the message then says after which sample).
    """
    current: dict[str, Any] | None = None
    try:
        with open(shard, "rb") as f:
            for m in tar_members(f):
                key, ext = _sample_key(m["fname"])
                if key is None:
                    continue
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": shard}
                if ext in current:
                    current["__duplicate__"] = m["fname"]
                current[ext] = m["data"]
    except (TarReadError, *TAR_ERRORS) as err:
        reason = f"{type(err).__name__}: {err}"
        member = getattr(err, "member", None)
        if member is not None:
            key, _ = _sample_key(member)
            if current is not None and current["__key__"] != key:
                yield current  # complete: the cut member starts the next sample
                current = None
            on_error(shard, key, ShardReadError(f"the shard breaks off inside member {member} ({reason})"))
        elif current is not None:
            yield current  # its members were read whole; what follows is unreadable
            on_error(shard, None, ShardReadError(f"unreadable after sample {current['__key__']!r} ({reason})"))
        else:
            on_error(shard, None, ShardReadError(f"not a readable tar ({reason})"))
        return
    if current is not None:
        yield current


def count_tar_samples(shard: str) -> int:
    """The samples :func:`tar_samples` yields from ``shard``, counted from its tar headers (no data read).

    An empty, truncated or non-tar shard counts the complete samples before the break (0 for none);
    compressed shards are read through.
    """
    keys: list[str] = []
    try:
        with open(shard, "rb") as f:
            for m in tar_members(f, read_data=False):
                key, _ = _sample_key(m["fname"])
                if key is not None and (not keys or keys[-1] != key):
                    keys.append(key)
    except TarReadError as err:
        key = _sample_key(err.member)[0] if err.member is not None else None
        if key is not None and keys and keys[-1] == key:  # cut inside this member: its sample is lost
            keys.pop()
    except TAR_ERRORS:
        pass
    return len(keys)


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

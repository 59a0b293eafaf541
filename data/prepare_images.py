"""``python -m data.prepare images --src DIR``: an ImageFolder-style directory (one sub-folder per class).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.common import (IMAGE_EXTENSIONS, SPLITS, begin_dataset, check_minimum, finish_dataset, image_member,
                         stratified_split, write_split)


def find_images(src: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted as torchvision's ImageFolder sorts them) and ``(path, label)`` pairs.

    Raises ``FileNotFoundError`` naming the directory that is missing, has no class folders,
    or the class folder that holds no image.
    """
    root = os.path.expanduser(os.fspath(src))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--src {root!r} is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"--src {root!r} has no class folders (expected one sub-folder per class)")
    items: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        found = [os.path.join(d, f) for d, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True))
                 for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise FileNotFoundError(f"class folder {os.path.join(root, name)!r} holds no images "
                                    f"(extensions: {' '.join(IMAGE_EXTENSIONS)})")
        items += [(path, label) for path in found]
    return classes, items

def prepare_images(src: str | os.PathLike, out_dir: str | os.PathLike, val_fraction: float = 0.1,
                   test_fraction: float = 0.1, seed: int = 0, image_size: int | None = None,
                   samples_per_shard: int | None = None, name: str | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Turn an ImageFolder-style directory into stratified classification shards; returns the manifest.

    Without ``image_size`` the original JPEG/PNG/WebP bytes are stored under their own extension
    (``.jpeg`` as ``.jpg``; other formats as PNG); with it, images are resized (shorter side) and
    centre-cropped. Shard names start with ``name`` (default: the source folder's name).
    Every image is decoded once here, so an unreadable file is an error naming it.
    """
    if image_size is not None:
        check_minimum(image_size, "--image-size", 8)
    if samples_per_shard is not None:
        check_minimum(samples_per_shard, "--samples-per-shard", 1)
    classes, items = find_images(src)
    root = os.path.expanduser(os.fspath(src))
    if os.path.realpath(out_dir) == os.path.realpath(root) or os.path.realpath(out_dir).startswith(
            os.path.realpath(root) + os.sep):
        raise ValueError(f"--out {os.fspath(out_dir)!r} lies inside --src {root!r}: it would become a class folder")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name or Path(os.path.abspath(root)).name).strip("_.") or "images"
    parts = stratified_split([label for _, label in items], val_fraction, test_fraction, seed)

    def samples(indices: list[int]) -> Iterator[dict[str, Any]]:
        for i in indices:
            path, label = items[i]
            ext, data = image_member(path, image_size)
            yield {"__key__": f"{i:08d}", ext: data, "cls": label,
                   "json": {"path": os.path.relpath(path, root), "class": classes[label]}}

    out = begin_dataset(out_dir)
    splits = {split: write_split(out, name, split, samples(parts[split]), len(parts[split]),
                                  samples_per_shard, progress) for split in SPLITS}
    return finish_dataset(out, splits, name=name, classes=classes, image_size=image_size, seed=seed,
                   members=["<image extension>", "cls", "json"], source=os.path.abspath(root),
                   val_fraction=val_fraction, test_fraction=test_fraction)

"""The helpers every ``data/prepare_<source>.py`` writer shares: checked flags, splits, one split's shards,
the manifest written last, image members, and the command-line options all shard writers take.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from mm_lightning.data.shards import MANIFEST_FILE, update_sizes, write_manifest, write_shards

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
KEEP_BYTES = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}  # stored as-is, under this extension


def default_samples_per_shard(num_samples: int) -> int:
    """min(1000, ceil(n / 4)): at most 1000 samples a shard and at least 4 shards (fewer only if n < 4),
    so 2 workers x 2 ranks can always split a split; lowered for tiny n where ceil would give 3."""
    per_shard = max(1, min(1000, math.ceil(num_samples / 4)))
    while per_shard > 1 and math.ceil(num_samples / per_shard) < min(4, num_samples):
        per_shard -= 1
    return per_shard


def check_minimum(value: int, flag: str, minimum: int) -> None:
    """Raise ``ValueError`` naming ``flag`` when ``value`` is below ``minimum``."""
    if value < minimum:
        raise ValueError(f"{flag} must be at least {minimum}, got {value}")


def source_paths(src: str | os.PathLike, images: str | os.PathLike, val_fraction: float, test_fraction: float,
                  image_size: int | None, samples_per_shard: int | None) -> tuple[str, str]:
    """The checked flags of a ``--src FILE --images DIR`` subcommand; returns ``(src path, image folder)``."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must be in [0, 1) "
                         "and sum to less than 1")
    if image_size is not None:
        check_minimum(image_size, "--image-size", 8)
    if samples_per_shard is not None:
        check_minimum(samples_per_shard, "--samples-per-shard", 1)
    src_path = os.path.expanduser(os.fspath(src))
    image_root = os.path.expanduser(os.fspath(images))
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"--images {image_root!r} is not a directory")
    return src_path, image_root


def random_split(count: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Indices ``0..count-1`` shuffled by ``seed`` into test, val and train parts of the given fractions."""
    order = np.random.default_rng(seed).permutation(count).tolist()
    n_test, n_val = round(count * test_fraction), round(count * val_fraction)
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


def shard_name(name: str | None, src_path: str, default: str) -> str:
    """A shard-name prefix from ``name`` (or the source file's stem) with only safe characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or Path(src_path).stem).strip("_.") or default


def write_split(out: Path, name: str, split: str, samples: Iterable[dict[str, Any]], num_samples: int,
                 samples_per_shard: int | None, progress: bool) -> dict[str, Any] | None:
    """Write one split's shards; returns its manifest entry (``None`` for an empty split)."""
    prefix = f"{name}-{split}"
    if num_samples == 0:  # drop the shards of an earlier run so the directory matches the manifest
        for old in out.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            old.unlink()
        update_sizes(out, {})
        return None
    per_shard = samples_per_shard or default_samples_per_shard(num_samples)
    bar = tqdm(samples, total=num_samples, desc=f"{name} {split}", unit="img", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    counts = write_shards(bar, out, prefix, max_count=per_shard)
    bar.close()
    last = len(counts) - 1
    pattern = f"{prefix}-{{000000..{last:06d}}}.tar" if last > 0 else f"{prefix}-000000.tar"
    return {"num_samples": sum(counts.values()), "num_shards": len(counts), "pattern": pattern}


def finish_dataset(out: Path, splits: dict[str, dict[str, Any] | None], **fields: Any) -> dict[str, Any]:
    """Write ``manifest.json`` (last: its presence means the data set is complete), leaving out empty splits."""
    return write_manifest(out, **fields, splits={k: v for k, v in splits.items() if v is not None})


def begin_dataset(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` and drop an old manifest (a fresh one is written only once all shards are)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a fresh manifest, written only once all shards are
    return out

def stratified_split(labels: Sequence[int], val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, list[int]]:
    """Indices per split, keeping the class proportions (scikit-learn's ``train_test_split(stratify=)``, twice).

    The test split gets round(N * test_fraction) items, val round(N * val_fraction), each drawn by
    class from what is left. A class with a single item stays in train; a split smaller than the
    number of classes (which cannot hold one of each) is drawn without stratification. Each split's
    indices come out shuffled.
    """
    from sklearn.model_selection import train_test_split

    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must be in [0, 1) "
                         "and sum to less than 1")
    labels_arr = np.asarray(labels)
    n = len(labels_arr)
    classes, counts = np.unique(labels_arr, return_counts=True)
    single = np.isin(labels_arr, classes[counts < 2])
    train, rest = list(np.flatnonzero(single)), np.flatnonzero(~single)
    out: dict[str, list[int]] = {}
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        count = min(int(round(n * fraction)), max(0, len(rest) - 1))
        if count == 0:
            out[split] = []
            continue
        strata = labels_arr[rest]
        stratify = strata if count >= len(np.unique(strata)) and np.unique(strata, return_counts=True)[1].min() >= 2 \
            else None
        rest, taken = train_test_split(rest, test_size=count, stratify=stratify, random_state=seed)
        out[split] = [int(i) for i in taken]
    out["train"] = [int(i) for i in np.random.default_rng(seed).permutation(np.concatenate([train, rest]).astype(int))]
    return {split: out[split] for split in SPLITS}


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

def image_member(path: str, image_size: int | None) -> tuple[str, bytes]:
    """``(extension, bytes)`` for a sample: the original bytes, or a resized, centre-cropped re-encode.

    Only JPEG, PNG and WebP bytes are kept as they are (the formats the sample pipelines read);
    other formats are re-encoded as PNG.
    """
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode fully: a truncated or corrupt file fails here, not mid-training
            ext = os.path.splitext(path)[1].lower().lstrip(".")
            if image_size is None and ext in KEEP_BYTES:
                return KEEP_BYTES[ext], data
            image = image.convert("RGB")
            if image_size is None:  # bmp, ppm, tiff, ...: re-encoded losslessly as PNG for the readers
                return "png", png_bytes(image)
            scale = image_size / min(image.size)
            w, h = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
            image = image.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - image_size) // 2, (h - image_size) // 2
            image = image.crop((left, top, left + image_size, top + image_size))
            buffer = io.BytesIO()
            is_jpeg = path.lower().endswith((".jpg", ".jpeg"))
            image.save(buffer, format="JPEG" if is_jpeg else "PNG", **({"quality": 95} if is_jpeg else {}))
            return ("jpg" if is_jpeg else "png"), buffer.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path!r}: {err}") from err

def add_common_arguments(p: argparse.ArgumentParser, out: str | None) -> None:
    """The options every shard-writing command takes."""
    p.add_argument("--out", required=out is None, default=out, help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split/generation seed (default: %(default)s)")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="samples per shard (default: min(1000, ceil(n/4)), so each split has >= 4 shards)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def writer_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of a ``prepare_*`` writer that :func:`add_common_arguments` parsed."""
    return {"out_dir": args.out, "seed": args.seed, "samples_per_shard": args.samples_per_shard,
            "progress": not args.no_progress}


def print_splits(manifest: dict[str, Any], out: str) -> dict[str, Any]:
    """Print each split's sample and shard counts and shard pattern; returns ``manifest``."""
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['num_samples']} samples in {entry['num_shards']} shards: "
              f"{os.path.join(out, entry['pattern'])}")
    return manifest

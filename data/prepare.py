"""Write the data sets' WebDataset shards: ``python -m data.prepare {shapes,digits,images,captions,conversations,tokenizer} ...``.

* ``shapes``: the procedural shapes world (:mod:`mm_lightning.data.synthetic`), every task's default.
* ``digits``: scikit-learn's handwritten digits (ship with the package; nothing is downloaded).
* ``images``: an ImageFolder-style directory (one sub-folder per class) of your own images.
* ``captions``: a ``.jsonl`` or ``.csv`` list of (image path, caption) pairs, written as image-text shards in
  img2dataset's layout (``.jpg``/``.png`` + ``.txt`` + ``.json``) with a BPE ``tokenizer.json`` for CLIP.
* ``tokenizer``: a BPE ``tokenizer.json`` trained on the captions of existing shards (yours, img2dataset's).
* ``conversations``: a LLaVA-format ``.json`` list of ``{"id", "image", "conversations"}`` and its image folder,
  written as instruction shards (image + ``.json``) with a chat tokenizer (:mod:`data.conversations`).
* ``preferences``: a ``.jsonl`` of ``{"image", "prompt", "chosen", "rejected"}`` rows and its image folder, written
  as preference shards (image + ``.json``) with a chat tokenizer (:mod:`data.preferences`).

Each writes ``{name}-{split}-000000.tar ...`` into one directory, with ``sizes.json`` (samples per
shard) and ``manifest.json`` (name, classes, image size, seed, and per split its sample count,
shard count and brace pattern). The manifest is written last, so its presence means "complete".
Run from the repository root; the runner calls :func:`ensure_builtin` to generate the built-in
data sets on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
from PIL import Image
from tqdm import tqdm

from mm_lightning.data import synthetic
from mm_lightning.data.chat_tokenizer import CHAT_TOKENIZER_DIR, CHATML_TOKENIZER_DIR, train_chat_tokenizer_from_shards
from mm_lightning.data.shards import MANIFEST_FILE, update_sizes, write_manifest, write_shards
from mm_lightning.data.tokenizer import TOKENIZER_FILE, train_tokenizer_from_shards

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


def _check(value: int, flag: str, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{flag} must be at least {minimum}, got {value}")


def _source_paths(src: str | os.PathLike, images: str | os.PathLike, val_fraction: float, test_fraction: float,
                  image_size: int | None, samples_per_shard: int | None) -> tuple[str, str]:
    """The checked flags of a ``--src FILE --images DIR`` subcommand; returns ``(src path, image folder)``."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must be in [0, 1) "
                         "and sum to less than 1")
    if image_size is not None:
        _check(image_size, "--image-size", 8)
    if samples_per_shard is not None:
        _check(samples_per_shard, "--samples-per-shard", 1)
    src_path = os.path.expanduser(os.fspath(src))
    image_root = os.path.expanduser(os.fspath(images))
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"--images {image_root!r} is not a directory")
    return src_path, image_root


def _random_split(count: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Indices ``0..count-1`` shuffled by ``seed`` into test, val and train parts of the given fractions."""
    order = np.random.default_rng(seed).permutation(count).tolist()
    n_test, n_val = round(count * test_fraction), round(count * val_fraction)
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


def _shard_name(name: str | None, src_path: str, default: str) -> str:
    """A shard-name prefix from ``name`` (or the source file's stem) with only safe characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or Path(src_path).stem).strip("_.") or default


def _write_split(out: Path, name: str, split: str, samples: Iterable[dict[str, Any]], num_samples: int,
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


def _finish(out: Path, splits: dict[str, dict[str, Any] | None], **fields: Any) -> dict[str, Any]:
    return write_manifest(out, **fields, splits={k: v for k, v in splits.items() if v is not None})


def _start(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a fresh manifest, written only once all shards are
    return out


def prepare_shapes(out_dir: str | os.PathLike = "data/shards/shapes", train: int = 10000, val: int = 1000,
                   test: int = 2000, image_size: int = 32, seed: int = 0, samples_per_shard: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Generate the shapes world's train/val/test shards; returns the manifest.

    Each split draws from its own stream (:func:`synthetic.split_seed`), so no scene repeats
    across splits and growing one split leaves the others unchanged.
    """
    for value, flag in ((train, "--train"), (val, "--val"), (test, "--test")):
        _check(value, flag, 0)
    _check(image_size, "--image-size", 16)
    if samples_per_shard is not None:
        _check(samples_per_shard, "--samples-per-shard", 1)
    out = _start(out_dir)
    splits = {
        split: _write_split(out, "shapes", split, synthetic.shapes_samples(n, synthetic.split_seed(seed, split),
                                                                           image_size), n, samples_per_shard, progress)
        for split, n in zip(SPLITS, (train, val, test))
    }
    if splits["train"] is not None:  # CLIP's tokenizer: a byte-level BPE of the training captions
        train_tokenizer_from_shards(sorted(out.glob("shapes-train-[0-9]*.tar")), out / TOKENIZER_FILE)
        # The multimodal LLM's: case-keeping BPE of captions, questions, answers and preference texts
        train_chat_tokenizer_from_shards(sorted(out.glob("shapes-train-[0-9]*.tar")), out / CHAT_TOKENIZER_DIR)
        # the same texts in Qwen2's ChatML layout, for LMs of that family (mllm_siglip_qwen2_shapes.yaml)
        train_chat_tokenizer_from_shards(sorted(out.glob("shapes-train-[0-9]*.tar")), out / CHATML_TOKENIZER_DIR,
                                         layout="chatml")
    return _finish(out, splits, name="shapes", classes=list(synthetic.CLASS_NAMES), image_size=image_size,
                   seed=seed, members=["png", "cls", "txt", "json"], generator="mm_lightning.data.synthetic",
                   generator_version=synthetic.VERSION,
                   chat_tokenizer=CHAT_TOKENIZER_DIR if splits["train"] is not None else None)


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


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prepare_digits(out_dir: str | os.PathLike = "data/shards/digits", image_size: int = 32, seed: int = 0,
                   val_fraction: float = 0.1, test_fraction: float = 0.1, samples_per_shard: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Write scikit-learn's 1,797 8x8 handwritten digits as RGB PNG shards; returns the manifest.

    Pixel values 0-16 are scaled to 0-255 and upscaled (bilinear) to ``image_size``; the split
    is stratified by digit (with the defaults: 1,437 train, 180 val, 180 test).
    """
    from sklearn.datasets import load_digits

    _check(image_size, "--image-size", 8)
    if samples_per_shard is not None:
        _check(samples_per_shard, "--samples-per-shard", 1)
    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255 / 16)), 0, 255).astype(np.uint8)
    labels = [int(t) for t in digits.target]
    parts = stratified_split(labels, val_fraction, test_fraction, seed)

    def samples(indices: list[int]) -> Iterator[dict[str, Any]]:
        for i in indices:
            image = Image.fromarray(pixels[i], "L").resize((image_size, image_size), Image.Resampling.BILINEAR)
            yield {"__key__": f"{i:08d}", "png": _png(image.convert("RGB")), "cls": labels[i]}

    out = _start(out_dir)
    splits = {split: _write_split(out, "digits", split, samples(parts[split]), len(parts[split]),
                                  samples_per_shard, progress) for split in SPLITS}
    return _finish(out, splits, name="digits", classes=[str(d) for d in range(10)], image_size=image_size,
                   seed=seed, members=["png", "cls"], source="sklearn.datasets.load_digits")


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


def _image_member(path: str, image_size: int | None) -> tuple[str, bytes]:
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
                return "png", _png(image)
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
        _check(image_size, "--image-size", 8)
    if samples_per_shard is not None:
        _check(samples_per_shard, "--samples-per-shard", 1)
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
            ext, data = _image_member(path, image_size)
            yield {"__key__": f"{i:08d}", ext: data, "cls": label,
                   "json": {"path": os.path.relpath(path, root), "class": classes[label]}}

    out = _start(out_dir)
    splits = {split: _write_split(out, name, split, samples(parts[split]), len(parts[split]),
                                  samples_per_shard, progress) for split in SPLITS}
    return _finish(out, splits, name=name, classes=classes, image_size=image_size, seed=seed,
                   members=["<image extension>", "cls", "json"], source=os.path.abspath(root),
                   val_fraction=val_fraction, test_fraction=test_fraction)


CAPTION_IMAGE_KEYS = ("image", "filepath", "image_path", "path", "file")  # open_clip's csv uses filepath/title
CAPTION_TEXT_KEYS = ("caption", "title", "text")


def read_caption_list(src: str | os.PathLike, image_key: str | None = None,
                      caption_key: str | None = None) -> list[tuple[str, str]]:
    """``(image path, caption)`` rows of a ``.jsonl`` file or a ``.csv``/``.tsv`` with a header row.

    Columns: ``image_key`` / ``caption_key``, by default the first present of
    :data:`CAPTION_IMAGE_KEYS` / :data:`CAPTION_TEXT_KEYS`. Relative image paths are relative to ``src``'s folder.
    """
    import csv

    path = os.path.expanduser(os.fspath(src))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--src {path!r} is not a file")
    with open(path, newline="", encoding="utf-8") as f:
        if path.lower().endswith(".jsonl"):
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as err:
                        raise ValueError(f"--src {path!r} line {n} is not JSON: {err}") from err
        elif path.lower().endswith((".csv", ".tsv")):
            rows = list(csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ","))
        else:
            raise ValueError(f"--src {path!r}: expected a .jsonl, .csv or .tsv file")
    if not rows:
        raise ValueError(f"--src {path!r} holds no rows")
    keys = set(rows[0]) if isinstance(rows[0], dict) else set()
    ikey = image_key or next((k for k in CAPTION_IMAGE_KEYS if k in keys), None)
    ckey = caption_key or next((k for k in CAPTION_TEXT_KEYS if k in keys), None)
    if ikey not in keys or ckey not in keys:
        raise ValueError(f"--src {path!r} needs an image column ({image_key or ' or '.join(CAPTION_IMAGE_KEYS)}) and a "
                         f"caption column ({caption_key or ' or '.join(CAPTION_TEXT_KEYS)}); it has {sorted(keys)}")
    base = os.path.dirname(os.path.abspath(path))
    return [(os.path.join(base, os.path.expanduser(str(r[ikey]))), str(r[ckey]).strip()) for r in rows]


def prepare_captions(src: str | os.PathLike, out_dir: str | os.PathLike, val_fraction: float = 0.05,
                     test_fraction: float = 0.05, seed: int = 0, image_size: int | None = None,
                     samples_per_shard: int | None = None, name: str | None = None, image_key: str | None = None,
                     caption_key: str | None = None, vocab_size: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Turn a list of (image path, caption) into image-text shards in img2dataset's layout; returns the manifest.

    Each sample holds the image (original JPEG/PNG/WebP bytes, or resized and centre-cropped with
    ``image_size``), ``.txt`` (the caption) and ``.json`` (``caption``, ``path``); the rows are split at
    random into train/val/test. A byte-level BPE ``tokenizer.json`` trained on the training captions is
    saved beside the shards. Every image is decoded once here, so an unreadable file is an error naming it.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must be in [0, 1) "
                         "and sum to less than 1")
    if image_size is not None:
        _check(image_size, "--image-size", 8)
    items = read_caption_list(src, image_key, caption_key)
    order = np.random.default_rng(seed).permutation(len(items)).tolist()
    n_test, n_val = round(len(items) * test_fraction), round(len(items) * val_fraction)
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    if not parts["train"]:
        raise ValueError(f"--src {os.fspath(src)!r}: no rows left for training ({len(items)} in all)")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name or Path(os.fspath(src)).stem).strip("_.") or "captions"
    base = os.path.dirname(os.path.abspath(os.path.expanduser(os.fspath(src))))

    def samples(indices: list[int]) -> Iterator[dict[str, Any]]:
        for i in indices:
            path, text = items[i]
            ext, data = _image_member(path, image_size)
            meta = {"caption": text, "path": os.path.relpath(path, base), "key": f"{i:09d}"}
            yield {"__key__": f"{i:09d}", ext: data, "txt": text, "json": meta}

    out = _start(out_dir)
    splits = {split: _write_split(out, name, split, samples(parts[split]), len(parts[split]), samples_per_shard, progress)
              for split in SPLITS}
    train_tokenizer_from_shards(sorted(out.glob(f"{name}-train-[0-9]*.tar")), out / TOKENIZER_FILE, vocab_size)
    return _finish(out, splits, name=name, image_size=image_size, seed=seed, members=["<image extension>", "txt", "json"],
                   source=os.path.abspath(os.fspath(src)), tokenizer=TOKENIZER_FILE)


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


def prepare_tokenizer(shards: str, out: str | os.PathLike, vocab_size: int = 1000, min_frequency: int = 2,
                      caption_key: str = "txt") -> dict[str, Any]:
    """Train a byte-level BPE ``tokenizer.json`` on the ``.{caption_key}`` members of existing shards.

    ``shards`` is a shard specification (directory, glob or brace pattern, as ``data.train`` takes
    it). Returns ``{"tokenizer": path, "vocab_size": n}``.
    """
    from mm_lightning.data.shards import ShardSpecError, list_shards
    from mm_lightning.data.tokenizer import TextTokenizer

    try:
        found = list_shards(shards)
    except ShardSpecError as err:
        raise ValueError(f"--shards {shards}: {err}") from None
    path = train_tokenizer_from_shards(found, out, vocab_size, min_frequency, caption_key)
    return {"tokenizer": str(path), "vocab_size": TextTokenizer(path).vocab_size}


# ------------------------------------------------------------------------------- command line
def _common(p: argparse.ArgumentParser, out: str | None) -> None:
    """The options every shard-writing command takes."""
    p.add_argument("--out", required=out is None, default=out, help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="split/generation seed (default: %(default)s)")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="samples per shard (default: min(1000, ceil(n/4)), so each split has >= 4 shards)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _writer_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"out_dir": args.out, "seed": args.seed, "samples_per_shard": args.samples_per_shard,
            "progress": not args.no_progress}


def _print_splits(manifest: dict[str, Any], out: str) -> dict[str, Any]:
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['num_samples']} samples in {entry['num_shards']} shards: "
              f"{os.path.join(out, entry['pattern'])}")
    return manifest


def _run_shapes(args: argparse.Namespace) -> dict[str, Any]:
    return _print_splits(prepare_shapes(train=args.train, val=args.val, test=args.test, image_size=args.image_size,
                                        **_writer_args(args)), args.out)


def _run_digits(args: argparse.Namespace) -> dict[str, Any]:
    return _print_splits(prepare_digits(image_size=args.image_size, val_fraction=args.val_fraction,
                                        test_fraction=args.test_fraction, **_writer_args(args)), args.out)


def _run_images(args: argparse.Namespace) -> dict[str, Any]:
    return _print_splits(prepare_images(args.src, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                        image_size=args.image_size, name=args.name, **_writer_args(args)), args.out)


def _run_captions(args: argparse.Namespace) -> dict[str, Any]:
    return _print_splits(prepare_captions(args.src, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                          image_size=args.image_size, name=args.name, image_key=args.image_key,
                                          caption_key=args.caption_key, vocab_size=args.vocab_size,
                                          **_writer_args(args)), args.out)


def _run_tokenizer(args: argparse.Namespace) -> dict[str, Any]:
    result = prepare_tokenizer(args.shards, args.out, args.vocab_size, args.min_frequency, args.caption_key)
    print(f"tokenizer ({result['vocab_size']} tokens) written to {result['tokenizer']}")
    return result


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m data.prepare`` command line: one sub-command each, run by its ``_run_<name>`` handler."""
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shapes", help="the procedural shapes world")
    _common(p, "data/shards/shapes")
    p.add_argument("--train", type=int, default=10000, help="training samples (default: %(default)s)")
    p.add_argument("--val", type=int, default=1000, help="validation samples (default: %(default)s)")
    p.add_argument("--test", type=int, default=2000, help="test samples (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    p.set_defaults(run=_run_shapes)

    for cmd in ("digits", "images"):
        p = sub.add_parser(cmd, help="scikit-learn's handwritten digits" if cmd == "digits"
                           else "an ImageFolder-style directory (one sub-folder per class)")
        _common(p, "data/shards/digits" if cmd == "digits" else None)
        p.add_argument("--val-fraction", type=float, default=0.1, help="per-class validation share (default: 0.1)")
        p.add_argument("--test-fraction", type=float, default=0.1, help="per-class test share (default: 0.1)")
        if cmd == "digits":
            p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: %(default)s)")
            p.set_defaults(run=_run_digits)
        else:
            p.add_argument("--src", required=True, help="directory with one sub-folder of images per class")
            p.add_argument("--image-size", type=int, default=None,
                           help="resize (shorter side) and centre-crop to this size; default: keep the original bytes")
            p.add_argument("--name", default=None, help="shard name prefix (default: the --src folder's name)")
            p.set_defaults(run=_run_images)

    p = sub.add_parser("captions", help="a .jsonl/.csv list of (image path, caption): image-text shards for CLIP")
    _common(p, None)
    p.add_argument("--src", required=True, help=".jsonl (keys image, caption) or .csv/.tsv (columns image, caption)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="validation share (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.05, help="test share (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize (shorter side) and centre-crop to this size; default: keep the original bytes")
    p.add_argument("--name", default=None, help="shard name prefix (default: the --src file's name)")
    p.add_argument("--image-key", default=None, help="image column (default: image, filepath, image_path, path or file)")
    p.add_argument("--caption-key", default=None, help="caption column (default: caption, title or text)")
    p.add_argument("--vocab-size", type=int, default=1000, help="BPE vocabulary of tokenizer.json (default: %(default)s)")
    p.set_defaults(run=_run_captions)

    from data import conversations

    p = sub.add_parser("conversations", help="a LLaVA-format .json and its images: instruction shards for the MLLM")
    _common(p, None)
    conversations.add_arguments(p)
    p.set_defaults(run=conversations.run)

    p = sub.add_parser("tokenizer", help="train a BPE tokenizer.json on the captions (.txt) of existing shards")
    p.add_argument("--shards", required=True, help="training shards (directory, glob or brace pattern)")
    p.add_argument("--out", required=True, help="where to write tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=1000, help="largest vocabulary (default: %(default)s)")
    p.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair (default: %(default)s)")
    p.add_argument("--caption-key", default="txt", help="caption member of a sample (default: %(default)s)")
    p.set_defaults(run=_run_tokenizer)

    from data import preferences

    p = sub.add_parser("preferences", help="a .jsonl of {image, prompt, chosen, rejected} rows: preference shards")
    _common(p, None)
    preferences.add_arguments(p)
    p.set_defaults(run=preferences.run)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` and run the sub-command; returns its result (a manifest for the shard writers).

    Errors (a missing file, a bad number) exit with status 2 and one line naming the flag or file.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog} {args.command}: error: {err}\n")


if __name__ == "__main__":
    main()

"""``python -m data.prepare captions --src FILE``: a ``.jsonl``/``.csv`` list of (image path, caption) pairs,
written as image-text shards in img2dataset's layout with a BPE ``tokenizer.json`` for CLIP.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data.common import SPLITS, begin_dataset, check_minimum, finish_dataset, image_member, write_split
from mm_lightning.data.tokenizer import TOKENIZER_FILE, train_tokenizer_from_shards


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
        check_minimum(image_size, "--image-size", 8)
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
            ext, data = image_member(path, image_size)
            meta = {"caption": text, "path": os.path.relpath(path, base), "key": f"{i:09d}"}
            yield {"__key__": f"{i:09d}", ext: data, "txt": text, "json": meta}

    out = begin_dataset(out_dir)
    splits = {split: write_split(out, name, split, samples(parts[split]), len(parts[split]), samples_per_shard, progress)
              for split in SPLITS}
    train_tokenizer_from_shards(sorted(out.glob(f"{name}-train-[0-9]*.tar")), out / TOKENIZER_FILE, vocab_size)
    return finish_dataset(out, splits, name=name, image_size=image_size, seed=seed, members=["<image extension>", "txt", "json"],
                   source=os.path.abspath(os.fspath(src)), tokenizer=TOKENIZER_FILE)

"""``python -m data.prepare preferences --src FILE.jsonl --images DIR --out DIR``: preference pairs into shards.

The source is a JSON Lines file (or a JSON list) of ``{"image", "prompt", "chosen", "rejected"}`` rows,
TRL's preference columns plus the image path (relative to ``--images``; RLAIF-V's layout). ``prompt``
is a string or a list of messages ending with a user turn; ``chosen`` / ``rejected`` strings or a
one-message list; an optional ``type`` (a question type) and ``id`` are kept. Every row is checked
before anything is written (the rules of :mod:`mm_lightning.data.preferences`; the image must exist
and decode), so a malformed row or a missing image is a one-line error naming the row. Rows are split
at random into train/val/test and written as preference shards: the image (original bytes, or
resized and centre-cropped with ``--image-size``) and ``.json`` ``{"prompt", "chosen", "rejected"}``
(at its top level: ``PreferencePipeline(field=None)`` reads it), with ``sizes.json``, ``manifest.json``
and a chat tokenizer (``chat_tokenizer/``) trained on the training rows' texts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from data.common import (SPLITS, begin_dataset, finish_dataset, image_member, print_splits, random_split,
                         shard_name, source_paths, write_split, writer_args)
from mm_lightning.data.chat_tokenizer import CHAT_TOKENIZER_DIR, IMAGE_TOKEN, train_chat_tokenizer
from mm_lightning.data.conversations import ConversationError
from mm_lightning.data.preferences import PAIR_KEYS, completion_text, prompt_turns


def read_rows(src: str) -> list[Any]:
    """The rows of a ``.jsonl`` file (one JSON object a line) or of a ``.json`` list."""
    if not os.path.isfile(src):
        raise FileNotFoundError(f"--src {src!r} is not a file")
    with open(src, encoding="utf-8") as f:
        if not src.lower().endswith(".jsonl"):
            try:
                rows = json.load(f)
            except ValueError as err:
                raise ValueError(f"--src {src!r} is not JSON: {err}") from None
            if not isinstance(rows, list):
                raise ValueError(f"--src {src!r} holds a JSON {type(rows).__name__}, not a list of rows")
        else:
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as err:
                        raise ValueError(f"--src {src!r} line {n} is not JSON: {err}") from None
    if not rows:
        raise ValueError(f"--src {src!r} holds no rows")
    return rows


def check_row(row: Any, where: str, images: str) -> tuple[str, dict[str, Any]]:
    """The image path and the ``.json`` of one row; raises naming ``where`` (the file and row) on a bad row."""
    if not isinstance(row, dict):
        raise ValueError(f"{where} is a {type(row).__name__}, not an object with image, prompt, chosen, rejected")
    missing = [k for k in ("image", *PAIR_KEYS) if k not in row]
    if missing:
        raise ValueError(f"{where} has no {', '.join(repr(k) for k in missing)} (it has {', '.join(sorted(row))})")
    if not isinstance(row["image"], str) or not row["image"]:
        raise ValueError(f"{where}: 'image' must be one relative path, got {row['image']!r}")
    try:
        turns = prompt_turns(row["prompt"])
        chosen, rejected = completion_text(row["chosen"], "chosen"), completion_text(row["rejected"], "rejected")
    except ConversationError as err:
        raise ValueError(f"{where}: malformed pair: {err}") from None
    if chosen == rejected:
        raise ValueError(f"{where}: chosen and rejected are the same text")
    path = os.path.join(images, os.path.expanduser(row["image"]))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image {row['image']!r} not found under --images {images!r}")
    meta = {k: row[k] for k in PAIR_KEYS}
    meta.update({k: row[k] for k in ("id", "type") if k in row})
    meta["image"] = row["image"]
    meta["_texts"] = [t.text.replace(IMAGE_TOKEN, "").strip() for t in turns] + [chosen, rejected]
    return path, meta


def prepare_preferences(src: str | os.PathLike, images: str | os.PathLike, out_dir: str | os.PathLike,
                        val_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0,
                        image_size: int | None = None, samples_per_shard: int | None = None, name: str | None = None,
                        vocab_size: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Turn a preference JSONL file and its image folder into preference shards; returns the manifest."""
    src_path, image_root = source_paths(src, images, val_fraction, test_fraction, image_size, samples_per_shard)
    rows = read_rows(src_path)
    checked = [check_row(row, f"--src {src_path!r} row {i + 1}", image_root) for i, row in enumerate(rows)]
    decoded: set[str] = set()
    for i, (path, _) in enumerate(checked):  # decode every image now: a corrupt file fails before anything is written
        if path not in decoded:
            try:
                image_member(path, image_size)
            except ValueError as err:
                raise ValueError(f"--src {src_path!r} row {i + 1}: {err}") from None
            decoded.add(path)
    parts = random_split(len(rows), val_fraction, test_fraction, seed)
    if not parts["train"]:
        raise ValueError(f"--src {src_path!r}: no rows left for training ({len(rows)} in all)")
    name = shard_name(name, src_path, "preferences")

    def samples(indices: list[int]) -> Iterator[dict[str, Any]]:
        for i in indices:
            path, meta = checked[i]
            ext, data = image_member(path, image_size)
            yield {"__key__": f"{i:09d}", ext: data, "json": {k: v for k, v in meta.items() if k != "_texts"}}

    out = begin_dataset(out_dir)
    splits = {split: write_split(out, name, split, samples(parts[split]), len(parts[split]), samples_per_shard, progress)
              for split in SPLITS}
    texts = (t for i in parts["train"] for t in checked[i][1]["_texts"] if t)
    train_chat_tokenizer(texts, out / CHAT_TOKENIZER_DIR, vocab_size)
    return finish_dataset(out, splits, name=name, image_size=image_size, seed=seed, members=["<image extension>", "json"],
                   format="preference", source=os.path.abspath(src_path), images=os.path.abspath(image_root),
                   chat_tokenizer=CHAT_TOKENIZER_DIR)


def add_arguments(parser: Any) -> None:
    """The ``preferences`` subcommand's own flags (``--out``, ``--seed`` ... come from data.prepare)."""
    parser.add_argument("--src", required=True, help=".jsonl (or .json list) of {image, prompt, chosen, rejected} rows")
    parser.add_argument("--images", required=True, help="folder the rows' 'image' paths are relative to")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="validation share (default: %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=0.05, help="test share (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize (shorter side) and centre-crop to this size; default: keep the original bytes")
    parser.add_argument("--name", default=None, help="shard name prefix (default: the --src file's name)")
    parser.add_argument("--vocab-size", type=int, default=1000, help="BPE vocabulary of chat_tokenizer/ (default: %(default)s)")


def run(args: Any) -> dict[str, Any]:
    """Run the parsed ``preferences`` subcommand; print where the shards went."""
    manifest = prepare_preferences(args.src, args.images, val_fraction=args.val_fraction,
                                   test_fraction=args.test_fraction, image_size=args.image_size, name=args.name,
                                   vocab_size=args.vocab_size, **writer_args(args))
    return print_splits(manifest, args.out)

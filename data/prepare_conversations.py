"""``python -m data.prepare conversations --src data.json --images DIR --out DIR``: LLaVA-format data into shards.

The source is LLaVA's instruction format: a JSON list (or JSON Lines) of
``{"id": ..., "image": "relative/path.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}`` entries, multi-turn, ``<image>`` in the first human turn.
Every entry is checked before anything is written (the same rules as
:func:`mm_lightning.data.conversations.parse_conversation`; the image file must exist under
``--images``), so a malformed conversation or a missing image is a one-line error naming the entry.
Entries are split at random into train/val/test and written as instruction shards: the image
(original bytes, or resized and centre-cropped with ``--image-size``) and ``.json`` (``id``, ``image``,
``conversations``), with ``sizes.json``, ``manifest.json`` and a chat tokenizer (``chat_tokenizer/``)
trained on the training conversations.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from data.common import (SPLITS, begin_dataset, finish_dataset, image_member, print_splits, random_split,
                         shard_name, source_paths, write_split, writer_args)
from mm_lightning.data.chat_tokenizer import CHAT_TOKENIZER_DIR, json_texts, train_chat_tokenizer
from mm_lightning.data.conversations import ConversationError, parse_conversation


def read_entries(src: str | os.PathLike) -> list[Any]:
    """The entries of a LLaVA-format ``.json`` list or a ``.jsonl`` file (one entry a line)."""
    path = os.path.expanduser(os.fspath(src))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--src {path!r} is not a file")
    with open(path, encoding="utf-8") as f:
        if path.lower().endswith(".jsonl"):
            entries = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        entries.append(json.loads(line))
                    except ValueError as err:
                        raise ValueError(f"--src {path!r} line {n} is not JSON: {err}") from None
        else:
            try:
                entries = json.load(f)
            except ValueError as err:
                raise ValueError(f"--src {path!r} is not JSON: {err}") from None
    if not isinstance(entries, list):
        raise ValueError(f"--src {path!r} holds a JSON {type(entries).__name__}, not a list of "
                         "{\"id\", \"image\", \"conversations\"} entries (LLaVA's format)")
    if not entries:
        raise ValueError(f"--src {path!r} holds no entries")
    return entries


def _entry_name(index: int, entry: Any) -> str:
    if isinstance(entry, dict) and "id" in entry:
        return f"entry {index} (id {entry['id']!r})"
    return f"entry {index}"


def check_entries(entries: list[Any], src: str, images: str, skip_text_only: bool) -> tuple[list[tuple[int, str]], int]:
    """``(entry index, image path)`` of every usable entry, and how many text-only entries were skipped.

    Raises ``ValueError`` (malformed entry or conversation) or ``FileNotFoundError`` (missing image),
    naming the entry.
    """
    usable: list[tuple[int, str]] = []
    skipped = 0
    for i, entry in enumerate(entries):
        name = _entry_name(i, entry)
        if not isinstance(entry, dict):
            raise ValueError(f"--src {src!r}: {name} is a {type(entry).__name__}, not an object")
        if "image" not in entry:
            if skip_text_only:
                skipped += 1
                continue
            raise ValueError(f"--src {src!r}: {name} has no 'image' (text-only entry; --skip-text-only leaves those out)")
        image = entry["image"]
        if not isinstance(image, str) or not image:
            raise ValueError(f"--src {src!r}: {name}: 'image' must be one relative path, got {image!r}")
        if "conversations" not in entry:
            raise ValueError(f"--src {src!r}: {name} has no 'conversations'")
        try:
            parse_conversation(entry["conversations"], image=True)
        except ConversationError as err:
            raise ValueError(f"--src {src!r}: {name}: malformed conversation: {err}") from None
        path = os.path.join(images, os.path.expanduser(image))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--src {src!r}: {name}: image {image!r} not found under --images {images!r}")
        usable.append((i, path))
    if not usable:
        raise ValueError(f"--src {src!r}: no entry with an image ({skipped} text-only entries skipped)")
    return usable, skipped


def prepare_conversations(src: str | os.PathLike, images: str | os.PathLike, out_dir: str | os.PathLike,
                          val_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0,
                          image_size: int | None = None, samples_per_shard: int | None = None, name: str | None = None,
                          skip_text_only: bool = False, vocab_size: int = 1000, progress: bool = True) -> dict[str, Any]:
    """Turn a LLaVA-format JSON file and its image folder into instruction shards; returns the manifest."""
    src_path, image_root = source_paths(src, images, val_fraction, test_fraction, image_size, samples_per_shard)
    entries = read_entries(src_path)
    usable, skipped = check_entries(entries, src_path, image_root, skip_text_only)
    parts = random_split(len(usable), val_fraction, test_fraction, seed)
    if not parts["train"]:
        raise ValueError(f"--src {src_path!r}: no entries left for training ({len(usable)} in all)")
    name = shard_name(name, src_path, "conversations")

    def samples(indices: list[int]) -> Iterator[dict[str, Any]]:
        for k in indices:
            i, path = usable[k]
            entry = entries[i]
            try:
                ext, data = image_member(path, image_size)
            except ValueError as err:
                raise ValueError(f"--src {src_path!r}: {_entry_name(i, entry)}: {err}") from None
            meta = {"id": entry.get("id", i), "image": entry["image"], "conversations": entry["conversations"]}
            yield {"__key__": f"{i:09d}", ext: data, "json": meta}

    out = begin_dataset(out_dir)
    splits = {split: write_split(out, name, split, samples(parts[split]), len(parts[split]), samples_per_shard, progress)
              for split in SPLITS}
    texts = (t for k in parts["train"] for t in json_texts(entries[usable[k][0]]))
    train_chat_tokenizer(texts, out / CHAT_TOKENIZER_DIR, vocab_size)
    return finish_dataset(out, splits, name=name, image_size=image_size, seed=seed, members=["<image extension>", "json"],
                   format="llava", source=os.path.abspath(src_path), images=os.path.abspath(image_root),
                   skipped_text_only=skipped, chat_tokenizer=CHAT_TOKENIZER_DIR)


def add_arguments(parser: Any) -> None:
    """The ``conversations`` subcommand's own flags (``--out``, ``--seed`` ... come from data.prepare)."""
    parser.add_argument("--src", required=True, help="LLaVA-format .json list (or .jsonl) of {id, image, conversations}")
    parser.add_argument("--images", required=True, help="folder the entries' 'image' paths are relative to")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="validation share (default: %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=0.05, help="test share (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize (shorter side) and centre-crop to this size; default: keep the original bytes")
    parser.add_argument("--name", default=None, help="shard name prefix (default: the --src file's name)")
    parser.add_argument("--skip-text-only", action="store_true", help="leave out entries without an image")
    parser.add_argument("--vocab-size", type=int, default=1000, help="BPE vocabulary of chat_tokenizer/ (default: %(default)s)")


def run(args: Any) -> dict[str, Any]:
    """Run the parsed ``conversations`` subcommand; print where the shards went."""
    manifest = prepare_conversations(args.src, args.images, val_fraction=args.val_fraction,
                                     test_fraction=args.test_fraction, image_size=args.image_size, name=args.name,
                                     skip_text_only=args.skip_text_only, vocab_size=args.vocab_size, **writer_args(args))
    return print_splits(manifest, args.out)

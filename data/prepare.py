"""Write the data sets' WebDataset shards: ``python -m data.prepare {shapes,digits,images,captions,conversations,tokenizer} ...``.

* ``shapes``: the procedural shapes world (:mod:`mm_lightning.data.synthetic`), every task's default.
* ``digits``: scikit-learn's handwritten digits (ship with the package; nothing is downloaded).
* ``images``: an ImageFolder-style directory (one sub-folder per class) of your own images.
* ``captions``: a ``.jsonl`` or ``.csv`` list of (image path, caption) pairs, written as image-text shards in
  img2dataset's layout (``.jpg``/``.png`` + ``.txt`` + ``.json``) with a BPE ``tokenizer.json`` for CLIP.
* ``tokenizer``: a BPE ``tokenizer.json`` trained on the captions of existing shards (yours, img2dataset's).
* ``conversations``: a LLaVA-format ``.json`` list of ``{"id", "image", "conversations"}`` and its image folder,
  written as instruction shards (image + ``.json``) with a chat tokenizer (:mod:`data.prepare_conversations`).
* ``preferences``: a ``.jsonl`` of ``{"image", "prompt", "chosen", "rejected"}`` rows and its image folder, written
  as preference shards (image + ``.json``) with a chat tokenizer (:mod:`data.prepare_preferences`).

Each writes ``{name}-{split}-000000.tar ...`` into one directory, with ``sizes.json`` (samples per
shard) and ``manifest.json`` (name, classes, image size, seed, and per split its sample count,
shard count and brace pattern). The manifest is written last, so its presence means "complete".
Run from the repository root. This module is the command line; each writer lives in its own
``data/prepare_<source>.py``, their shared helpers in :mod:`data.common`, and the runner calls
:func:`data.builtin.ensure_builtin` to generate the built-in data sets on first use.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from data import prepare_conversations, prepare_preferences
# the writers' public functions, importable from here as before (tests, notebooks: ``from data.prepare import ...``)
from data.builtin import (BUILTIN_DATASETS, builtin_locations, ensure_builtin, ensure_tokenizer,  # noqa: F401
                          is_prepared, pending_builtin)
from data.common import (IMAGE_EXTENSIONS, KEEP_BYTES, SPLITS, add_common_arguments,  # noqa: F401
                         default_samples_per_shard, print_splits, stratified_split, writer_args)
from data.prepare_captions import CAPTION_IMAGE_KEYS, CAPTION_TEXT_KEYS, prepare_captions, read_caption_list  # noqa: F401
from data.prepare_digits import prepare_digits
from data.prepare_images import find_images, prepare_images  # noqa: F401
from data.prepare_shapes import prepare_shapes
from data.prepare_tokenizer import prepare_tokenizer


# ------------------------------------------------------------------------------- command line
def _run_shapes(args: argparse.Namespace) -> dict[str, Any]:
    return print_splits(prepare_shapes(train=args.train, val=args.val, test=args.test, image_size=args.image_size,
                                        **writer_args(args)), args.out)


def _run_digits(args: argparse.Namespace) -> dict[str, Any]:
    return print_splits(prepare_digits(image_size=args.image_size, val_fraction=args.val_fraction,
                                        test_fraction=args.test_fraction, **writer_args(args)), args.out)


def _run_images(args: argparse.Namespace) -> dict[str, Any]:
    return print_splits(prepare_images(args.src, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                        image_size=args.image_size, name=args.name, **writer_args(args)), args.out)


def _run_captions(args: argparse.Namespace) -> dict[str, Any]:
    return print_splits(prepare_captions(args.src, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                          image_size=args.image_size, name=args.name, image_key=args.image_key,
                                          caption_key=args.caption_key, vocab_size=args.vocab_size,
                                          **writer_args(args)), args.out)


def _run_tokenizer(args: argparse.Namespace) -> dict[str, Any]:
    result = prepare_tokenizer(args.shards, args.out, args.vocab_size, args.min_frequency, args.caption_key)
    print(f"tokenizer ({result['vocab_size']} tokens) written to {result['tokenizer']}")
    return result


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m data.prepare`` command line: one sub-command each, run by its ``_run_<name>`` handler."""
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shapes", help="the procedural shapes world")
    add_common_arguments(p, "data/shards/shapes")
    p.add_argument("--train", type=int, default=10000, help="training samples (default: %(default)s)")
    p.add_argument("--val", type=int, default=1000, help="validation samples (default: %(default)s)")
    p.add_argument("--test", type=int, default=2000, help="test samples (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    p.set_defaults(run=_run_shapes)

    for cmd in ("digits", "images"):
        p = sub.add_parser(cmd, help="scikit-learn's handwritten digits" if cmd == "digits"
                           else "an ImageFolder-style directory (one sub-folder per class)")
        add_common_arguments(p, "data/shards/digits" if cmd == "digits" else None)
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
    add_common_arguments(p, None)
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

    p = sub.add_parser("conversations", help="a LLaVA-format .json and its images: instruction shards for the MLLM")
    add_common_arguments(p, None)
    prepare_conversations.add_arguments(p)
    p.set_defaults(run=prepare_conversations.run)

    p = sub.add_parser("tokenizer", help="train a BPE tokenizer.json on the captions (.txt) of existing shards")
    p.add_argument("--shards", required=True, help="training shards (directory, glob or brace pattern)")
    p.add_argument("--out", required=True, help="where to write tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=1000, help="largest vocabulary (default: %(default)s)")
    p.add_argument("--min-frequency", type=int, default=2, help="least count of a merged pair (default: %(default)s)")
    p.add_argument("--caption-key", default="txt", help="caption member of a sample (default: %(default)s)")
    p.set_defaults(run=_run_tokenizer)

    p = sub.add_parser("preferences", help="a .jsonl of {image, prompt, chosen, rejected} rows: preference shards")
    add_common_arguments(p, None)
    prepare_preferences.add_arguments(p)
    p.set_defaults(run=prepare_preferences.run)
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

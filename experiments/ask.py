"""Answer a question about one image with a multimodal-LLM checkpoint.

    python -m experiments.ask --ckpt RUN/checkpoints/best.ckpt --image some.png "How many shapes are there?"

The model is rebuilt from the checkpoint alone (weights-only load, hyper-parameters inside it);
the tokenizer comes from the run's ``config.yaml`` next to the checkpoint's folder (``RUN/config.yaml``), or
from ``--config`` / ``--tokenizer``; the image preprocessing (size, mean, std) from the model's vision tower,
unless that config spelled it out.
The question becomes one user turn with the image in front, then the assistant marker, exactly as
the conversation pipeline builds an evaluation prompt; the answer is greedy, up to the end of turn.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml


class AskError(Exception):
    """A missing file or a checkpoint of another kind: ``main`` prints it in one line and exits with status 2."""


def run_config(ckpt: str, config: str | None) -> dict[str, Any]:
    """The run's resolved config (``RUN/config.yaml`` beside ``RUN/checkpoints/``), or ``{}`` when there is none."""
    path = Path(config) if config else Path(ckpt).resolve().parent.parent / "config.yaml"
    if config and not path.is_file():
        raise AskError(f"--config {config}: no such file")
    if not path.is_file():
        return {}
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    return cfg.get("fit", cfg) if isinstance(cfg, dict) else {}


def tokenizer_path(cfg: dict[str, Any], hparams_path: str | None, given: str | None) -> str:
    if given:
        return given
    section = cfg.get("tokenizer") or {}
    path = (section.get("init_args") or {}).get("path") if isinstance(section, dict) else None
    if path or hparams_path:
        return str(path or hparams_path)
    raise AskError("the checkpoint's run names no tokenizer: give --tokenizer DIR or hub id (e.g. "
                   "data/shards/shapes/chat_tokenizer)")


def tokenizer_options(cfg: dict[str, Any], path: str) -> dict[str, Any]:
    """The run config's tokenizer options (markers, ``chat_template_kwargs``) when ``path`` is its tokenizer."""
    section = cfg.get("tokenizer") or {}
    options = dict((section.get("init_args") or {}) if isinstance(section, dict) else {})
    if str(options.pop("path", None)) != str(path):
        return {}
    return {k: v for k, v in options.items() if v is not None}


def ask(ckpt: str, image: str, question: str, tokenizer: str | None = None, config: str | None = None,
        max_new_tokens: int | None = None) -> str:
    """The model's answer to ``question`` about the image file ``image``."""
    import torch

    from mm_lightning.checkpoint import load_checkpoint
    from mm_lightning.data.chat_tokenizer import ChatTokenizer
    from mm_lightning.data.conversations import encode_segments
    from mm_lightning.data.samples import decode_rgb, image_transforms
    from mm_lightning.tasks.vlm import VisionLanguageTask

    for path, flag in ((ckpt, "--ckpt"), (image, "--image")):
        if not os.path.isfile(path):
            raise AskError(f"{flag} {path}: no such file")
    if not question.strip():
        raise AskError("the question is empty")
    cfg = run_config(ckpt, config)
    hparams = load_checkpoint(ckpt, "--ckpt").get("hyper_parameters") or {}
    path = tokenizer_path(cfg, hparams.get("tokenizer_path"), tokenizer)
    tok = ChatTokenizer(path, **tokenizer_options(cfg, path))
    try:
        tok.end_of_turn_id  # noqa: B018 (loads it: a hub id not cached, a template without markers, ... named here)
    except ValueError as err:
        raise AskError(f"{'--tokenizer' if tokenizer else 'the run config tokenizer'} {path}: {err}") from None
    try:
        task = VisionLanguageTask.from_checkpoint(ckpt, tok).eval()
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        raise AskError(f"--ckpt {ckpt}: {err}") from None
    pipeline = ((cfg.get("data") or {}).get("pipeline") or {}).get("init_args") or {}
    tower = task.preprocessing  # the vision tower's own; the run's config wins where it spelled mean/std out
    size = int(pipeline.get("image_size") or tower["image_size"])
    transform = image_transforms(size, False, mean=pipeline.get("mean") or tower["mean"],
                                 std=pipeline.get("std") or tower["std"])
    try:
        with open(image, "rb") as f:
            pixels = transform(decode_rgb(f.read()))[None]
    except RuntimeError as err:
        raise AskError(f"--image {image}: cannot decode it ({err})") from None
    # parse_conversation's layout: <image> in front of the stripped question, no newline between them
    ids = encode_segments(tok, [("user", f"<image>{question.strip()}", False)], task.num_image_tokens).input_ids
    ids = torch.tensor([ids + tok.assistant_ids])
    return task.answer(pixels, ids, torch.ones_like(ids), max_new_tokens)[0]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m experiments.ask", description=__doc__.split("\n\n")[0])
    parser.add_argument("question", help="the question, e.g. 'How many shapes are there?'")
    parser.add_argument("--ckpt", required=True, help="a checkpoint of the multimodal LLM (RUN/checkpoints/best.ckpt)")
    parser.add_argument("--image", required=True, help="an image file (PNG, JPEG, WebP)")
    parser.add_argument("--tokenizer", default=None, help="the chat tokenizer (default: the run's)")
    parser.add_argument("--config", default=None, help="the run's config.yaml (default: RUN/config.yaml)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest answer (default: the model's)")
    args = parser.parse_args(argv)
    try:
        answer = ask(args.ckpt, args.image, args.question, args.tokenizer, args.config, args.max_new_tokens)
    except (AskError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(answer)
    sys.stdout.flush()
    return answer


if __name__ == "__main__":
    main()

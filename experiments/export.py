"""A trained model out of mm-lightning, in the format its ecosystem loads without us.

    python -m experiments.export --ckpt RUN/checkpoints/best.ckpt --to FORMAT --out DIR

Formats:

* ``siglip``: the image tower of a CLIP, SSL or classification checkpoint (a timm ViT without a class
  token) as a transformers ``SiglipVisionModel`` directory (``config.json``, ``model.safetensors``,
  ``preprocessor_config.json`` with the run's image size, mean and std), loadable by
  ``SiglipVisionModel.from_pretrained(DIR)`` / ``AutoImageProcessor.from_pretrained(DIR)`` or as a
  multimodal LLM's tower (``model.init_args.vision: DIR``).
* ``causal-lm``: the language model of a multimodal-LLM checkpoint (LoRA adapters merged) with its
  tokenizer and chat template: ``AutoModelForCausalLM.from_pretrained(DIR)`` /
  ``AutoTokenizer.from_pretrained(DIR)``, or ``model.init_args.lm: DIR`` and the tokenizer path of a
  later stage.

Weights are written as safetensors only. ``DIR`` must not exist or be empty: nothing already there is
overwritten; the export is written beside it and moved into place when complete. Errors are one
line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMATS = ("siglip", "causal-lm")


class ExportError(Exception):
    """A checkpoint that has no export to the asked format, or an output that would overwrite: one line, exit 2."""


def check_out(out: str) -> Path:
    """``out`` as a path that does not exist or is an empty directory (never overwrite an export)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty directory; nothing is overwritten")
    return path


def image_preprocessing(ckpt: str, tower: Any) -> dict[str, Any]:
    """Image size, mean and std the run trained with (its ``config.yaml``), else the tower's own config."""
    from experiments.ask import run_config

    pipeline = ((run_config(ckpt, None).get("data") or {}).get("pipeline") or {}).get("init_args") or {}
    cfg = getattr(tower, "pretrained_cfg", None) or {}
    size = pipeline.get("image_size") or int(tower.patch_embed.img_size[0])
    mean = pipeline.get("mean") or list(cfg.get("mean", (0.5, 0.5, 0.5)))
    std = pipeline.get("std") or list(cfg.get("std", (0.5, 0.5, 0.5)))
    return {"image_size": int(size), "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def export_siglip(ckpt: str, out: Path) -> None:
    from timm.models.vision_transformer import VisionTransformer
    from transformers import SiglipImageProcessor

    from mm_lightning.models import load_model
    from mm_lightning.models.convert import timm_vit_to_siglip

    try:
        model = load_model(ckpt)
    except (ValueError, TypeError) as err:
        raise ExportError(f"--ckpt {ckpt}: {err}") from None
    towers = [m for m in model.modules() if isinstance(m, VisionTransformer)]
    if len(towers) != 1:
        raise ExportError(f"--ckpt {ckpt}: --to siglip needs exactly one timm ViT image tower in the checkpoint's "
                          f"{type(model).__name__}, found {len(towers)}")
    tower = towers[0]
    siglip = timm_vit_to_siglip(tower)
    prep = image_preprocessing(ckpt, tower)
    siglip.save_pretrained(out, safe_serialization=True)
    SiglipImageProcessor(size={"height": prep["image_size"], "width": prep["image_size"]}, image_mean=prep["mean"],
                         image_std=prep["std"], do_resize=True, do_rescale=True, do_normalize=True).save_pretrained(out)


def export_causal_lm(ckpt: str, out: Path) -> None:
    from mm_lightning.checkpoint import load_checkpoint
    from mm_lightning.data.chat_tokenizer import ChatTokenizer
    from mm_lightning.tasks.vlm import VisionLanguageTask

    hparams = (load_checkpoint(ckpt, "--ckpt") or {}).get("hyper_parameters") or {}
    path = hparams.get("tokenizer_path")
    if not path:
        raise ExportError(f"--ckpt {ckpt}: --to causal-lm needs a multimodal-LLM checkpoint (it names no tokenizer)")
    tokenizer = ChatTokenizer(path)
    task = VisionLanguageTask.from_checkpoint(ckpt, tokenizer)
    lm = task.model.lm
    if hasattr(lm, "merge_and_unload"):  # LoRA adapters into the weights
        lm = lm.merge_and_unload()
    lm.save_pretrained(out, safe_serialization=True)
    tokenizer.hf.save_pretrained(out)


EXPORTS: dict[str, Callable[[str, Path], None]] = {"siglip": export_siglip, "causal-lm": export_causal_lm}


def export(ckpt: str, to: str, out: str) -> Path:
    """Write the export of ``ckpt`` in format ``to`` into ``out`` (see the module docstring); returns ``out``."""
    if to not in EXPORTS:
        raise ExportError(f"--to {to}: unknown format; known: {', '.join(EXPORTS)}")
    if not os.path.isfile(ckpt):
        raise ExportError(f"--ckpt {ckpt}: no such file")
    target = check_out(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        EXPORTS[to](ckpt, staging)
        if target.exists():
            target.rmdir()  # empty (checked above): replaced by the complete export
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint of this framework (RUN/checkpoints/best.ckpt)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    parser.add_argument("--out", required=True, help="the directory to create (must not exist or be empty)")
    args = parser.parse_args(argv)
    try:
        path = export(args.ckpt, args.to, args.out)
    except (ExportError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"Exported {args.ckpt} as {args.to} to {path}")
    return path


if __name__ == "__main__":
    main()

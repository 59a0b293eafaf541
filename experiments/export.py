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
* ``open_clip``: a CLIP checkpoint as open_clip 3.x's hub layout: ``open_clip_config.json`` (``model_cfg`` +
  ``preprocess_cfg``), ``open_clip_model.safetensors`` and the run's text tokenizer (``tokenizer.json``,
  ``tokenizer_config.json``; open_clip's ``HFTokenizer`` reads it: ``text_cfg.hf_tokenizer_name``)::

      model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")
      tokenizer = open_clip.get_tokenizer("local-dir:DIR")

  and ``clip_benchmark eval --model_type open_clip --model local-dir:DIR --pretrained none ...``. It is open_clip's
  ``CLIP`` class: the image tower is its ``TimmModel`` (``visual.trunk`` = our timm tower, ``visual.head.proj`` =
  our image projection), the text tower its ``TextTransformer`` (pre-norm blocks, causal mask, final LayerNorm,
  bias-free projection, our weights renamed); ``logit_scale`` and a SigLIP ``logit_bias`` carry over. Our ``eot``
  pooling (the last unmasked token) is written as open_clip's ``eos`` pooling (the first end-of-text id), refused
  for a tokenizer whose texts do not end with their first end-of-text token; ``first`` stays ``first``. The image
  preprocessing is the run's evaluation transform (``resize_mode: squash``, bilinear, its mean and std). The
  tokenizer comes from the run's ``config.yaml`` (``tokenizer.init_args.path``, relative to where you run this)
  or ``--tokenizer``.
  open_clip builds a timm tower as ``timm.create_model(timm_model_name)`` with no architecture arguments: a
  tower that is a timm model name alone is written as that name; any other (``vit_shapes``, or
  ``image_backbone_kwargs``) as ``timm_model_name: "local-dir:DIR/image_tower"``, where timm's own
  ``config.json`` (a timm architecture + ``model_args``) builds it. That entry is DIR's absolute path: after
  moving DIR, export again or edit it (and ``hf_tokenizer_name``) in ``open_clip_config.json``; to publish DIR
  on the hub, push ``image_tower/`` as a timm repository and name it ``hf-hub:ORG/NAME`` there.
  Not representable, refused naming the option: ``model.text_causal: false`` (open_clip's CLIP text tower
  without the causal mask attends to the pads: its pad mask cannot be switched on from a model config),
  ``model.text_pooling: mean``, ``model.text_model`` (a Hugging Face text tower: open_clip's ``HFTextEncoder``
  masks by pad id, has no final norm and builds the encoder from a hub id; not exported), and a timm model
  registered outside timm (timm cannot build it without that code; ``vit_shapes`` is written as
  ``vit_tiny_patch16_224`` with every setting spelled out).
* ``timm``: a classification checkpoint's timm model as ``model.safetensors`` + timm's ``config.json``
  (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg`` with the run's ``input_size``, mean, std
  and resize; ``label_names`` from the training shards' ``manifest.json``), as ``timm.models.save_for_hf`` /
  ``push_to_hf_hub`` write it::

      model = timm.create_model("local-dir:DIR", pretrained=True)
      # or by name (the config's architecture and model_args; num_classes in the overlay too, or timm drops
      # the head as it does for a published checkpoint of another class count):
      model = timm.create_model(ARCH, pretrained=True, num_classes=N, **MODEL_ARGS,
                                pretrained_cfg_overlay=dict(file="DIR/model.safetensors", num_classes=N))

  The weights are the ones the run evaluated (``ImageClassifier._eval_model``): the EMA copy when the run kept
  one (``model.ema_decay``), else the trained weights. ``vit_shapes`` is written as ``vit_tiny_patch16_224`` with
  its settings in ``model_args`` (the same network, timm builds it without us); the architecture's published
  provenance (license, tag) is not copied into ``pretrained_cfg``.
* ``llava``: a multimodal LLM with a transformers SigLIP / CLIP tower, the ``mlp`` connector (LLaVA's
  Linear-GELU-Linear) and a transformers LM (LoRA merged) as a transformers LLaVA directory:
  ``LlavaForConditionalGeneration.from_pretrained(DIR)`` / ``AutoProcessor.from_pretrained(DIR)`` (a
  ``LlavaProcessor``), a README.md model card (the run's summary.json and config.yaml when beside the
  checkpoint's folder), or ``model.init_args.init: DIR`` of a later stage. What LLaVA cannot represent
  is refused naming the option (:mod:`mm_lightning.models.llava`).
* ``mm-lightning``: any multimodal LLM (``qformer``, ``resampler``, ``xattn`` connectors, pixel shuffle, timm
  towers by name; LoRA merged) in this framework's own layout (config.json + model.safetensors + the
  tokenizer, :mod:`mm_lightning.models.vlm_pretrained`): ``VisionLanguageModel.from_pretrained(DIR)``.

Weights are written as safetensors only. ``DIR`` must not exist or be empty: nothing already there is
overwritten; the export is written beside it and moved into place when complete. Errors are one
line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMATS = ("siglip", "causal-lm", "open_clip", "timm", "llava", "mm-lightning")
IMAGE_TOWER_DIR = "image_tower"  # open_clip exports: timm's config.json of an image tower timm cannot build by name


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
    size = pipeline.get("image_size") or (int(tower.patch_embed.img_size[0]) if hasattr(tower, "patch_embed")
                                          else int(cfg.get("input_size", (3, 224, 224))[-1]))
    mean = pipeline.get("mean") or list(cfg.get("mean", (0.5, 0.5, 0.5)))
    std = pipeline.get("std") or list(cfg.get("std", (0.5, 0.5, 0.5)))
    return {"image_size": int(size), "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def export_siglip(ckpt: str, out: Path, **_: Any) -> None:
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


def export_causal_lm(ckpt: str, out: Path, **_: Any) -> None:
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


def _checked_spec(ckpt: str, wanted: str, to: str, hint: str = "") -> dict[str, Any]:
    """The checkpoint (weights-only) when its ``model_spec`` names class ``wanted``; else a one-line ExportError."""
    from mm_lightning.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt, "--ckpt") or {}
    spec = loaded.get("model_spec")
    kind = spec.get("class") if isinstance(spec, dict) else None
    if kind != wanted:
        holds = f"a {kind} model" if kind else "no model_spec (a multimodal-LLM checkpoint or not one of ours)"
        raise ExportError(f"--ckpt {ckpt}: --to {to} needs {'a CLIP' if wanted == 'CLIP' else 'a classification'} "
                          f"checkpoint ({'CLIP' if wanted == 'CLIP' else 'a timm model'}); this one holds {holds}"
                          + (hint if kind == "CLIP" else ""))
    return loaded


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def run_tokenizer(ckpt: str, given: str | None, context_length: int) -> Any:
    """The text tokenizer the CLIP run trained with: ``--tokenizer``, else its ``config.yaml``'s ``tokenizer:``."""
    from experiments.ask import run_config
    from mm_lightning.data.tokenizer import TextTokenizer

    path, what = given, "--tokenizer"
    if not path:
        section = run_config(ckpt, None).get("tokenizer") or {}
        path = ((section.get("init_args") or {}) if isinstance(section, dict) else {}).get("path")
        what = "the run's tokenizer (config.yaml, tokenizer.init_args.path)"
    if not path:
        raise ExportError(f"--ckpt {ckpt}: --to open_clip needs the run's text tokenizer and no config.yaml beside "
                          "the checkpoint names one: give --tokenizer (a tokenizer.json or tokenizer directory)")
    tokenizer = TextTokenizer(path, context_length=context_length)
    try:
        tokenizer.hf
    except (OSError, ValueError) as err:
        raise ExportError(f"{what} {path}: {err}") from None
    return tokenizer


def export_open_clip(ckpt: str, out: Path, final: Path, tokenizer: str | None = None, **_: Any) -> None:
    from safetensors.torch import save_file

    from mm_lightning.models import load_model
    from mm_lightning.models.clip import CLIP
    from mm_lightning.models.convert import (ConversionError, check_open_clip_text, clip_to_open_clip,
                                             timm_config)

    _checked_spec(ckpt, "CLIP", "open_clip")
    model = load_model(ckpt)
    assert isinstance(model, CLIP)
    try:
        check_open_clip_text(model.text_encoder)
    except ConversionError as err:
        raise ExportError(f"--ckpt {ckpt}: --to open_clip: {err}") from None
    tok = run_tokenizer(ckpt, tokenizer, int(model.text_encoder.context_length))
    eos = tok.eos_token_id
    if getattr(model.text_encoder, "pooling", None) == "eot":
        # our eot pooling (the last unmasked token) is open_clip's eos pooling (the first eos) iff every text ends
        # with its first eos (pads after it may be eos too: OpenAI's CLIP tokenizer pads with <|endoftext|>)
        enc = tok(["a photo of a red circle", "a"])
        for ids, mask in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist()):
            if eos is None or eos not in ids or ids.index(eos) != sum(mask) - 1:
                raise ExportError(f"tokenizer {tok.path}: its texts do not end with their first end-of-text token, "
                                  "so model.text_pooling: eot (the last token) has no open_clip equivalent")
    prep = image_preprocessing(ckpt, model.image_encoder)
    try:
        model_cfg, state, tower = clip_to_open_clip(model, eos, prep["image_size"], str(final / IMAGE_TOWER_DIR))
    except ConversionError as err:
        raise ExportError(f"--ckpt {ckpt}: --to open_clip: {err}") from None
    model_cfg["text_cfg"]["hf_tokenizer_name"] = str(final)
    if tower is not None:
        (out / IMAGE_TOWER_DIR).mkdir()
        _write_json(out / IMAGE_TOWER_DIR / "config.json", timm_config(tower, _timm_data_config(prep)))
    save_file(state, str(out / "open_clip_model.safetensors"))
    preprocess = {"mean": prep["mean"], "std": prep["std"], "interpolation": "bilinear", "resize_mode": "squash"}
    _write_json(out / "open_clip_config.json", {"model_cfg": model_cfg, "preprocess_cfg": preprocess})
    tok.hf.save_pretrained(out)


def _timm_data_config(prep: dict[str, Any]) -> dict[str, Any]:
    """timm's data config of our evaluation transform: resize (squash, bilinear) to the size, then normalise."""
    size = prep["image_size"]
    return {"input_size": (3, size, size), "mean": tuple(prep["mean"]), "std": tuple(prep["std"]),
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}


def _class_names(ckpt: str, num_classes: int) -> list[str] | None:
    """The class names of the run's training shards (their ``manifest.json``), if there are ``num_classes``."""
    import glob

    from experiments.ask import run_config
    from mm_lightning.data.shards import read_manifest

    train = (run_config(ckpt, None).get("data") or {}).get("train")
    shards = sorted(glob.glob(train)) if isinstance(train, str) else []
    names = read_manifest(shards[:1]).get("classes") if shards else None
    return list(names) if names and len(names) == num_classes else None


def export_timm(ckpt: str, out: Path, **_: Any) -> None:
    from timm.models import save_for_hf

    from mm_lightning.models import load_model
    from mm_lightning.models.convert import ConversionError, portable_timm_model, timm_config

    ckpt_dict = _checked_spec(ckpt, "timm", "timm", " (its image tower: --to open_clip or --to siglip)")
    spec = dict(ckpt_dict["model_spec"]["config"])
    ema = any(k.startswith("ema.module.") for k in ckpt_dict.get("state_dict", {}))
    model = load_model(ckpt, prefix="ema.module." if ema else "model.")  # the weights the run evaluated
    name, num_classes = spec.pop("name"), int(spec.pop("num_classes"))
    spec.pop("pretrained", None)
    try:
        portable = portable_timm_model(model, name, {"num_classes": num_classes, **spec})
    except ConversionError as err:
        raise ExportError(f"--ckpt {ckpt}: --to timm: {err}") from None
    prep = image_preprocessing(ckpt, model)
    save_for_hf(portable, out, safe_serialization=True)  # timm's own writer: model.safetensors + config.json
    _write_json(out / "config.json", timm_config(portable, _timm_data_config(prep), _class_names(ckpt, num_classes)))


def export_llava(ckpt: str, out: Path, **_: Any) -> None:
    """A multimodal LLM (transformers SigLIP / CLIP tower, mlp connector, transformers LM; LoRA merged) as a
    transformers LLaVA directory with its LlavaProcessor and a model card (:mod:`mm_lightning.models.llava`)."""
    from experiments.ask import run_config, tokenizer_options
    from mm_lightning.checkpoint import load_checkpoint
    from mm_lightning.data.chat_tokenizer import ChatTokenizer
    from mm_lightning.models.convert import ConversionError
    from mm_lightning.models.llava import model_card, save_llava
    from mm_lightning.tasks.vlm import VisionLanguageTask

    hparams = (load_checkpoint(ckpt, "--ckpt") or {}).get("hyper_parameters") or {}
    path = hparams.get("tokenizer_path")
    if not path:
        raise ExportError(f"--ckpt {ckpt}: --to llava needs a multimodal-LLM checkpoint (it names no tokenizer)")
    cfg = run_config(ckpt, None)
    tokenizer = ChatTokenizer(path, **tokenizer_options(cfg, path))
    task = VisionLanguageTask.from_checkpoint(ckpt, tokenizer)
    task.merge_lora()
    pipeline = ((cfg.get("data") or {}).get("pipeline") or {}).get("init_args") or {}
    prep = {k: pipeline[k] for k in ("image_size", "mean", "std") if pipeline.get(k)}
    try:
        config = save_llava(task.model, tokenizer.hf, out, prep)
    except ConversionError as err:
        raise ExportError(f"--ckpt {ckpt}: --to llava: {err}") from None
    run = Path(ckpt).resolve().parent.parent
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
    has_config = (run / "config.yaml").is_file()
    command = f"python -m experiments.run fit --config {run / 'config.yaml'}" if has_config else None
    what = f"A multimodal LLM trained with mm-lightning ({type(task).__name__}, stage {task.stage}, {ckpt})"
    (out / "README.md").write_text(model_card(config, what, summary, command,
                                              (run / "config.yaml").read_text() if has_config else None))


def export_mm_lightning(ckpt: str, out: Path, **_: Any) -> None:
    """A multimodal LLM (any connector and tower; LoRA merged) in this framework's own layout
    (:mod:`mm_lightning.models.vlm_pretrained`), read back by ``VisionLanguageModel.from_pretrained(DIR)``."""
    from experiments.ask import run_config, tokenizer_options
    from mm_lightning.checkpoint import load_checkpoint
    from mm_lightning.data.chat_tokenizer import ChatTokenizer
    from mm_lightning.models.convert import ConversionError
    from mm_lightning.models.vlm_pretrained import save_vlm
    from mm_lightning.tasks.vlm import VisionLanguageTask

    hparams = (load_checkpoint(ckpt, "--ckpt") or {}).get("hyper_parameters") or {}
    path = hparams.get("tokenizer_path")
    if not path:
        raise ExportError(f"--ckpt {ckpt}: --to mm-lightning needs a multimodal-LLM checkpoint (it names no tokenizer)")
    tokenizer = ChatTokenizer(path, **tokenizer_options(run_config(ckpt, None), path))
    task = VisionLanguageTask.from_checkpoint(ckpt, tokenizer)
    task.merge_lora()
    try:
        save_vlm(task.model, out, task.hparams["connector"], task.hparams.get("connector_kwargs"),
                 task.hparams.get("vision_kwargs"), tokenizer.hf, dict(hparams))
    except ConversionError as err:
        raise ExportError(f"--ckpt {ckpt}: --to mm-lightning: {err}") from None


EXPORTS: dict[str, Callable[..., None]] = {"siglip": export_siglip, "causal-lm": export_causal_lm,
                                           "open_clip": export_open_clip, "timm": export_timm, "llava": export_llava,
                                           "mm-lightning": export_mm_lightning}


def export(ckpt: str, to: str, out: str, tokenizer: str | None = None) -> Path:
    """Write the export of ``ckpt`` in format ``to`` into ``out`` (see the module docstring); returns ``out``.
    ``tokenizer``: the text tokenizer of an ``open_clip`` export when the run's ``config.yaml`` does not name it."""
    if to not in EXPORTS:
        raise ExportError(f"--to {to}: unknown format; known: {', '.join(EXPORTS)}")
    if tokenizer and to != "open_clip":
        raise ExportError(f"--tokenizer applies to --to open_clip only, not --to {to}")
    if not os.path.isfile(ckpt):
        raise ExportError(f"--ckpt {ckpt}: no such file")
    target = check_out(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        EXPORTS[to](ckpt, staging, final=target.resolve(), tokenizer=tokenizer)
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
    parser.add_argument("--tokenizer", default=None,
                        help="open_clip: the run's text tokenizer (tokenizer.json or directory) when its config.yaml "
                             "beside the checkpoint does not name it")
    args = parser.parse_args(argv)
    try:
        path = export(args.ckpt, args.to, args.out, args.tokenizer)
    except (ExportError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"Exported {args.ckpt} as {args.to} to {path}")
    return path


if __name__ == "__main__":
    main()

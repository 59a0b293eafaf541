"""Shared pieces of the multimodal-LLM tests: a chat tokenizer trained on shapes texts, tiny tasks, shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mm_lightning.data import synthetic
from mm_lightning.data.chat_tokenizer import CHAT_TOKENIZER_DIR, ChatTokenizer, json_texts, train_chat_tokenizer

TINY_VISION = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0,
               "global_pool": "avg", "class_token": False}
TINY_LM = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "tie_word_embeddings": True}
TINY_CONNECTORS: dict[str, dict[str, Any]] = {
    "mlp": {},
    "qformer": {"num_queries": 4, "dim": 32, "depth": 2, "heads": 2, "cross_every": 2},
    "resampler": {"num_latents": 4, "dim": 32, "depth": 1, "heads": 2},
    "xattn": {"num_latents": 4, "dim": 32, "depth": 1, "heads": 2, "every": 1},
}


def shapes_texts(n: int = 200) -> list[str]:
    """Captions, questions and answers of the first ``n`` shapes training samples."""
    texts: list[str] = []
    for i in range(n):
        sample = synthetic.make_sample(i, seed=synthetic.split_seed(0, "train"))
        texts.append(sample["txt"])
        texts.extend(json_texts(sample["json"]))
    return texts


def shapes_tokenizer(directory: Path) -> ChatTokenizer:
    return ChatTokenizer(train_chat_tokenizer(shapes_texts(), directory / CHAT_TOKENIZER_DIR))


def tiny_task(tokenizer: ChatTokenizer, connector: str = "mlp", stage: str = "instruct", **kwargs: Any):
    """A VisionLanguageTask small enough for a unit test (16 visual tokens of width 32, a 2-layer Llama)."""
    from mm_lightning.tasks.vlm import VisionLanguageTask

    torch.manual_seed(0)
    options = {"vision_kwargs": TINY_VISION, "lm": TINY_LM, "connector_kwargs": TINY_CONNECTORS[connector]}
    options.update(kwargs)
    return VisionLanguageTask(tokenizer, stage=stage, connector=connector, **options)


def write_shapes(directory: Path, train: int, val: int, test: int, samples_per_shard: int | None = None) -> dict[str, str]:
    """Shapes shards (and their tokenizers) in ``directory``; returns the glob of each split."""
    from data.prepare import prepare_shapes

    prepare_shapes(directory, train=train, val=val, test=test, samples_per_shard=samples_per_shard, progress=False)
    return {s: str(directory / f"shapes-{s}-*.tar") for s in ("train", "val", "test")}


# ------------------------------------------------------------------------- pretrained vision towers
#: a tiny width of the real transformers vision architectures (3 layers: hidden_states -1, -2, -3 all differ)
TINY_HF_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                  "image_size": 32, "patch_size": 8}
#: the kinds :func:`save_vision_model` writes: a vision model, or a full CLIP / SigLIP (image and text towers)
VISION_KINDS = ("siglip", "clip", "dinov2", "dinov2_registers", "clip_full", "siglip_full")


def save_vision_model(kind: str, directory: Path, seed: int = 0, processor: bool = True, **overrides: Any) -> Path:
    """A tiny transformers vision model of a real architecture, saved as a hub download holds it: ``config.json``,
    ``model.safetensors`` and (``processor``) ``preprocessor_config.json`` of the image processor the published
    checkpoints use (SigLIP: 0.5 / 0.5 at 32 px; CLIP: OpenAI's mean/std, crop 32; DINOv2: ImageNet's, resize 40 and
    crop 32 while its config says 48, as dinov2-base's processor crops 224 of a 518 config).

    ``overrides`` change the vision config (e.g. ``hidden_size``). Returns ``directory``.
    """
    import transformers as tf

    torch.manual_seed(seed)
    vision = {**TINY_HF_VISION, **overrides}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    if kind == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**vision))
    elif kind == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**vision))
    elif kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**{**vision, "image_size": overrides.get("image_size", 48)}))
    elif kind == "dinov2_registers":
        model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
            **{**vision, "image_size": overrides.get("image_size", 48), "num_register_tokens": 2}))
    elif kind == "clip_full":
        model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    elif kind == "siglip_full":
        model = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vision))
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(VISION_KINDS)}")
    model.eval().save_pretrained(directory, safe_serialization=True)
    if processor:
        side = int(vision["image_size"])
        if kind.startswith("siglip"):
            proc = tf.SiglipImageProcessor(size={"height": side, "width": side})
        elif kind.startswith("clip"):
            proc = tf.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        else:
            proc = tf.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        proc.save_pretrained(directory)
    return directory


def put_in_hub_cache(cache: Path, repo_id: str, directory: Path, revision: str = "0" * 40) -> Path:
    """``directory``'s files laid out as ``huggingface_hub`` caches a download of ``repo_id`` (``refs/main`` ->
    ``snapshots/<revision>/``), so ``from_pretrained(repo_id)`` / timm's ``pretrained=True`` find them offline."""
    import shutil

    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for item in Path(directory).iterdir():
        shutil.copy(item, snapshot / item.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snapshot

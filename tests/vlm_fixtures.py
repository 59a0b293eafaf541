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

"""Shared pieces of the alignment tests: a colour-question preference world whose pairs need the image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from mm_lightning.data.chat_tokenizer import CHAT_TOKENIZER_DIR, ChatTokenizer, train_chat_tokenizer
from mm_lightning.data.datamodule import WebDataModule
from mm_lightning.data.preferences import PreferencePipeline
from mm_lightning.data.shards import write_shards
from tests.conftest import colour_image, png_bytes
from tests.vlm_fixtures import TINY_LM, TINY_VISION

COLOURS = ("red", "green", "blue", "yellow")  # tests.conftest.colour_image's labels
QUESTION = "What colour is the shape?"


def colour_tokenizer(directory: Path) -> ChatTokenizer:
    texts = [QUESTION] + [f"It is {c}." for c in COLOURS] * 4 + ["a red square", "It is"] * 4
    return ChatTokenizer(train_chat_tokenizer(texts, directory / CHAT_TOKENIZER_DIR, vocab_size=300))


def write_colour_pairs(directory: Path, prefix: str, n: int, seed: int) -> str:
    """``n`` colour-square images with a pair each: the true colour chosen, another colour rejected. Which
    answer is right depends on the image only: a text-only preference is right half the time."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        label = int(rng.integers(4))
        other = (label + int(rng.integers(1, 4))) % 4
        pair = {"prompt": f"<image>\n{QUESTION}", "chosen": f"It is {COLOURS[label]}.",
                "rejected": f"It is {COLOURS[other]}.", "type": "colour"}
        samples.append({"__key__": f"{prefix}{i:05d}", "png": png_bytes(colour_image(label, rng, 32)),
                        "json": json.dumps(pair).encode()})
    write_shards(samples, directory, prefix, max_count=max(1, n // 2))
    return str(directory / f"{prefix}-*.tar")


def colour_data(tok: ChatTokenizer, directory: Path, num_image_tokens: int, train: int = 256, val: int = 128,
                batch_size: int = 32) -> WebDataModule:
    specs = {split: write_colour_pairs(directory, f"colours-{split}", n, seed)
             for split, n, seed in (("train", train, 1), ("val", val, 2), ("test", val, 3))}
    pipe = PreferencePipeline(tok, num_image_tokens=num_image_tokens, max_length=64, image_size=32)
    return WebDataModule(train=specs["train"], val=specs["val"], test=specs["test"], pipeline=pipe,
                         batch_size=batch_size, num_workers=0, strict=True)


def tiny(cls: type, tokenizer: ChatTokenizer, **kwargs: Any) -> Any:
    """An alignment / reward task on the tiny VLM of the MLLM tests (mlp connector, 16 image tokens)."""
    torch.manual_seed(0)
    options: dict[str, Any] = {"vision_kwargs": TINY_VISION, "lm": TINY_LM, "connector": "mlp", "max_new_tokens": 6}
    options.update(kwargs)
    return cls(tokenizer, **options)


def trainer(root: Path, steps: int, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {"max_steps": steps, "logger": False, "enable_checkpointing": False,
                               "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                               "default_root_dir": str(root), "accelerator": "cpu", "devices": 1}
    options.update(kwargs)
    return L.Trainer(**options)


def first_batch(data: WebDataModule, split: str = "val") -> dict[str, Any]:
    data.setup("fit" if split in ("train", "val") else "test")
    loader = {"train": data.train_dataloader, "val": data.val_dataloader, "test": data.test_dataloader}[split]()
    batch = next(iter(loader))
    batch.pop("skipped", None)
    return batch

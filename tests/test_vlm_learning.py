"""A short training run of the multimodal LLM learns: held-out exact match far above chance, per connector."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest

from mm_lightning.callbacks.vqa import VQAEvaluation
from mm_lightning.data.chat_tokenizer import CHAT_TOKENIZER_DIR, ChatTokenizer, train_chat_tokenizer
from mm_lightning.data.conversations import ConversationPipeline
from mm_lightning.data.datamodule import WebDataModule
from mm_lightning.data.shards import write_shards
from tests.conftest import COLOURS, colour_image, png_bytes
from tests.vlm_fixtures import tiny_task

NAMES = ["red", "green", "blue", "yellow"]
QUESTIONS = ["What colour is the square?", "Which colour does the square have?"]


def write_colour_conversations(directory: Path, prefix: str, n: int, seed: int) -> str:
    """LLaVA-format shards: a noisy image with one coloured square, asked its colour (4 answers: chance 0.25).

    The answer is the bare colour word: with a template around it ("It is red.") a from-scratch LM first spends
    a few hundred steps on the template before the image matters at all."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        label = int(rng.integers(len(COLOURS)))
        conversation = [{"from": "human", "value": f"<image>\n{QUESTIONS[i % 2]}", "type": "colour"},
                        {"from": "gpt", "value": NAMES[label]}]
        samples.append({"__key__": f"{prefix}{i:05d}", "png": png_bytes(colour_image(label, rng, 32)),
                        "json": json.dumps({"conversations": conversation})})
    write_shards(samples, directory, prefix, max_count=max(1, n // 4))
    return str(directory / f"{prefix}-*.tar")


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChatTokenizer, dict[str, str]]:
    d = tmp_path_factory.mktemp("colour_vqa")
    texts = QUESTIONS + NAMES
    tok = ChatTokenizer(train_chat_tokenizer(texts * 20, d / CHAT_TOKENIZER_DIR))
    return tok, {"train": write_colour_conversations(d, "train", 512, 1),
                 "test": write_colour_conversations(d, "test", 96, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "qformer", "xattn"])
def test_a_short_run_answers_held_out_questions_far_above_chance(colour_data, tmp_path, kind: str) -> None:
    tok, shards = colour_data
    L.seed_everything(0)
    task = tiny_task(tok, kind, "instruct", train_vision=True, lr=3e-3, warmup_steps=10, max_new_tokens=5)
    pipeline = ConversationPipeline(tok, num_image_tokens=task.num_image_tokens, max_length=64, image_size=32,
                                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    data = WebDataModule(train=shards["train"], test=shards["test"], pipeline=pipeline, batch_size=32,
                         eval_batch_size=48, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[VQAEvaluation()],
                        default_root_dir=tmp_path)
    untrained = trainer.test(task, datamodule=data, verbose=False)[0]["test/vqa_exact_match"]
    trainer.fit(task, datamodule=data)
    learned = trainer.test(task, datamodule=data, verbose=False)[0]
    assert learned["test/vqa_questions"] == 96
    assert untrained < 0.3  # a fresh model answers at most by luck (chance 0.25 once it says a colour)
    assert learned["test/vqa_exact_match"] >= 0.7, learned  # chance 0.25; 0.77-0.99 measured after 96 steps

"""``python -m data.prepare shapes``: the procedural shapes world (:mod:`mm_lightning.data.synthetic`),
every task's default data set, with its CLIP and chat tokenizers.
"""

from __future__ import annotations

import os
from typing import Any

from data.common import SPLITS, begin_dataset, check_minimum, finish_dataset, write_split
from mm_lightning.data import synthetic
from mm_lightning.data.chat_tokenizer import CHAT_TOKENIZER_DIR, CHATML_TOKENIZER_DIR, train_chat_tokenizer_from_shards
from mm_lightning.data.tokenizer import TOKENIZER_FILE, train_tokenizer_from_shards


def prepare_shapes(out_dir: str | os.PathLike = "data/shards/shapes", train: int = 10000, val: int = 1000,
                   test: int = 2000, image_size: int = 32, seed: int = 0, samples_per_shard: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Generate the shapes world's train/val/test shards; returns the manifest.

    Each split draws from its own stream (:func:`synthetic.split_seed`), so no scene repeats
    across splits and growing one split leaves the others unchanged.
    """
    for value, flag in ((train, "--train"), (val, "--val"), (test, "--test")):
        check_minimum(value, flag, 0)
    check_minimum(image_size, "--image-size", 16)
    if samples_per_shard is not None:
        check_minimum(samples_per_shard, "--samples-per-shard", 1)
    out = begin_dataset(out_dir)
    splits = {
        split: write_split(out, "shapes", split, synthetic.shapes_samples(n, synthetic.split_seed(seed, split),
                                                                           image_size), n, samples_per_shard, progress)
        for split, n in zip(SPLITS, (train, val, test))
    }
    if splits["train"] is not None:  # CLIP's tokenizer: a byte-level BPE of the training captions
        train_tokenizer_from_shards(sorted(out.glob("shapes-train-[0-9]*.tar")), out / TOKENIZER_FILE)
        # The multimodal LLM's: case-keeping BPE of captions, questions, answers and preference texts
        train_chat_tokenizer_from_shards(sorted(out.glob("shapes-train-[0-9]*.tar")), out / CHAT_TOKENIZER_DIR)
        # the same texts in Qwen2's ChatML layout, for LMs of that family (mllm_siglip_qwen2_shapes.yaml)
        train_chat_tokenizer_from_shards(sorted(out.glob("shapes-train-[0-9]*.tar")), out / CHATML_TOKENIZER_DIR,
                                         layout="chatml")
    return finish_dataset(out, splits, name="shapes", classes=list(synthetic.CLASS_NAMES), image_size=image_size,
                   seed=seed, members=["png", "cls", "txt", "json"], generator="mm_lightning.data.synthetic",
                   generator_version=synthetic.VERSION,
                   chat_tokenizer=CHAT_TOKENIZER_DIR if splits["train"] is not None else None)

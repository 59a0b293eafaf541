"""``python -m data.prepare digits``: scikit-learn's handwritten digits (nothing is downloaded).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from data.common import SPLITS, begin_dataset, check_minimum, finish_dataset, png_bytes, stratified_split, write_split


def prepare_digits(out_dir: str | os.PathLike = "data/shards/digits", image_size: int = 32, seed: int = 0,
                   val_fraction: float = 0.1, test_fraction: float = 0.1, samples_per_shard: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Write scikit-learn's 1,797 8x8 handwritten digits as RGB PNG shards; returns the manifest.

    Pixel values 0-16 are scaled to 0-255 and upscaled (bilinear) to ``image_size``; the split
    is stratified by digit (with the defaults: 1,437 train, 180 val, 180 test).
    """
    from sklearn.datasets import load_digits

    check_minimum(image_size, "--image-size", 8)
    if samples_per_shard is not None:
        check_minimum(samples_per_shard, "--samples-per-shard", 1)
    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255 / 16)), 0, 255).astype(np.uint8)
    labels = [int(t) for t in digits.target]
    parts = stratified_split(labels, val_fraction, test_fraction, seed)

    def samples(indices: list[int]) -> Iterator[dict[str, Any]]:
        for i in indices:
            image = Image.fromarray(pixels[i], "L").resize((image_size, image_size), Image.Resampling.BILINEAR)
            yield {"__key__": f"{i:08d}", "png": png_bytes(image.convert("RGB")), "cls": labels[i]}

    out = begin_dataset(out_dir)
    splits = {split: write_split(out, "digits", split, samples(parts[split]), len(parts[split]),
                                  samples_per_shard, progress) for split in SPLITS}
    return finish_dataset(out, splits, name="digits", classes=[str(d) for d in range(10)], image_size=image_size,
                   seed=seed, members=["png", "cls"], source="sklearn.datasets.load_digits")

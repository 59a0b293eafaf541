"""Shared test fixtures: tiny shards written into tmp_path with the project's own code."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm_lightning.data.shards import write_manifest, write_shards

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


COLOURS = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40]], dtype=np.uint8)


def colour_image(label: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A noisy image with a square of colour ``label`` (red, green, blue, yellow) at a random place."""
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    side = size // 2
    y, x = rng.integers(0, size - side + 1, 2)
    img[y : y + side, x : x + side] = COLOURS[label]
    return img


def write_colour_shards(directory: Path, prefix: str, n: int, per_shard: int, seed: int = 0, size: int = 16) -> list[str]:
    """Write ``n`` 4-class coloured-square samples (``.png`` + ``.cls``) as shards; return their paths."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        label = int(rng.integers(0, 4))
        samples.append({"__key__": f"{prefix}{i:06d}", "png": png_bytes(colour_image(label, rng, size)), "cls": label})
    counts = write_shards(samples, directory, prefix, max_count=per_shard)
    write_manifest(directory, name="colours", classes=["red", "green", "blue", "yellow"])
    return [str(directory / k) for k in sorted(counts)]


@pytest.fixture
def colour_shards(tmp_path: Path) -> dict[str, str]:
    """Train/val/test colour shards in tmp_path; returns glob specs per split."""
    d = tmp_path / "colours"
    write_colour_shards(d, "c-train", 256, 64, seed=1)
    write_colour_shards(d, "c-val", 64, 32, seed=2)
    write_colour_shards(d, "c-test", 64, 32, seed=3)
    return {s: str(d / f"c-{s}-*.tar") for s in ("train", "val", "test")}

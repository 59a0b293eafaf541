"""``python -m data.prepare tokenizer --shards SPEC --out FILE``: a BPE ``tokenizer.json`` trained on the
captions of existing shards (yours, img2dataset's).
"""

from __future__ import annotations

import os
from typing import Any

from mm_lightning.data.tokenizer import train_tokenizer_from_shards


def prepare_tokenizer(shards: str, out: str | os.PathLike, vocab_size: int = 1000, min_frequency: int = 2,
                      caption_key: str = "txt") -> dict[str, Any]:
    """Train a byte-level BPE ``tokenizer.json`` on the ``.{caption_key}`` members of existing shards.

    ``shards`` is a shard specification (directory, glob or brace pattern, as ``data.train`` takes
    it). Returns ``{"tokenizer": path, "vocab_size": n}``.
    """
    from mm_lightning.data.shards import ShardSpecError, list_shards
    from mm_lightning.data.tokenizer import TextTokenizer

    try:
        found = list_shards(shards)
    except ShardSpecError as err:
        raise ValueError(f"--shards {shards}: {err}") from None
    path = train_tokenizer_from_shards(found, out, vocab_size, min_frequency, caption_key)
    return {"tokenizer": str(path), "vocab_size": TextTokenizer(path).vocab_size}

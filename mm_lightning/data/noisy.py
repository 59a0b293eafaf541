"""Deliberately noisy instruction data: the starting point of the alignment demonstrations.

:class:`NoisyConversationPipeline` is the shapes world's :class:`~mm_lightning.data.conversations.ConversationPipeline`
with a documented fraction of the training answers replaced by plausible wrong ones: for the question
types in ``noise_types``, each answer is replaced with probability ``noise_rate`` by the answer with
the asked attribute swapped for its fixed look-alike (:data:`mm_lightning.data.synthetic.CONFUSIONS`:
red -> purple, small -> large, ...). Validation and test answers stay correct.

Why a *systematic* confusion at a rate above one half: noise spread evenly over many wrong values
leaves the correct answer the most frequent one for every image, so a model trained by maximum
likelihood still answers it greedily and exact match does not drop. A fixed wrong value per true
value at rate ``p > 1/2`` makes the wrong answer the most frequent one: the SFT model learns
``P(wrong) ~ p`` and answers wrongly under greedy decoding, on exactly those question types. That is
an error preference pairs can correct (``confusion_preference``: chosen the correct answer, rejected
its confusion), and a reward model or an exact-match rule can score.

Which answers are replaced is a pure function of ``(noise_seed, sample key, turn)`` (the same
answers every epoch and in every worker), so the noisy data set is fixed, like one written to disk.
"""

from __future__ import annotations

import zlib
from typing import Any

from mm_lightning.data.chat_tokenizer import ChatTokenizer
from mm_lightning.data.conversations import ConversationError, ConversationPipeline, metadata
from mm_lightning.data.synthetic import QUESTION_TYPES, confused_answer


def replaced(noise_seed: int, key: str, turn: int, rate: float) -> bool:
    """Whether answer ``turn`` of sample ``key`` is replaced: a uniform draw from a hash, below ``rate``."""
    draw = zlib.crc32(f"{noise_seed}:{key}:{turn}".encode()) / 2**32
    return draw < rate


def corrupt_conversation(turns: list[dict[str, Any]], scene: Any, key: str, noise_types: set[str], rate: float,
                         noise_seed: int) -> tuple[list[dict[str, Any]], int]:
    """A copy of a shapes conversation with the chosen answers confused (see the module docstring), and how many were."""
    if not isinstance(scene, dict):
        raise ConversationError("noisy answers need the shapes world's .json 'scene' (the attributes to confuse)")
    if not isinstance(turns, list):
        raise ConversationError(f"conversations must be a list of turns, got {type(turns).__name__}")
    turns = [dict(t) if isinstance(t, dict) else t for t in turns]
    count = 0
    for i in range(1, len(turns), 2):
        qtype = turns[i - 1].get("type") if isinstance(turns[i - 1], dict) else None
        if qtype in noise_types and isinstance(turns[i], dict) and replaced(noise_seed, key, i, rate):
            turns[i]["content" if "content" in turns[i] else "value"] = confused_answer(scene, qtype)
            count += 1
    return turns, count


class NoisyConversationPipeline(ConversationPipeline):
    """:class:`~mm_lightning.data.conversations.ConversationPipeline` with systematically wrong training answers.

    See the module docstring. Everything but the answers is as the parent's (same batch keys).

    Args:
        tokenizer: the shared :class:`~mm_lightning.data.chat_tokenizer.ChatTokenizer`.
        num_image_tokens: copies of ``<image>``'s id that stand for the image.
        max_length: the longest sequence, image tokens included.
        image_size: side of the square image (default: the vision tower's; another value is an error).
        noise_types: the question types whose answers may be replaced (shape, colour, count, size, position).
        noise_rate: probability that such an answer is replaced by its confusion (above 0.5 to flip the greedy answer).
        noise_seed: seed of the choice of replaced answers.
        noise_eval: also replace validation/test answers (off: evaluation measures the true answers).
        crop_scale: area range of the training ``RandomResizedCrop``.
        hflip: random horizontal flips while training.
        mean: per-channel normalisation mean (default: the tower's; ImageNet's for a pipeline built without one).
        std: per-channel normalisation standard deviation (default: the tower's, else ImageNet's).
        conversations_field: the ``.json`` field holding the turns.
        tower_preprocessing: not to be set: the task's vision tower preprocessing, handed over by ``experiments.run``.
    """

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        num_image_tokens: int = 1,
        max_length: int = 512,
        image_size: int | None = None,
        noise_types: list[str] | None = None,
        noise_rate: float = 0.8,
        noise_seed: int = 0,
        noise_eval: bool = False,
        crop_scale: tuple[float, float] = (1.0, 1.0),
        hflip: bool = False,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        conversations_field: str = "conversations",
        tower_preprocessing: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tokenizer, num_image_tokens, max_length, image_size, crop_scale, hflip, mean, std,
                         conversations_field, tower_preprocessing)
        types = list(noise_types if noise_types is not None else ["colour", "size"])
        unknown = sorted(set(types) - set(QUESTION_TYPES))
        if unknown:
            raise ValueError(f"noise_types: unknown question type(s) {', '.join(unknown)}; known: {', '.join(QUESTION_TYPES)}")
        if not 0.0 <= noise_rate <= 1.0:
            raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
        self.noise_types = set(types)
        self.noise_rate = noise_rate
        self.noise_seed = noise_seed
        self.noise_eval = noise_eval

    def decode(self, sample: dict[str, Any], training: bool) -> dict[str, Any]:
        if (training or self.noise_eval) and self.noise_rate > 0 and self.noise_types:
            meta = metadata(sample)
            turns, _ = corrupt_conversation(meta.get(self.conversations_field), meta.get("scene"),
                                            str(sample.get("__key__", "?")), self.noise_types, self.noise_rate,
                                            self.noise_seed)
            sample = {**sample, "json": {**meta, self.conversations_field: turns}}
        return super().decode(sample, training)

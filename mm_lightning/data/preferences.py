"""Preference pairs into tensors: an image, a prompt, a chosen and a rejected completion (TRL's columns).

A sample is an image plus a ``.json`` holding ``{"prompt", "chosen", "rejected"}`` (at its top level,
as ``python -m data.prepare preferences`` writes it, or under ``field``: the shapes world's
``preference`` / ``confusion_preference``). ``prompt`` is a string (one user turn) or a list of
messages ending with a user turn (``{"role"/"from", "content"/"value"}``, multi-turn); ``chosen``
and ``rejected`` are strings or a one-message list (TRL's conversational format). ``<image>``
belongs once in the first user turn; a prompt without it gets it in front (RLAIF-V keeps the image
apart from the question), as LLaVA lays out its conversations.

Both completions are encoded exactly as the instruction pipeline encodes a conversation
(:func:`~mm_lightning.data.conversations.encode_segments`: ids concatenated segment by segment, never
re-tokenised and counted): the template's prefix (or a system message), the prompt's turns, then
``assistant_ids + encode(completion) + [end_of_turn_id] + separator_ids``. Labels are -100 everywhere
but the completion's ids and its end of turn (not shifted), so summed log-probabilities count
completion tokens only. The same checks as the instruction pipeline's apply (a too-long pair, a
completion that does not decode back to its text).

Batches (chosen and rejected right-padded to ONE common length, so they concatenate along the batch):
``image`` (B,3,H,W); ``chosen_input_ids`` / ``chosen_attention_mask`` / ``chosen_labels`` and
``rejected_*`` (B,L) int64; and, for generation and VQA scoring (the prompt's question answered by
``chosen``), ``prompt_input_ids`` / ``prompt_attention_mask`` (LEFT-padded, up to and including the
assistant marker), ``answers`` (the chosen texts), ``rejected_answers``, ``questions``,
``question_types`` (the pair's ``type``, else ``"unknown"``) and ``keys``. :func:`concatenated`
stacks a batch into the one forward of ``2B`` rows (the image repeated for chosen and rejected).
"""

from __future__ import annotations

from typing import Any

import torch

from mm_lightning.data.chat_tokenizer import IMAGE_TOKEN, ChatTokenizer
from mm_lightning.data.conversations import (
    ASSISTANT,
    IGNORE_INDEX,
    UNKNOWN_TYPE,
    ConversationError,
    Turn,
    _ChatPipeline,
    check_supervision,
    encode_segments,
    metadata,
    pad_ids,
    parse_conversation,
)
from mm_lightning.data.samples import MissingMemberError, decode_rgb, image_member

PAIR_KEYS = ("prompt", "chosen", "rejected")


def completion_text(value: Any, name: str) -> str:
    """A completion as text: a string, or a list of one assistant message (TRL's conversational format)."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            raise ConversationError(f"'{name}' must be a string or a list of one assistant message, got {len(value)} items")
        value = value[0].get("content", value[0].get("value"))
    if not isinstance(value, str) or not value.strip():
        raise ConversationError(f"'{name}' is empty or not text")
    if IMAGE_TOKEN in value:
        raise ConversationError(f"'{name}' holds {IMAGE_TOKEN}: it belongs in the prompt")
    return value.strip()


def prompt_turns(prompt: Any) -> list[Turn]:
    """The prompt's turns (user first, ending with a user turn), ``<image>`` once, in front of the first.

    A string is one user turn; a list is a conversation of messages. The checks are
    :func:`~mm_lightning.data.conversations.parse_conversation`'s (run with a placeholder answer).
    """
    if isinstance(prompt, str):
        messages: list[Any] = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = [dict(m) if isinstance(m, dict) else m for m in prompt]
    else:
        raise ConversationError(f"'prompt' must be a string or a non-empty list of messages, got {type(prompt).__name__}")
    first = next((m for m in messages if not (isinstance(m, dict) and m.get("role", m.get("from")) == "system")),
                 messages[0])  # the first user message (a system message may come before it)
    if isinstance(first, dict) and not any(IMAGE_TOKEN in str(m.get("content", m.get("value", "")))
                                           for m in messages if isinstance(m, dict)):
        text_key = "content" if "content" in first else "value"
        first[text_key] = IMAGE_TOKEN + str(first.get(text_key, ""))
    turns = parse_conversation(messages + [{"role": "assistant", "content": "-"}], image=True)
    return turns[:-1]


def read_pair(sample: dict[str, Any], field: str | None) -> dict[str, Any]:
    """The ``{"prompt", "chosen", "rejected"}`` object of a sample's ``.json`` (under ``field``, or at its top level)."""
    meta = metadata(sample)
    pair = meta.get(field) if field else meta
    if field and field not in meta:
        raise MissingMemberError(f".json has no '{field}' field; has {sorted(meta)}")
    if not isinstance(pair, dict):
        raise ConversationError(f".json '{field}' is a {type(pair).__name__}, not an object with {', '.join(PAIR_KEYS)}")
    missing = [k for k in PAIR_KEYS if k not in pair]
    if missing:
        where = f"'{field}'" if field else ".json"
        raise MissingMemberError(f"{where} has no {', '.join(repr(k) for k in missing)}; has {sorted(pair)}")
    return pair


class PreferencePipeline(_ChatPipeline):
    """Image + preference pair -> a batch of chosen and rejected sequences (see the module docstring).

    Args:
        tokenizer: the shared :class:`~mm_lightning.data.chat_tokenizer.ChatTokenizer`.
        num_image_tokens: copies of ``<image>``'s id that stand for the image (the connector's).
        max_length: the longest sequence (prompt + the longer completion, image tokens included); a
            longer pair is a bad sample.
        image_size: side of the square image (default: the vision tower's; another value is an error).
        field: the ``.json`` field holding the pair (``None``: the ``.json`` itself, as ``data.prepare
            preferences`` writes it; the shapes world's are ``preference`` and ``confusion_preference``).
        crop_scale: area range of the training ``RandomResizedCrop`` (``[1, 1]``: the whole image).
        hflip: random horizontal flips while training (off: answers may say "left").
        mean: per-channel normalisation mean (default: the tower's; ImageNet's for a pipeline built without one).
        std: per-channel normalisation standard deviation (default: the tower's, else ImageNet's).
        tower_preprocessing: not to be set: the task's vision tower preprocessing, handed over by ``experiments.run``.
    """

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        num_image_tokens: int = 1,
        max_length: int = 512,
        image_size: int | None = None,
        field: str | None = None,
        crop_scale: tuple[float, float] = (1.0, 1.0),
        hflip: bool = False,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        tower_preprocessing: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tokenizer, num_image_tokens, max_length, image_size, crop_scale, hflip, mean, std,
                         tower_preprocessing)
        self.field = field

    def encode_pair(self, pair: dict[str, Any]) -> dict[str, Any]:
        """Ids and labels of the chosen and rejected sequences, the prompt's ids and texts (checked)."""
        turns = prompt_turns(pair["prompt"])
        chosen, rejected = completion_text(pair["chosen"], "chosen"), completion_text(pair["rejected"], "rejected")
        segments = [(t.role, t.text, False) for t in turns]
        encoded = {}
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            enc = encode_segments(self.tokenizer, segments + [(ASSISTANT, text, True)], self.num_image_tokens)
            try:
                check_supervision(self.tokenizer, enc, [text], self.max_length)
            except ConversationError as err:
                raise ConversationError(f"{name}: {err}") from None
            encoded[name] = enc
        prompt_ids = encoded["chosen"].input_ids[: encoded["chosen"].starts[-1]]
        qtype = pair.get("type", UNKNOWN_TYPE)
        return {
            "chosen_ids": encoded["chosen"].input_ids, "chosen_labels": encoded["chosen"].labels,
            "rejected_ids": encoded["rejected"].input_ids, "rejected_labels": encoded["rejected"].labels,
            "prompt_ids": prompt_ids, "answer": chosen, "rejected_answer": rejected,
            "question": turns[-1].text.replace(IMAGE_TOKEN, "").strip(),
            "question_type": qtype if isinstance(qtype, str) and qtype else UNKNOWN_TYPE,
        }

    def decode(self, sample: dict[str, Any], training: bool) -> dict[str, Any]:
        image = decode_rgb(image_member(sample))
        out = self.encode_pair(read_pair(sample, self.field))
        out["image"] = (self.train_tf if training else self.eval_tf)(image)
        out["key"] = str(sample.get("__key__", "?"))
        return out

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(samples)
        pad = self.tokenizer.pad_token_id
        ids = pad_ids([s["chosen_ids"] for s in samples] + [s["rejected_ids"] for s in samples], pad)
        labels = pad_ids([s["chosen_labels"] for s in samples] + [s["rejected_labels"] for s in samples], IGNORE_INDEX)
        mask = pad_ids([[1] * len(s["chosen_ids"]) for s in samples] + [[1] * len(s["rejected_ids"]) for s in samples], 0)
        if not bool((labels != IGNORE_INDEX).any(dim=1).all()):
            keys = ", ".join(s["key"] for s in samples)
            raise ConversationError(f"a pair of the batch ({keys}) has a completion without supervised tokens")
        batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples])}
        for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, 2 * n))):
            batch[f"{side}_input_ids"] = ids[rows]
            batch[f"{side}_attention_mask"] = mask[rows]
            batch[f"{side}_labels"] = labels[rows]
        batch["prompt_input_ids"] = pad_ids([s["prompt_ids"] for s in samples], pad, "left")
        batch["prompt_attention_mask"] = pad_ids([[1] * len(s["prompt_ids"]) for s in samples], 0, "left")
        batch["answers"] = [s["answer"] for s in samples]
        batch["rejected_answers"] = [s["rejected_answer"] for s in samples]
        batch["questions"] = [s["question"] for s in samples]
        batch["question_types"] = [s["question_type"] for s in samples]
        batch["keys"] = [s["key"] for s in samples]
        return batch


def concatenated(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``2B`` rows of one forward: chosen rows first, then rejected, the image repeated for both."""
    image = batch["image"]
    return {
        "image": torch.cat([image, image], dim=0),
        "input_ids": torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]], dim=0),
        "attention_mask": torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], dim=0),
        "labels": torch.cat([batch["chosen_labels"], batch["rejected_labels"]], dim=0),
    }


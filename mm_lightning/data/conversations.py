"""Conversations into tensors for the multimodal LLM: LLaVA-format dialogues, captions and plain text.

``input_ids`` are built by concatenating the ids of each segment (:func:`encode_segments`), in the
layout of the LM's own chat template (:class:`~mm_lightning.data.chat_tokenizer.ChatTokenizer`):
the template's prefix (``prefix_ids``: bos, a default system prompt; or a system message between
``system_open_ids`` and ``system_close_ids``), then per turn ``user_ids + encode(text) +
[end_of_turn_id] + separator_ids`` or ``assistant_ids + encode(answer) + [end_of_turn_id] +
separator_ids``; ``<image>`` becomes exactly ``num_image_tokens`` copies of ``image_token_id``. The
ids equal ``tokenizer.apply_chat_template(messages, tokenize=True)`` (ChatML's newline after
``<|im_end|>``, Qwen2.5's and SmolLM2's default system prompts, Llama-3's bos and dated system
header included). Nothing is re-tokenised and counted, so the labels cannot drift from the ids (the
cause of LLaVA's "tokenization mismatch", which silently masks a whole sample). ``labels`` are -100
everywhere but the assistant answers' text ids and their end of turn (TRL's ``assistant_only_loss``
convention), NOT shifted (a Hugging Face causal LM shifts once, inside). The separator after an end
of turn is NOT supervised: generation stops at the end-of-turn id and never writes it; it belongs to
the context of the next turn, as the headers and the prefix do.

Fail fast (raised from ``decode``, so :class:`~mm_lightning.data.datamodule.WebDataModule` skips and
counts the sample, or raises naming shard and key with ``strict``): a malformed conversation; a
sequence longer than ``max_length`` (image tokens included), which would cut an answer; supervised
tokens that do not decode back to the answers (a tokenizer that lower-cases or maps characters to
an unknown token); a sample with no supervised token. ``collate`` raises on a batch with no
supervised token instead of handing the model a loss of NaN.

Batches: ``image`` (B,3,H,W), ``input_ids`` / ``attention_mask`` / ``labels`` (B,L) int64, right-padded.
Evaluation batches add the LAST assistant turn of each sample as the question to answer:
``prompt_input_ids`` / ``prompt_attention_mask`` (LEFT-padded, everything up to and including the
last ``assistant_ids``), ``answers``, ``questions``, ``question_types`` and ``keys`` (lists).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mm_lightning.data.chat_tokenizer import IMAGE_TOKEN, ChatTokenizer
from mm_lightning.data.samples import (
    MissingMemberError,
    SamplePipeline,
    decode_rgb,
    image_member,
    image_transforms,
    member_names,
    tower_image_settings,
)

IGNORE_INDEX = -100
USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
#: Speaker names accepted in a conversation turn: LLaVA's (``from``: human/gpt) and OpenAI/TRL's (``role``); a
#: system turn may open a conversation.
ROLE_NAMES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}
UNKNOWN_TYPE = "unknown"
CAPTION_TYPE = "caption"


class ConversationError(ValueError):
    """A conversation that cannot become a training sample (malformed, too long, unsupervised, mismatched)."""


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation: ``role`` (user/assistant/system), its text, and the question type a user turn asks."""

    role: str
    text: str
    type: str = UNKNOWN_TYPE


def parse_conversation(turns: Any, image: bool = True) -> list[Turn]:
    """Check a LLaVA-format conversation and normalise it into :class:`Turn` s.

    A conversation is a non-empty list of ``{"from": "human"|"gpt", "value": str}`` (or
    ``{"role": "user"|"assistant", "content": str}``) turns, alternating user/assistant from a
    user turn to an assistant turn, after an optional first ``system`` turn (its text replaces the
    template's default system prompt); a user turn may carry its question ``type``. Texts are
    stripped; an empty answer or system prompt is an error. With ``image``, ``<image>`` occurs exactly
    once, in the first user turn, and is moved to its front (as LLaVA does: ``"<image>" + question``);
    without, any ``<image>`` is removed. Raises :class:`ConversationError` naming the turn.
    """
    if not isinstance(turns, list) or not turns:
        raise ConversationError(f"conversations must be a non-empty list of turns, got {_short(turns)}")
    parsed: list[Turn] = []
    images = 0
    first = 0  # index of the first user turn (1 after a system turn)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ConversationError(f"turn {i} is a {type(turn).__name__}, not an object with 'from' and 'value'")
        speaker = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if speaker not in ROLE_NAMES:
            raise ConversationError(f"turn {i} has speaker {speaker!r}; expected one of {', '.join(ROLE_NAMES)}")
        if not isinstance(text, str):
            raise ConversationError(f"turn {i} has no text ('value' is {_short(text)})")
        role = ROLE_NAMES[speaker]
        if role == SYSTEM and i == 0:
            if IMAGE_TOKEN in text:
                raise ConversationError(f"turn 0 (system) holds {IMAGE_TOKEN}: it belongs once in the first human turn only")
            if not text.strip():
                raise ConversationError("turn 0 is an empty system prompt")
            parsed.append(Turn(SYSTEM, text.strip()))
            first = 1
            continue
        if role == SYSTEM:
            raise ConversationError(f"turn {i} is a system turn: only the first turn may be one")
        expected = USER if (i - first) % 2 == 0 else ASSISTANT
        if role != expected:
            raise ConversationError(f"turn {i} is from the {role}, expected the {expected} (turns alternate, user first)")
        count = text.count(IMAGE_TOKEN)
        images += count
        if image and count and (i != first or count > 1):
            raise ConversationError(f"turn {i} holds {IMAGE_TOKEN}: it belongs once in the first human turn only")
        text = text.replace(IMAGE_TOKEN, "").strip()
        if role == ASSISTANT and not text:
            raise ConversationError(f"turn {i} is an empty answer")
        qtype = turn.get("type", UNKNOWN_TYPE) if role == USER else UNKNOWN_TYPE
        if not isinstance(qtype, str) or not qtype:
            raise ConversationError(f"turn {i} has question type {qtype!r}, not a name")
        parsed.append(Turn(role, text, qtype))
    if parsed[-1].role != ASSISTANT:
        if parsed[-1].role == SYSTEM:
            raise ConversationError("the conversation is a system prompt alone, with no question and answer")
        raise ConversationError(f"the last turn ({len(parsed) - 1}) is a question with no answer")
    if image:
        if images != 1:
            raise ConversationError(f"no {IMAGE_TOKEN} in the first human turn")
        parsed[first] = Turn(USER, IMAGE_TOKEN + parsed[first].text, parsed[first].type)
    return parsed


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# A segment: (role, text, supervised). Issue 13's preference pairs reuse encode_segments with it.
Segment = tuple[str, str, bool]


@dataclass
class Encoded:
    """Ids and labels of a list of segments, and where each segment's text starts and ends.

    ``starts[i]``: index of segment ``i``'s first text id (just after its role marker);
    ``ends[i]``: index just after its end-of-turn id (the separator, if any, follows);
    ``prefix_length``: how many ids come before the first user/assistant header (the template's
    prefix or the system block).
    """

    input_ids: list[int]
    labels: list[int]
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    prefix_length: int = 0


def encode_segments(tokenizer: ChatTokenizer, segments: Sequence[Segment], num_image_tokens: int = 0,
                    add_prefix: bool = True) -> Encoded:
    """Concatenate the ids of ``segments`` in the chat template's layout (see the module docstring).

    ``prefix_ids`` (or, when the first segment is a ``system`` one, ``system_open_ids + text +
    system_close_ids``), then ``header + text + end_of_turn + separator`` per user/assistant segment.
    ``<image>`` in a text becomes ``num_image_tokens`` copies of ``image_token_id`` in place. The
    labels of a supervised segment are its text ids and its end of turn (never its header, nor the
    separator after the end of turn); everything else is -100.
    """
    markers = {USER: tokenizer.user_ids, ASSISTANT: tokenizer.assistant_ids}
    end, image, separator = tokenizer.end_of_turn_id, tokenizer.image_token_id, tokenizer.separator_ids
    ids: list[int] = []
    out = Encoded(ids, [])
    labels = out.labels
    segments = list(segments)
    if segments and segments[0][0] == SYSTEM:
        role, text, supervised = segments.pop(0)
        opening, closing = tokenizer.system_open_ids, tokenizer.system_close_ids
        if opening is None or closing is None:
            raise ConversationError(f"a system prompt was given but the chat tokenizer {getattr(tokenizer, 'path', '')!r} "
                                    "has no system turn (its chat template renders none): drop the system message")
        if supervised or IMAGE_TOKEN in text:
            raise ConversationError(f"a system segment is never supervised and holds no {IMAGE_TOKEN}")
        ids += opening
        out.starts.append(len(ids))
        ids += tokenizer.encode(text) + closing
        out.ends.append(len(ids))
    elif add_prefix:
        ids += tokenizer.prefix_ids
    labels += [IGNORE_INDEX] * len(ids)
    out.prefix_length = len(ids)
    for role, text, supervised in segments:
        if role not in markers:
            expected = f"{USER} or {ASSISTANT}" + (f" ({SYSTEM} only first)" if role == SYSTEM else "")
            raise ConversationError(f"unknown segment role {role!r}; expected {expected}")
        ids += markers[role]
        labels += [IGNORE_INDEX] * len(markers[role])
        out.starts.append(len(ids))
        pieces = text.split(IMAGE_TOKEN)
        if len(pieces) > 1 and num_image_tokens < 1:
            raise ConversationError(f"a {role} segment holds {IMAGE_TOKEN} but num_image_tokens is {num_image_tokens}")
        body: list[int] = []
        for k, piece in enumerate(pieces):
            if k:
                body += [image] * num_image_tokens
            if piece:
                body += tokenizer.encode(piece)
        body.append(end)
        ids += body
        labels += body if supervised else [IGNORE_INDEX] * len(body)
        out.ends.append(len(ids))
        ids += separator
        labels += [IGNORE_INDEX] * len(separator)
    return out


def supervised_runs(labels: Sequence[int]) -> list[list[int]]:
    """The runs of consecutive supervised (not -100) label ids, in order."""
    runs: list[list[int]] = []
    previous = False
    for label in labels:
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(int(label))
        previous = label != IGNORE_INDEX
    return runs


def check_supervision(tokenizer: ChatTokenizer, encoded: Encoded, answers: Sequence[str], max_length: int | None) -> None:
    """Raise :class:`ConversationError` unless ``encoded`` fits ``max_length`` and its labels are exactly the answers.

    The labels must hold one run per answer, each ending with the end of turn and decoding back to
    its answer: a check of the label mask against the text, not of the encoder against itself.
    """
    n = len(encoded.input_ids)
    if max_length is not None and n > max_length:
        raise ConversationError(f"{n} tokens (image tokens included) exceed max_length {max_length}: truncation would "
                                "cut an answer; raise max_length or shorten the conversation")
    runs = supervised_runs(encoded.labels)
    if not runs:
        raise ConversationError("no supervised token (no assistant answer)")
    if len(runs) != len(answers):
        raise ConversationError(f"{len(runs)} supervised spans for {len(answers)} answers")
    for k, (run, answer) in enumerate(zip(runs, answers)):
        if run[-1] != tokenizer.end_of_turn_id:
            raise ConversationError(f"answer {k} does not end with the end-of-turn token")
        decoded = tokenizer.decode(run[:-1])
        if decoded != answer:
            raise ConversationError(f"answer {k} {answer!r} decodes back as {decoded!r}: the tokenizer does not "
                                    "round-trip it (lower-casing? unknown characters?)")


def pad_ids(rows: Sequence[Sequence[int]], value: int, side: Literal["right", "left"] = "right") -> torch.Tensor:
    """Rows of ids padded with ``value`` to the longest row, on the right or the left: (B, L) int64."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            values = torch.as_tensor(list(row), dtype=torch.long)
            if side == "left":
                out[i, width - len(row):] = values
            else:
                out[i, :len(row)] = values
    return out


def metadata(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample's ``.json`` member as a dict."""
    if "json" not in sample:
        raise MissingMemberError(f"no .json member; has {member_names(sample)}")
    meta = sample["json"]
    meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
    if not isinstance(meta, dict):
        raise ConversationError(f".json is a {type(meta).__name__}, not an object")
    return meta


def text_member(sample: dict[str, Any], key: str) -> str | None:
    """Member ``key`` (e.g. ``txt``) as stripped text, else the ``.json``'s ``caption``; ``None`` without either."""
    if key in sample:
        value = sample[key]
    elif "json" in sample and isinstance(metadata(sample).get("caption"), str):
        value = metadata(sample)["caption"]
    else:
        return None
    text = (value.decode("utf-8") if isinstance(value, bytes) else str(value)).strip()
    if not text:
        raise ConversationError(f"empty .{key} text")
    if IMAGE_TOKEN in text:
        raise ConversationError(f"the .{key} text holds {IMAGE_TOKEN}")
    return text


class _ChatPipeline(SamplePipeline):
    """Shared by the image pipelines: decode the image, encode the turns, check them, collate."""

    def __init__(self, tokenizer: ChatTokenizer, num_image_tokens: int, max_length: int, image_size: int | None,
                 crop_scale: tuple[float, float], hflip: bool, mean: tuple[float, float, float] | None,
                 std: tuple[float, float, float] | None, tower_preprocessing: dict[str, Any] | None = None) -> None:
        if not isinstance(tokenizer, ChatTokenizer):
            raise TypeError(f"tokenizer must be a ChatTokenizer, got {type(tokenizer).__name__}")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if max_length <= num_image_tokens:
            raise ValueError(f"max_length ({max_length}) must exceed num_image_tokens ({num_image_tokens}): it counts them")
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        image_size, mean, std = tower_image_settings(image_size, mean, std, tower_preprocessing)
        self.image_size, self.mean, self.std = image_size, mean, std
        self.train_tf = image_transforms(image_size, True, crop_scale, hflip, mean, std)
        self.eval_tf = image_transforms(image_size, False, crop_scale, hflip, mean, std)

    def turns(self, sample: dict[str, Any]) -> list[Turn]:
        """The sample's conversation: user turns (the first with ``<image>`` in front) and assistant answers."""
        raise NotImplementedError

    def decode(self, sample: dict[str, Any], training: bool) -> dict[str, Any]:
        image = decode_rgb(image_member(sample))
        turns = self.turns(sample)
        encoded = encode_segments(self.tokenizer, [(t.role, t.text, t.role == ASSISTANT) for t in turns],
                                  self.num_image_tokens)
        check_supervision(self.tokenizer, encoded, [t.text for t in turns if t.role == ASSISTANT], self.max_length)
        out: dict[str, Any] = {"image": (self.train_tf if training else self.eval_tf)(image),
                               "input_ids": encoded.input_ids, "labels": encoded.labels,
                               "key": str(sample.get("__key__", "?"))}
        if not training:  # the last answer is the question to generate
            question = turns[-2]
            out.update(prompt_ids=encoded.input_ids[:encoded.starts[-1]], answer=turns[-1].text,
                       question=question.text.replace(IMAGE_TOKEN, "").strip(), question_type=question.type)
        return out

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_text(samples, self.tokenizer.pad_token_id)
        batch["image"] = torch.stack([s["image"] for s in samples])
        if samples and all("prompt_ids" in s for s in samples):
            prompts = pad_ids([s["prompt_ids"] for s in samples], self.tokenizer.pad_token_id, "left")
            batch["prompt_input_ids"] = prompts
            batch["prompt_attention_mask"] = pad_ids([[1] * len(s["prompt_ids"]) for s in samples], 0, "left")
            batch["answers"] = [s["answer"] for s in samples]
            batch["questions"] = [s["question"] for s in samples]
            batch["question_types"] = [s["question_type"] for s in samples]
            batch["keys"] = [s["key"] for s in samples]
        return batch


def collate_text(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels``; raises if no sample has a supervised token."""
    labels = pad_ids([s["labels"] for s in samples], IGNORE_INDEX)
    if not bool((labels != IGNORE_INDEX).any()):
        keys = ", ".join(s.get("key", "?") for s in samples)
        raise ConversationError(f"a batch of {len(samples)} samples ({keys}) has no supervised token: its loss would be NaN")
    return {"input_ids": pad_ids([s["input_ids"] for s in samples], pad_token_id),
            "attention_mask": pad_ids([[1] * len(s["input_ids"]) for s in samples], 0), "labels": labels}


class ConversationPipeline(_ChatPipeline):
    """Image + LLaVA-format ``.json`` conversation (multi-turn, ``<image>`` in the first human turn) -> a chat batch.

    See the module docstring for the layout, the checks and the batch keys. The shapes world's
    ``.json`` carries each question's ``type`` (shape, colour, count, size, position); other data
    gives ``"unknown"``.

    Args:
        tokenizer: the :class:`~mm_lightning.data.chat_tokenizer.ChatTokenizer` (configured once, shared with the task).
        num_image_tokens: copies of ``<image>``'s id that stand for the image (the connector's number of
            visual tokens; 1 for the fusion connector, which needs only the position).
        max_length: the longest sequence, image tokens included; a longer one is a bad sample (it would cut an answer).
        image_size: side of the square image the vision tower sees (default: the tower's; another value is an error).
        crop_scale: area range of the training ``RandomResizedCrop``; ``[1.0, 1.0]`` (the default) keeps the
            whole image (answers may say where things are).
        hflip: random horizontal flips while training (off: answers may say "left").
        mean: per-channel normalisation mean (default: the tower's; ImageNet's for a pipeline built without one).
        std: per-channel normalisation standard deviation (default: the tower's, else ImageNet's).
        conversations_field: the ``.json`` field holding the turns.
        tower_preprocessing: not to be set: ``experiments.run`` hands over the task's vision tower preprocessing
            (``{"image_size", "mean", "std"}``) here, as it does ``num_image_tokens``.
    """

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        num_image_tokens: int = 1,
        max_length: int = 512,
        image_size: int | None = None,
        crop_scale: tuple[float, float] = (1.0, 1.0),
        hflip: bool = False,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        conversations_field: str = "conversations",
        tower_preprocessing: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tokenizer, num_image_tokens, max_length, image_size, crop_scale, hflip, mean, std,
                         tower_preprocessing)
        self.conversations_field = conversations_field

    def turns(self, sample: dict[str, Any]) -> list[Turn]:
        meta = metadata(sample)
        if self.conversations_field not in meta:
            raise MissingMemberError(f".json has no '{self.conversations_field}' field; has {sorted(meta)}")
        return parse_conversation(meta[self.conversations_field], image=True)


class CaptionPipeline(_ChatPipeline):
    """Image + caption as one turn (human: ``<image>`` [+ prompt], assistant: the caption), for the align stage.

    LLaVA's stage 1 / BLIP-2's stage 2: the same layout and batch keys as :class:`ConversationPipeline`
    (evaluation: ``answers`` are the captions, ``questions`` the prompt, ``question_types`` ``"caption"``).

    Args:
        tokenizer: the shared :class:`~mm_lightning.data.chat_tokenizer.ChatTokenizer`.
        num_image_tokens: copies of ``<image>``'s id that stand for the image.
        max_length: the longest sequence, image tokens included.
        image_size: side of the square image (default: the vision tower's; another value is an error).
        prompt: text after ``<image>`` in the user turn (empty: the image alone asks for its caption).
        caption_key: the member holding the caption (else the ``.json``'s ``caption``).
        crop_scale: area range of the training ``RandomResizedCrop``.
        hflip: random horizontal flips while training.
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
        prompt: str = "",
        caption_key: str = "txt",
        crop_scale: tuple[float, float] = (1.0, 1.0),
        hflip: bool = False,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        tower_preprocessing: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tokenizer, num_image_tokens, max_length, image_size, crop_scale, hflip, mean, std,
                         tower_preprocessing)
        self.prompt = prompt.replace(IMAGE_TOKEN, "").strip()
        self.caption_key = caption_key

    def turns(self, sample: dict[str, Any]) -> list[Turn]:
        text = text_member(sample, self.caption_key)
        if text is None:
            raise MissingMemberError(f"no .{self.caption_key} member and no 'caption' in .json; has {member_names(sample)}")
        return [Turn(USER, IMAGE_TOKEN + self.prompt, CAPTION_TYPE), Turn(ASSISTANT, text)]


class TextPipeline(SamplePipeline):
    """Text only, for the LM stage: a sample's caption and conversation rendered as turns without the image.

    The caption becomes one round (user: ``caption_prompt``, assistant: the caption, as
    :class:`CaptionPipeline` lays it out), then the ``.json`` conversation's rounds with
    ``<image>`` removed. Batches: ``input_ids``, ``attention_mask``, ``labels``.

    Args:
        tokenizer: the shared :class:`~mm_lightning.data.chat_tokenizer.ChatTokenizer`.
        max_length: the longest sequence; a longer one is a bad sample.
        supervise: ``"all"`` (every token but the template's prefix (bos, a default system prompt, a system
            message) and padding: plain language modelling, markers
            included) or ``"answers"`` (the assistant turns only, as in instruction tuning).
        caption_prompt: the user text of the caption round.
        caption_key: the member holding the caption (else the ``.json``'s ``caption``); a sample without one
            has no caption round.
        conversations_field: the ``.json`` field holding the turns (``None``: captions only).
    """

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        max_length: int = 512,
        supervise: Literal["all", "answers"] = "all",
        caption_prompt: str = "",
        caption_key: str | None = "txt",
        conversations_field: str | None = "conversations",
    ) -> None:
        if not isinstance(tokenizer, ChatTokenizer):
            raise TypeError(f"tokenizer must be a ChatTokenizer, got {type(tokenizer).__name__}")
        if supervise not in ("all", "answers"):
            raise ValueError(f"supervise must be 'all' or 'answers', got {supervise!r}")
        if caption_key is None and conversations_field is None:
            raise ValueError("caption_key and conversations_field are both None: no text to read")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.supervise = supervise
        self.caption_prompt = caption_prompt.replace(IMAGE_TOKEN, "").strip()
        self.caption_key = caption_key
        self.conversations_field = conversations_field

    def turns(self, sample: dict[str, Any]) -> list[Turn]:
        """The caption round and the conversation rounds of ``sample`` (no image)."""
        turns: list[Turn] = []
        caption = text_member(sample, self.caption_key) if self.caption_key else None
        if caption is not None:
            turns += [Turn(USER, self.caption_prompt, CAPTION_TYPE), Turn(ASSISTANT, caption)]
        if self.conversations_field and "json" in sample:
            meta = metadata(sample)
            if self.conversations_field in meta:
                conversation = parse_conversation(meta[self.conversations_field], image=False)
                system = [t for t in conversation if t.role == SYSTEM]  # a system prompt opens the whole sequence
                turns = system + turns + [t for t in conversation if t.role != SYSTEM]
        if not turns:
            raise MissingMemberError(f"no caption (.{self.caption_key}) and no .json '{self.conversations_field}'; "
                                     f"has {member_names(sample)}")
        return turns

    def decode(self, sample: dict[str, Any], training: bool) -> dict[str, Any]:
        turns = self.turns(sample)
        encoded = encode_segments(self.tokenizer, [(t.role, t.text, t.role == ASSISTANT) for t in turns])
        check_supervision(self.tokenizer, encoded, [t.text for t in turns if t.role == ASSISTANT], self.max_length)
        labels = encoded.labels
        if self.supervise == "all":  # every token after the template's prefix (bos, a default system prompt)
            skip = encoded.prefix_length
            labels = [IGNORE_INDEX] * skip + encoded.input_ids[skip:]
        return {"input_ids": encoded.input_ids, "labels": labels, "key": str(sample.get("__key__", "?"))}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_text(samples, self.tokenizer.pad_token_id)

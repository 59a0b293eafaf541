"""The conversation tokenizer of the multimodal LLM: role markers, an end-of-turn token and ONE ``<image>`` token.

:class:`ChatTokenizer` wraps a local Hugging Face tokenizer directory (``AutoTokenizer``, never
downloaded) and tells the pipelines, the model and the task what they share: ``vocab_size``,
``pad_token_id``, ``bos_token_id``, ``image_token_id``, ``end_of_turn_id`` (generation stops
there), the role-marker id lists ``user_ids`` / ``assistant_ids``, ``encode`` and ``decode``.

Where the markers come from, in order:

1. the ``user_marker`` / ``assistant_marker`` / ``end_of_turn`` strings given to the constructor;
2. the directory's chat template, rendered around sentinel messages: the text before a later
   user message's content is the user marker, the text before an assistant content the assistant
   marker, the first token after a content the end of turn. Whitespace that a template puts
   between turns (ChatML's newline after ``<|im_end|>``) and a default system prompt are dropped:
   our sequences are exactly ``bos, (marker + text + end-of-turn) per turn``;
3. the special tokens of :data:`SPECIAL_TOKENS` by name (a bare ``tokenizer.json`` of ours).

``<image>`` is added as a special token when the tokenizer lacks it (the model then resizes its
embeddings to ``vocab_size``).

:func:`train_chat_tokenizer` writes the tokenizer ``python -m data.prepare shapes`` saves in
``data/shards/shapes/chat_tokenizer/``: a case- and punctuation-keeping byte-level BPE (no prefix
space, so ``decode(encode(s)) == s``) with the special tokens below and a chat template that
renders exactly the ids :func:`mm_lightning.data.conversations.encode_segments` builds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mm_lightning.data.tokenizer import Tokenizer

# Fork-started DataLoader workers inherit the tokenizer; its thread pool must not be used before the fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
END_OF_TURN_TOKEN = "<|end|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
IMAGE_TOKEN = "<image>"
#: The special tokens of a trained chat tokenizer, in id order (``<|pad|>`` is id 0).
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, END_OF_TURN_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, IMAGE_TOKEN)
#: Jinja chat template of a trained chat tokenizer (the layout of ``encode_segments`` with one image token).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER_TOKEN + "{% elif message['role'] == 'assistant' %}" + ASSISTANT_TOKEN
    + "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ message['content'] }}" + END_OF_TURN_TOKEN + "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_TOKEN + "{% endif %}"
)
CHAT_TOKENIZER_DIR = "chat_tokenizer"
_SENTINELS = ("zqxuserzqx1", "zqxassistantzqx1", "zqxuserzqx2", "zqxassistantzqx2")


def train_chat_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000,
                         min_frequency: int = 2) -> Path:
    """Train a byte-level BPE on ``texts`` and save it with its chat template as a tokenizer directory.

    No lower-casing, no prefix space (an answer's first word encodes the same at the start of
    its turn as anywhere it starts a text). The vocabulary holds the 256 byte symbols, the
    :data:`SPECIAL_TOKENS` (``<|pad|>`` is id 0) and at most ``vocab_size`` entries in all.
    Written atomically: ``out_dir`` appears complete or not at all. Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for text in texts:
            count += 1
            yield text

    tokenizer.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise ValueError("no texts to train the chat tokenizer on")
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=END_OF_TURN_TOKEN,
                                 pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        _remove_tree(tmp)
    hf.save_pretrained(str(tmp))
    if out.exists():
        _remove_tree(out)
    os.replace(tmp, out)
    return out


def json_texts(meta: Any) -> Iterator[str]:
    """The texts of a sample's ``.json``: captions, conversation turns (without ``<image>``) and preference texts."""
    if not isinstance(meta, dict):
        return
    captions = meta.get("captions")
    for text in ([meta.get("caption")] + (captions if isinstance(captions, list) else [])):
        if isinstance(text, str) and text.strip():
            yield text.strip()
    turns = meta.get("conversations")
    for turn in turns if isinstance(turns, list) else []:
        text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if isinstance(text, str) and text.replace(IMAGE_TOKEN, "").strip():
            yield text.replace(IMAGE_TOKEN, "").strip()
    preference = meta.get("preference")
    for key in ("prompt", "chosen", "rejected"):
        text = preference.get(key) if isinstance(preference, dict) else None
        if isinstance(text, str) and text.replace(IMAGE_TOKEN, "").strip():
            yield text.replace(IMAGE_TOKEN, "").strip()


def train_chat_tokenizer_from_shards(shards: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                                     vocab_size: int = 1000, min_frequency: int = 2) -> Path:
    """:func:`train_chat_tokenizer` on the ``.txt`` and ``.json`` texts (:func:`json_texts`) of ``shards``."""
    import json

    from mm_lightning.data.tokenizer import shard_captions

    shards = [os.fspath(s) for s in shards]

    def texts() -> Iterator[str]:
        yield from (t for t in shard_captions(shards, "txt") if t)
        for raw in shard_captions(shards, "json"):
            try:
                yield from json_texts(json.loads(raw))
            except ValueError as err:
                raise ValueError(f"a .json member of the shards ({shards[0]}, ...) is not JSON: {err}") from err

    try:
        return train_chat_tokenizer(texts(), out_dir, vocab_size, min_frequency)
    except ValueError as err:
        if "no texts" in str(err):
            raise ValueError(f"the shards ({shards[0] if shards else 'none'}, ...) hold no .txt or .json texts") from None
        raise


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


class ChatTokenizer(Tokenizer):
    """Conversation tokenizer from a local Hugging Face tokenizer directory (or a ``tokenizer.json`` of ours).

    Loaded lazily (on first use, in each DataLoader worker), so a pipeline or task that holds it
    pickles cheaply. Configure it once and hand the object to the pipeline and the task.

    Args:
        path: a directory ``transformers.AutoTokenizer.from_pretrained`` reads offline (with a chat
            template, or with the markers below), e.g. ``data/shards/shapes/chat_tokenizer``
            (``python -m data.prepare shapes`` writes it), or a ``tokenizer.json`` holding the
            special tokens of :data:`SPECIAL_TOKENS`.
        user_marker: text that opens a user turn (e.g. ``"<|im_start|>user\\n"``); default: from the chat template.
        assistant_marker: text that opens an assistant turn; default: from the chat template.
        end_of_turn: the ONE token that closes a turn and stops generation (e.g. ``"<|im_end|>"``);
            default: from the chat template.
    """

    def __init__(self, path: str | os.PathLike, user_marker: str | None = None, assistant_marker: str | None = None,
                 end_of_turn: str | None = None) -> None:
        self.path = os.fspath(path)
        self.user_marker = user_marker
        self.assistant_marker = assistant_marker
        self.end_of_turn = end_of_turn
        self._tok: Any = None
        self._ids: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None, "_ids": {}}

    def __repr__(self) -> str:
        return f"ChatTokenizer({self.path!r})"

    # ------------------------------------------------------------------ loading
    @property
    def hf(self) -> Any:
        """The underlying ``transformers`` tokenizer (loaded on first access, ``<image>`` added if missing)."""
        if self._tok is None:
            self._tok = self._load()
            self._ids = self._special_ids(self._tok)
        return self._tok

    def _load(self) -> Any:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if not os.path.exists(self.path):
            hint = ""
            if os.path.basename(self.path.rstrip("/")) == CHAT_TOKENIZER_DIR:
                hint = " (`python -m data.prepare shapes` writes it next to the shapes shards)"
            raise FileNotFoundError(f"chat tokenizer {self.path!r} does not exist{hint}")
        if os.path.isdir(self.path):
            try:
                tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            except (OSError, ValueError) as err:
                raise ValueError(f"tokenizer directory {self.path!r} holds no loadable Hugging Face tokenizer: {err}") from err
        else:
            tok = PreTrainedTokenizerFast(tokenizer_file=self.path, clean_up_tokenization_spaces=False)
            vocab = tok.get_vocab()
            for attr, token in (("pad_token", PAD_TOKEN), ("bos_token", BOS_TOKEN), ("eos_token", END_OF_TURN_TOKEN)):
                if token in vocab:
                    setattr(tok, attr, token)
        if IMAGE_TOKEN not in tok.get_vocab():
            from tokenizers import AddedToken

            tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        return tok

    def _special_ids(self, tok: Any) -> dict[str, Any]:
        markers = self._markers(tok)
        user, assistant, end = (self._marker_ids(tok, markers[k], k) for k in ("user", "assistant", "end_of_turn"))
        if len(end) != 1:
            raise ValueError(f"chat tokenizer {self.path!r}: the end of turn {markers['end_of_turn']!r} is {len(end)} tokens, "
                             "not one (generation stops at one token id): give end_of_turn")
        if not user or not assistant:
            raise ValueError(f"chat tokenizer {self.path!r}: empty role marker (user {markers['user']!r}, assistant "
                             f"{markers['assistant']!r}): give user_marker and assistant_marker")
        pad = tok.pad_token_id
        if pad is None:  # pad with the end of turn: padding is masked out anyway
            pad = end[0]
        return {"user": user, "assistant": assistant, "end_of_turn": end[0], "pad": int(pad),
                "bos": None if tok.bos_token_id is None else int(tok.bos_token_id),
                "image": int(tok.convert_tokens_to_ids(IMAGE_TOKEN))}

    def _markers(self, tok: Any) -> dict[str, str]:
        given = {"user": self.user_marker, "assistant": self.assistant_marker, "end_of_turn": self.end_of_turn}
        if all(v is not None for v in given.values()):
            return given  # type: ignore[return-value]
        derived: dict[str, str] | None = None
        if getattr(tok, "chat_template", None):
            derived = self._markers_from_template(tok)
        elif all(t in tok.get_vocab() for t in (USER_TOKEN, ASSISTANT_TOKEN, END_OF_TURN_TOKEN)):
            derived = {"user": USER_TOKEN, "assistant": ASSISTANT_TOKEN, "end_of_turn": END_OF_TURN_TOKEN}
        if derived is None:
            raise ValueError(f"chat tokenizer {self.path!r} has no chat template and no {USER_TOKEN}/{ASSISTANT_TOKEN}/"
                             f"{END_OF_TURN_TOKEN} tokens: give user_marker, assistant_marker and end_of_turn")
        return {k: v if v is not None else derived[k] for k, v in given.items()}

    def _markers_from_template(self, tok: Any) -> dict[str, str]:
        u1, a1, u2, a2 = _SENTINELS
        messages = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                    {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]
        try:
            text = tok.apply_chat_template(messages, tokenize=False)
        except Exception as err:  # a template that raises on our messages: say which tokenizer
            raise ValueError(f"chat tokenizer {self.path!r}: its chat template does not render a user/assistant "
                             f"conversation ({err}): give user_marker, assistant_marker and end_of_turn") from err
        positions = [text.find(s) for s in _SENTINELS]
        if min(positions) < 0 or positions != sorted(positions):
            raise ValueError(f"chat tokenizer {self.path!r}: its chat template alters the messages' text: "
                             "give user_marker, assistant_marker and end_of_turn")
        after = text[positions[3] + len(a2):]  # end of turn (+ separator) after the last answer
        before_assistant = text[positions[0] + len(u1):positions[1]]  # end + separator + assistant header
        before_user = text[positions[1] + len(a1):positions[2]]  # end + separator + user header
        ids = tok.encode(after, add_special_tokens=False)
        if not ids:
            raise ValueError(f"chat tokenizer {self.path!r}: its chat template closes a turn with nothing: give end_of_turn")
        end = tok.convert_ids_to_tokens(ids[0])
        if not (before_assistant.startswith(end) and before_user.startswith(end)):
            raise ValueError(f"chat tokenizer {self.path!r}: its chat template does not close every turn with {end!r}: "
                             "give user_marker, assistant_marker and end_of_turn")
        return {"user": before_user[len(end):].lstrip(), "assistant": before_assistant[len(end):].lstrip(),
                "end_of_turn": end}

    def _marker_ids(self, tok: Any, marker: str, name: str) -> list[int]:
        ids = [int(i) for i in tok.encode(marker, add_special_tokens=False)]
        if tok.unk_token_id is not None and tok.unk_token_id in ids:
            raise ValueError(f"chat tokenizer {self.path!r}: the {name} marker {marker!r} encodes to the unknown token")
        return ids

    def _id(self, name: str) -> Any:
        self.hf  # noqa: B018 (loads the tokenizer and its ids)
        return self._ids[name]

    # --------------------------------------------------------------- interface
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included: embedding tables need at least this many rows."""
        return len(self.hf)

    @property
    def pad_token_id(self) -> int:
        return self._id("pad")

    @property
    def bos_token_id(self) -> int | None:
        """The id that opens every sequence (``None`` for tokenizers without one, e.g. ChatML's: then nothing does)."""
        return self._id("bos")

    @property
    def image_token_id(self) -> int:
        """The id of ``<image>`` (one token; pipelines repeat it once per image token of the connector)."""
        return self._id("image")

    @property
    def end_of_turn_id(self) -> int:
        """The id that closes every turn; generation stops there."""
        return self._id("end_of_turn")

    @property
    def user_ids(self) -> list[int]:
        """The ids that open a user turn."""
        return list(self._id("user"))

    @property
    def assistant_ids(self) -> list[int]:
        """The ids that open an assistant turn (a generation prompt ends with them)."""
        return list(self._id("assistant"))

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, no special tokens added; special-token strings in it stay plain text."""
        self.hf  # noqa: B018 (loads the tokenizer)
        encoder = self._ids.get("encoder")
        if encoder is None:
            encoder = self._ids["encoder"] = self._plain_text_encoder()
        if encoder is False:
            return [int(i) for i in self.hf.encode(text, add_special_tokens=False, split_special_tokens=True)]
        return encoder.encode(text, add_special_tokens=False).ids

    def _plain_text_encoder(self) -> Any:
        """A copy of the backend ``tokenizers.Tokenizer`` that encodes special-token strings as text (3x faster
        than the ``transformers`` wrapper, which matters at a few calls per turn); ``False`` for slow tokenizers."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            return False
        from tokenizers import Tokenizer

        encoder = Tokenizer.from_str(backend.to_str())
        encoder.encode_special_tokens = True
        return encoder

    def decode(self, ids: Sequence[int] | Any) -> str:
        """The text of ``ids`` (a list or a 1-D tensor), special tokens and padding skipped, stripped."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.hf.decode(ids, skip_special_tokens=True).strip()

    def __len__(self) -> int:
        return self.vocab_size

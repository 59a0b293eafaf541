"""The conversation tokenizer of the multimodal LLM: the chat layout of the LM's own tokenizer and ONE ``<image>`` token.

:class:`ChatTokenizer` wraps a Hugging Face tokenizer named by hub id (``Qwen/Qwen2.5-0.5B-Instruct``)
or local directory (:mod:`mm_lightning.models.hub`'s rules: downloaded only when online, the HF cache
when offline, never remote code) and tells the pipelines, the model and the task what they share:
``vocab_size``, ``pad_token_id``, ``bos_token_id``, ``image_token_id``, ``end_of_turn_id``
(generation stops there) and the pieces that :func:`mm_lightning.data.conversations.encode_segments`
concatenates into a conversation's ids:

- ``prefix_ids``: everything the chat template renders before the first user turn when the
  conversation has no system message: ``bos`` (Llama-3, ours), a default system prompt (Qwen2.5's
  "You are Qwen, created by Alibaba Cloud. ...", SmolLM2's "You are a helpful AI assistant named
  SmolLM, ..."), Llama-3.1/3.2's system header with its "Cutting Knowledge Date" lines;
- ``system_open_ids`` / ``system_close_ids``: what surrounds a system message's text (``None``
  when the template renders no system turn);
- ``user_ids`` / ``assistant_ids``: the headers that open a turn (the generation prompt is the
  assistant header);
- ``end_of_turn_id`` and ``separator_ids``: the ONE token that closes every turn and what the
  template writes after it (ChatML's newline after ``<|im_end|>``; nothing for Llama-3).

So a conversation's ids are ``prefix + (header + text + end_of_turn + separator) per turn`` and equal
``apply_chat_template(messages, tokenize=True)``; a prompt (history + assistant header) equals
``apply_chat_template(history, add_generation_prompt=True)``. On first use the tokenizer checks that
on probe conversations (with and without a system message) and refuses, in one line, a template
that does not decompose so (a tokenizer that merges across turn boundaries, a template that ends a
conversation otherwise than a turn, ...).

Where the pieces come from, in order:

1. the ``user_marker`` / ``assistant_marker`` / ``end_of_turn`` strings given to the constructor
   (all three: ``prefix`` is ``bos`` (if any), no separator, no system turn; the template is not used);
2. the tokenizer's chat template, rendered around sentinel messages (``chat_template_kwargs`` are
   passed to it, e.g. ``{"date_string": "26 Jul 2024"}`` to pin the date Llama-3.1/3.2 templates
   otherwise take from the clock);
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
from typing import Any, Literal

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
#: Qwen2's ChatML layout (Qwen/Qwen2-0.5B-Instruct's tokenizer_config.json): its special tokens and chat template,
#: which puts a default system turn first when the conversation has none
CHATML_TOKENIZER_DIR = "chatml_tokenizer"
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN)
CHATML_SYSTEM_PROMPT = "You are a helpful assistant."
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + CHATML_SYSTEM_PROMPT + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOKENIZER_CONFIG = "tokenizer_config.json"
_SENTINELS = ("zqxuserzqx1", "zqxassistantzqx1", "zqxuserzqx2", "zqxassistantzqx2")
_SYSTEM_SENTINEL = "zqxsystemzqx1"
#: Probe conversations that a template-derived layout must reproduce id for id (text with digits, spaces, punctuation).
_PROBE = (("user", IMAGE_TOKEN + "What is 2+2? Say it."), ("assistant", "It is 4."), ("user", "And 10 more?"),
          ("assistant", "14, in all: (4 + 10)."))
_PROBE_SYSTEM = "Answer briefly; use digits."
#: What to set when a tokenizer's chat layout cannot be derived (the keys of ``tokenizer.init_args`` in a config).
_GIVE_MARKERS = "give user_marker, assistant_marker and end_of_turn (tokenizer.init_args)"


def train_chat_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000,
                         min_frequency: int = 2, layout: Literal["shapes", "chatml"] = "shapes") -> Path:
    """Train a byte-level BPE on ``texts`` and save it with its chat template as a tokenizer directory.

    No lower-casing, no prefix space (an answer's first word encodes the same at the start of
    its turn as anywhere it starts a text). ``layout`` ``shapes``: the :data:`SPECIAL_TOKENS`
    (``<|pad|>`` is id 0) and :data:`CHAT_TEMPLATE`; ``chatml``: Qwen2's special tokens and chat template
    (:data:`CHATML_TEMPLATE`, no bos, ``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn), the layout of a
    Qwen2 / SmolLM2 LM. The vocabulary holds the 256 byte symbols, the special tokens and at most
    ``vocab_size`` entries in all. Written atomically: ``out_dir`` appears complete or not at all. Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if layout not in ("shapes", "chatml"):
        raise ValueError(f"layout must be 'shapes' or 'chatml', got {layout!r}")
    specials = list(SPECIAL_TOKENS if layout == "shapes" else CHATML_SPECIAL_TOKENS)
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be at least {256 + len(specials)} (bytes + special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for text in texts:
            count += 1
            yield text
        if layout == "chatml" and count:  # the template's own text is in every sequence: give it merges too
            yield from ["system", "user", "assistant", CHATML_SYSTEM_PROMPT] * 16

    tokenizer.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise ValueError("no texts to train the chat tokenizer on")
    if layout == "shapes":
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=END_OF_TURN_TOKEN,
                                     pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False)
        hf.chat_template = CHAT_TEMPLATE
    else:
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     clean_up_tokenization_spaces=False)
        hf.chat_template = CHATML_TEMPLATE
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
                                     vocab_size: int = 1000, min_frequency: int = 2,
                                     layout: Literal["shapes", "chatml"] = "shapes") -> Path:
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
        return train_chat_tokenizer(texts(), out_dir, vocab_size, min_frequency, layout)
    except ValueError as err:
        if "no texts" in str(err):
            raise ValueError(f"the shards ({shards[0] if shards else 'none'}, ...) hold no .txt or .json texts") from None
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


class ChatTokenizer(Tokenizer):
    """Conversation tokenizer from a Hugging Face tokenizer (hub id or local directory) or a ``tokenizer.json`` of ours.

    Loaded lazily (on first use, in each DataLoader worker), so a pipeline or task that holds it
    pickles cheaply; the chat layout derived in the main process travels with it, so every worker
    uses the same one (a template that writes today's date cannot change it mid-run). Configure it
    once and hand the object to the pipeline and the task.

    Args:
        path: a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``: downloaded when online, read from the HF
            cache when ``HF_HUB_OFFLINE`` is set) or a local directory that ``transformers.AutoTokenizer``
            reads (with a chat template, or with the markers below), e.g. ``data/shards/shapes/chat_tokenizer``
            (``python -m data.prepare shapes`` writes it), or a ``tokenizer.json`` holding the special
            tokens of :data:`SPECIAL_TOKENS`. Remote code never runs.
        user_marker: text that opens a user turn (e.g. ``"<|im_start|>user\\n"``); default: from the chat template.
        assistant_marker: text that opens an assistant turn; default: from the chat template.
        end_of_turn: the ONE token that closes a turn and stops generation (e.g. ``"<|im_end|>"``);
            default: from the chat template.
        chat_template_kwargs: extra variables for the chat template (``apply_chat_template(..., **kwargs)``),
            e.g. ``{"date_string": "26 Jul 2024"}`` to pin the date of Llama-3.1/3.2 templates.
    """

    def __init__(self, path: str | os.PathLike, user_marker: str | None = None, assistant_marker: str | None = None,
                 end_of_turn: str | None = None, chat_template_kwargs: dict[str, Any] | None = None) -> None:
        self.path = os.fspath(path)
        self.user_marker = user_marker
        self.assistant_marker = assistant_marker
        self.end_of_turn = end_of_turn
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._tok: Any = None
        self._ids: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # the derived layout (lists of ids) travels; the tokenizer and its plain-text encoder are reloaded
        return {**self.__dict__, "_tok": None, "_ids": {k: v for k, v in self._ids.items() if k != "encoder"}}

    def __repr__(self) -> str:
        return f"ChatTokenizer({self.path!r})"

    # ------------------------------------------------------------------ loading
    @property
    def hf(self) -> Any:
        """The underlying ``transformers`` tokenizer (loaded on first access, ``<image>`` added if missing)."""
        if self._tok is None:
            tok = self._load()
            ids = self._ids or self._special_ids(tok)
            self._tok, self._ids = tok, ids
            if ids.get("derived") and not ids.get("checked"):
                try:
                    self._check_against_template()
                except Exception:
                    self._tok, self._ids = None, {}
                    raise
                ids["checked"] = True
        return self._tok

    def _load(self) -> Any:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        from mm_lightning.models import hub

        if os.path.isfile(self.path):
            tok = PreTrainedTokenizerFast(tokenizer_file=self.path, clean_up_tokenization_spaces=False)
            vocab = tok.get_vocab()
            for attr, token in (("pad_token", PAD_TOKEN), ("bos_token", BOS_TOKEN), ("eos_token", END_OF_TURN_TOKEN)):
                if token in vocab:
                    setattr(tok, attr, token)
        else:
            if hub.looks_like_hub_id(self.path):
                try:
                    hub.check_cached(self.path, "tokenizer", TOKENIZER_CONFIG)
                except hub.PretrainedError as err:
                    raise hub.PretrainedError(str(err)) from None
            elif not os.path.isdir(self.path):
                hint = " (give a local tokenizer directory or a hub id: org/name)"
                if os.path.basename(self.path.rstrip("/")) == CHAT_TOKENIZER_DIR:
                    hint = " (`python -m data.prepare shapes` writes it next to the shapes shards)"
                raise FileNotFoundError(f"chat tokenizer {self.path!r} does not exist{hint}")
            elif not any(os.path.isfile(os.path.join(self.path, f)) for f in (TOKENIZER_CONFIG, "tokenizer.json")):
                raise hub.PretrainedError(f"tokenizer {self.path!r}: the directory holds no {TOKENIZER_CONFIG} or "
                                          "tokenizer.json (is it a tokenizer saved with save_pretrained?)")
            try:
                tok = AutoTokenizer.from_pretrained(self.path, local_files_only=hub.is_offline(), trust_remote_code=False)
            except (OSError, ValueError, KeyError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise hub.PretrainedError(f"tokenizer {self.path!r} holds no loadable Hugging Face tokenizer: {first}") from None
        if IMAGE_TOKEN not in tok.get_vocab():
            from tokenizers import AddedToken

            tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        return tok

    def _special_ids(self, tok: Any) -> dict[str, Any]:
        layout, derived = self._layout(tok)
        user, assistant, end = (self._marker_ids(tok, layout[k], k) for k in ("user", "assistant", "end_of_turn"))
        if len(end) != 1:
            raise ValueError(f"chat tokenizer {self.path!r}: the end of turn {layout['end_of_turn']!r} is {len(end)} tokens, "
                             "not one (generation stops at one token id): give end_of_turn")
        if not user or not assistant:
            raise ValueError(f"chat tokenizer {self.path!r}: empty role marker (user {layout['user']!r}, assistant "
                             f"{layout['assistant']!r}): give user_marker and assistant_marker")
        pad = tok.pad_token_id
        if pad is None:  # pad with the end of turn: padding is masked out anyway
            pad = end[0]
        bos = None if tok.bos_token_id is None else int(tok.bos_token_id)
        if layout.get("prefix") is None:  # no template: bos opens every sequence, as before
            prefix = [] if bos is None else [bos]
        else:
            prefix = self._marker_ids(tok, layout["prefix"], "prefix")
        system = layout.get("system_open")
        return {"user": user, "assistant": assistant, "end_of_turn": end[0], "pad": int(pad), "bos": bos,
                "image": int(tok.convert_tokens_to_ids(IMAGE_TOKEN)), "prefix": prefix,
                "separator": self._marker_ids(tok, layout.get("separator") or "", "separator"),
                "system_open": None if system is None else self._marker_ids(tok, system, "system_open"),
                "system_close": None if system is None else self._marker_ids(tok, layout["system_close"], "system_close"),
                "derived": derived}

    def _layout(self, tok: Any) -> tuple[dict[str, str | None], bool]:
        """The chat layout as text, and whether it was derived from the template alone (then it is checked)."""
        given = {"user": self.user_marker, "assistant": self.assistant_marker, "end_of_turn": self.end_of_turn}
        if all(v is not None for v in given.values()):
            return dict(given), False
        if getattr(tok, "chat_template", None):
            derived = self._layout_from_template(tok)
        elif all(t in tok.get_vocab() for t in (USER_TOKEN, ASSISTANT_TOKEN, END_OF_TURN_TOKEN)):
            derived = {"user": USER_TOKEN, "assistant": ASSISTANT_TOKEN, "end_of_turn": END_OF_TURN_TOKEN}
        else:
            raise ValueError(f"chat tokenizer {self.path!r} has no chat template and no {USER_TOKEN}/{ASSISTANT_TOKEN}/"
                             f"{END_OF_TURN_TOKEN} tokens: {_GIVE_MARKERS}")
        overridden = any(v is not None for v in given.values())
        derived.update({k: v for k, v in given.items() if v is not None})
        return derived, "prefix" in derived and not overridden

    def _render(self, tok: Any, messages: list[dict[str, str]], generation: bool = False) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                       **self.chat_template_kwargs)

    def _layout_from_template(self, tok: Any) -> dict[str, str | None]:
        """Render sentinel conversations and cut the text around the sentinels (see the module docstring)."""
        u1, a1, u2, a2 = _SENTINELS
        messages = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                    {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]
        where = f"chat tokenizer {self.path!r}: its chat template"
        try:
            text = self._render(tok, messages)
        except Exception as err:  # a template that raises on our messages: say which tokenizer
            raise ValueError(f"{where} does not render a user/assistant conversation ({_first_line(err)}): "
                             f"{_GIVE_MARKERS}") from None
        positions = [text.find(s) for s in _SENTINELS]
        if min(positions) < 0 or positions != sorted(positions):
            raise ValueError(f"{where} alters the messages' text: {_GIVE_MARKERS}")
        after = text[positions[3] + len(a2):]  # end of turn + separator after the last answer
        ids = tok.encode(after, add_special_tokens=False)
        end = tok.convert_ids_to_tokens(ids[0]) if ids else ""
        if not end or not after.startswith(end):
            raise ValueError(f"{where} closes a turn with {after!r}, not with one token: give end_of_turn")
        close = after  # the end of turn and the separator the template writes after it
        before_assistant = text[positions[0] + len(u1):positions[1]]  # close + assistant header
        before_user = text[positions[1] + len(a1):positions[2]]  # close + user header
        if not (before_assistant.startswith(close) and before_user.startswith(close)):
            raise ValueError(f"{where} ends the conversation with {close!r} but separates its turns otherwise "
                             f"({before_user!r}): {_GIVE_MARKERS}")
        user, assistant = before_user[len(close):], before_assistant[len(close):]
        head = text[:positions[0]]
        if not head.endswith(user):
            raise ValueError(f"{where} opens the first user turn otherwise than the later ones ({head!r}): {_GIVE_MARKERS}")
        layout: dict[str, str | None] = {"user": user, "assistant": assistant, "end_of_turn": end,
                                         "separator": close[len(end):], "prefix": head[:len(head) - len(user)],
                                         "system_open": None, "system_close": None}
        try:
            prompt = self._render(tok, messages[:3], generation=True)
        except Exception as err:
            raise ValueError(f"{where} fails with add_generation_prompt ({_first_line(err)}): {_GIVE_MARKERS}") from None
        if prompt != text[:positions[2] + len(u2)] + close + assistant:
            raise ValueError(f"{where}'s generation prompt is not its assistant header {assistant!r} "
                             f"({prompt[positions[2] + len(u2):]!r} after a question): {_GIVE_MARKERS}")
        try:  # a system turn: what the template writes around a system message's text (None: it renders none)
            with_system = self._render(tok, [{"role": "system", "content": _SYSTEM_SENTINEL}] + messages)
        except Exception:
            return layout
        s, u = with_system.find(_SYSTEM_SENTINEL), with_system.find(u1)
        if 0 <= s < u and with_system[u:] == text[positions[0]:] and with_system[:u].endswith(user):
            layout["system_open"] = with_system[:s]
            layout["system_close"] = with_system[s + len(_SYSTEM_SENTINEL):u - len(user)]
        return layout

    def _check_against_template(self) -> None:
        """Our ids equal ``apply_chat_template``'s on probe conversations (with and without a system message, and the
        generation prompt); raises one line naming the first difference otherwise."""
        from mm_lightning.data.conversations import SYSTEM, encode_segments

        tok = self._tok
        cases = [list(_PROBE)]
        if self._ids["system_open"] is not None:
            cases.append([(SYSTEM, _PROBE_SYSTEM)] + list(_PROBE))
        for turns in cases:
            messages = [{"role": role, "content": text} for role, text in turns]
            ours = encode_segments(self, [(role, text, role == "assistant") for role, text in turns], 1)
            prompt = ours.input_ids[:ours.starts[-1]]
            for name, mine, theirs in (
                ("a conversation", ours.input_ids, self._template_ids(messages)),
                ("a generation prompt", prompt, self._template_ids(messages[:-1], generation=True)),
            ):
                if mine != theirs:
                    i = next((k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
                    raise ValueError(
                        f"chat tokenizer {self.path!r}: ids built turn by turn differ from its chat template's for {name} "
                        f"at token {i} ({tok.convert_ids_to_tokens(mine[i:i + 3])} vs "
                        f"{tok.convert_ids_to_tokens(theirs[i:i + 3])}; the tokenizer merges across turn boundaries?): "
                        f"{_GIVE_MARKERS}")

    def _template_ids(self, messages: list[dict[str, str]], generation: bool = False) -> list[int]:
        ids = self._tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation,
                                            **self.chat_template_kwargs)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return [int(i) for i in ids]

    def _marker_ids(self, tok: Any, marker: str, name: str) -> list[int]:
        ids = [int(i) for i in tok.encode(marker, add_special_tokens=False)] if marker else []
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
        """The tokenizer's beginning-of-sequence id (``None`` for tokenizers without one, e.g. Qwen2's). Sequences open
        with :attr:`prefix_ids`, which hold it when the chat template renders it (Llama-3, ours; not SmolLM2's)."""
        return self._id("bos")

    @property
    def prefix_ids(self) -> list[int]:
        """What opens a conversation without a system message: the template's text before the first user turn
        (bos, a default system prompt, a dated system header), or ``[bos]`` without a template."""
        return list(self._id("prefix"))

    @property
    def separator_ids(self) -> list[int]:
        """What the template writes after every end of turn (ChatML's newline; empty for Llama-3 and ours)."""
        return list(self._id("separator"))

    @property
    def system_open_ids(self) -> list[int] | None:
        """What opens a conversation before a system message's text (``None``: the template renders no system turn)."""
        value = self._id("system_open")
        return None if value is None else list(value)

    @property
    def system_close_ids(self) -> list[int] | None:
        """What follows a system message's text up to the first user header (its end of turn and separator)."""
        value = self._id("system_close")
        return None if value is None else list(value)

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

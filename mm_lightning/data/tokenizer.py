"""Text tokenizers for image-text tasks, and the tokenizer contract every part of a run relies on.

**The contract.** A run has at most ONE tokenizer object. Its config says so once, in a top-level
section (``experiments.run``'s :class:`~experiments.run.MMLightningCLI` parses it)::

    tokenizer:
      class_path: mm_lightning.data.tokenizer.TextTokenizer
      init_args: {path: data/shards/shapes/tokenizer.json, context_length: 32}

The CLI instantiates it once and hands the same object (``link_arguments(..., apply_on="instantiate")``)
to ``data.pipeline.init_args.tokenizer`` and ``model.init_args.tokenizer``: a sample pipeline or task
that needs text declares a ``tokenizer: Tokenizer | None`` init argument and receives it; one that does
not declare it (classification) gets nothing, and a config without a ``tokenizer:`` section (the
image-only tasks) passes ``None``. Callbacks never get a tokenizer of their own: they read
``pl_module.tokenizer``, an attribute every :class:`~mm_lightning.tasks.base.Task` declares (``None``
for image-only tasks). Nothing else reaches through another object for it (no reaching from
the trainer's data module to its pipeline).

Whatever a part needs to know about the text side it reads from that object, never from a second
setting: the vocabulary size (``vocab_size``, rows of an embedding table), the special-token ids
(``pad_token_id``, ``bos_token_id``, ``eos_token_id``; a chat tokenizer adds ``image_token_id`` and the
like) and, where the tokenizer fixes it, the context length (``context_length`` of
:class:`TextTokenizer`). Tasks keep the tokenizer out of their hyper-parameters
(``save_hyperparameters(ignore=["tokenizer"])``) and out of checkpoints: a checkpoint loads with
``weights_only=True``, and the config names the tokenizer again.

A tokenizer class for configs is a :class:`Tokenizer`: a subclass, or any class with ``vocab_size``,
``pad_token_id`` and ``decode`` (checked structurally, as ``collections.abc`` does; e.g.
:class:`~mm_lightning.data.chat_tokenizer.ChatTokenizer`). It loads its vocabulary lazily
(DataLoader workers unpickle it; ``__getstate__`` drops the loaded state) and downloads only what is
named by hub id, only when online.

Two kinds of source for :class:`TextTokenizer`:

* a ``tokenizer.json`` file written by :func:`train_bpe_tokenizer` (Hugging Face ``tokenizers``:
  lower-casing, byte-level BPE, ``<|startoftext|> ... <|endoftext|>`` around every text, as CLIP's
  tokenizer does), e.g. the one ``python -m data.prepare shapes`` saves next to the shapes shards;
* a Hugging Face tokenizer by local directory or hub id (``AutoTokenizer.from_pretrained``; a hub id is
  downloaded only when online and read from the HF cache when ``HF_HUB_OFFLINE`` is set; no remote code),
  for users who start from a pretrained text model.

Texts become fixed-length ``input_ids`` / ``attention_mask`` (right padding, truncation that keeps
the closing special token), so a text tower can pool at the end-of-text token, which is the last
position where ``attention_mask`` is 1.

``python -m data.prepare tokenizer --shards 'DIR/name-train-*.tar' --out DIR/tokenizer.json`` trains a
tokenizer on the ``.txt`` members of existing shards (:func:`train_tokenizer_from_shards`).
"""

from __future__ import annotations

import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# Fork-started DataLoader workers inherit the tokenizer; its thread pool must not be used before the fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
TOKENIZER_FILE = "tokenizer.json"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 2) -> Any:
    """Train a lower-casing byte-level BPE (``tokenizers.Tokenizer``) on ``texts``.

    The vocabulary holds the 256 byte symbols, the special tokens ``<|pad|>`` (id 0),
    ``<|startoftext|>`` and ``<|endoftext|>``, and at most ``vocab_size`` entries in all; on a
    small corpus (the shapes captions) training stops earlier, once every word is one token.
    Every encoded text is wrapped as ``<|startoftext|> ... <|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase(), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for text in texts:
            count += 1
            yield text

    tokenizer.train_from_iterator(counted(), trainer=trainer)
    if count == 0:
        raise ValueError("no texts to train the tokenizer on")
    bos, eos = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(BOS_TOKEN, bos), (EOS_TOKEN, eos)],
    )
    return tokenizer


def shard_captions(shards: Sequence[str | os.PathLike], caption_key: str = "txt") -> Iterator[str]:
    """The ``.{caption_key}`` members (UTF-8 text) of the samples in ``shards``, read straight from the tars."""
    suffix = "." + caption_key
    for shard in shards:
        try:
            with tarfile.open(shard, "r|*") as stream:
                for info in stream:
                    if info.isreg() and info.name.endswith(suffix):
                        handle = stream.extractfile(info)
                        if handle is not None:
                            yield handle.read().decode("utf-8", errors="replace").strip()
        except (tarfile.TarError, OSError) as err:
            raise ValueError(f"cannot read captions from shard {os.fspath(shard)!r}: {err}") from err


def train_tokenizer_from_shards(
    shards: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    vocab_size: int = 1000,
    min_frequency: int = 2,
    caption_key: str = "txt",
) -> Path:
    """Train :func:`train_bpe_tokenizer` on the captions of ``shards`` and save it to ``out`` (a ``.json`` file)."""
    shards = [os.fspath(s) for s in shards]
    if not shards:
        raise ValueError("no shards given to train the tokenizer on")
    texts = shard_captions(shards, caption_key)
    try:
        tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    except ValueError as err:
        if "no texts" in str(err):
            raise ValueError(f"the shards ({shards[0]}, ...) hold no .{caption_key} captions") from None
        raise
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return path


def _load_hf(path: str) -> Any:
    """A ``transformers`` fast tokenizer from a tokenizer.json file, a local tokenizer directory or a hub id
    (:mod:`mm_lightning.models.hub`'s rules: the HF cache when offline, never remote code)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from mm_lightning.models import hub

    if os.path.isdir(path) or (not os.path.exists(path) and hub.looks_like_hub_id(path)):
        if not os.path.isdir(path):
            try:
                hub.check_cached(path, "tokenizer", "tokenizer_config.json")
            except hub.PretrainedError as err:
                raise hub.PretrainedError(str(err)) from None
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=hub.is_offline(), trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"tokenizer directory {path!r} holds no loadable Hugging Face tokenizer: {err}") from err
    else:
        tok = PreTrainedTokenizerFast(tokenizer_file=path)
        vocab = tok.get_vocab()
        for attr, token in (("pad_token", PAD_TOKEN), ("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN)):
            if token in vocab:
                setattr(tok, attr, token)
    if tok.pad_token is None:  # GPT-2 style tokenizers have none: pad with end-of-text, masked out anyway
        tok.pad_token = tok.eos_token or tok.sep_token or tok.unk_token
    if tok.pad_token is None:
        raise ValueError(f"tokenizer {path!r} has no pad, end-of-text, separator or unknown token to pad with")
    tok.padding_side = "right"
    return tok


def missing_tokenizer_hint(path: str) -> str:
    """How to make the missing ``tokenizer.json`` at ``path``, with a ``--shards`` that fits the shards beside it:
    ``DIR/*-train-*.tar`` for data.prepare's names, the directory itself for others (img2dataset's
    ``00000.tar``, ...), a placeholder when no shard is there."""
    if os.path.isdir(path) or not path.endswith(".json"):
        return " (give a tokenizer.json file or a local Hugging Face tokenizer directory)"
    directory = os.path.dirname(path) or "."
    if any(Path(directory).glob("*-train-*.tar")):
        shards = f"'{os.path.join(directory, '*-train-*.tar')}'"
    elif any(Path(directory).glob("*.tar")):
        shards = directory  # every .tar of the directory: img2dataset writes 00000.tar, 00001.tar, ...
    else:
        shards = "TRAINING_SHARDS"
    return (
        f" (train one on the captions of your training shards: `python -m data.prepare tokenizer --shards {shards} "
        f"--out {path}`; `python -m data.prepare shapes` writes the shapes world's)"
    )


class Tokenizer(ABC):
    """The interface of a run's one tokenizer (see the module docstring for how it is handed around).

    Every tokenizer has a vocabulary size, a pad id and a decoder; the parts that receive it read
    further attributes where they need them (``context_length``, ``bos_token_id``, ``eos_token_id``,
    ``image_token_id``, ...) and fail naming the attribute when a tokenizer lacks one.
    """

    REQUIRED: tuple[str, ...] = ("vocab_size", "pad_token_id", "decode")

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        """Structural: a class with ``vocab_size``, ``pad_token_id`` and ``decode`` counts as a Tokenizer
        (as ``collections.abc`` does), so tokenizers need not import this module to be configured."""
        if cls is Tokenizer:
            return all(any(name in vars(k) for k in other.__mro__) for name in cls.REQUIRED) or NotImplemented
        return NotImplemented

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, added special tokens included (embedding tables need at least this many rows)."""

    @property
    @abstractmethod
    def pad_token_id(self) -> int:
        """The id that pads sequences (masked out by ``attention_mask``)."""

    @abstractmethod
    def decode(self, input_ids: torch.Tensor | Sequence[int]) -> str:
        """The text of one row of ids, without special tokens and padding."""


class TextTokenizer(Tokenizer):
    """Fixed-length tokenization of caption lists, from a ``tokenizer.json``, a local HF tokenizer directory or a hub id.

    Loaded lazily (on first use, in each DataLoader worker), so a pipeline that holds it pickles cheaply.

    Args:
        path: a ``tokenizer.json`` file (see :func:`train_bpe_tokenizer`), a directory that
            ``transformers.AutoTokenizer.from_pretrained`` reads, or a hub id (the HF cache when offline).
        context_length: tokens per text, special tokens included (longer texts are truncated,
            shorter ones padded on the right).
    """

    def __init__(self, path: str | os.PathLike, context_length: int = 32) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        self.path = os.fspath(path)
        self.context_length = context_length
        self._tok: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    @property
    def hf(self) -> Any:
        """The underlying ``transformers`` tokenizer (loaded on first access)."""
        if self._tok is None:
            from mm_lightning.models.hub import looks_like_hub_id

            if not os.path.exists(self.path) and not looks_like_hub_id(self.path):
                raise FileNotFoundError(f"tokenizer {self.path!r} does not exist{missing_tokenizer_hint(self.path)}")
            self._tok = _load_hf(self.path)
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids (added special tokens included); embedding tables need at least this many rows."""
        return len(self.hf)

    @property
    def pad_token_id(self) -> int:
        return int(self.hf.pad_token_id)

    @property
    def bos_token_id(self) -> int | None:
        """``<|startoftext|>`` (or the HF tokenizer's bos/cls token), ``None`` without one."""
        value = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.hf.cls_token_id
        return None if value is None else int(value)

    @property
    def eos_token_id(self) -> int | None:
        """``<|endoftext|>`` (or the HF tokenizer's eos/sep token), ``None`` without one."""
        value = self.hf.eos_token_id if self.hf.eos_token_id is not None else self.hf.sep_token_id
        return None if value is None else int(value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, context_length={self.context_length})"

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}``: int64 tensors of shape ``(len(texts), context_length)``."""
        enc = self.hf(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def decode(self, input_ids: torch.Tensor | Sequence[int]) -> str:
        """The text of one row of token ids, without special tokens and padding."""
        ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
        return self.hf.decode(ids, skip_special_tokens=True).strip()


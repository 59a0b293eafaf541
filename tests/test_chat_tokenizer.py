"""ChatTokenizer: the trained shapes tokenizer, local Hugging Face directories with a chat template, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from mm_lightning.data.chat_tokenizer import (
    CHAT_TOKENIZER_DIR,
    SPECIAL_TOKENS,
    ChatTokenizer,
    train_chat_tokenizer,
)
from mm_lightning.data.conversations import encode_segments

TEXTS = [
    "What shape is shown?", "What colour is the shape?", "How many shapes are there?", "Where is the shape?",
    "A ring.", "Rings.", "It is red.", "They are blue.", "There is one.", "There are two.", "On the left.",
    "At the top.", "a photo of 2 red rings on a noisy background", "Is the shape small or large?",
] * 3
ANSWERS = ["A ring.", "Rings.", "They are blue.", "There are two.", "On the left.", "In the center.",
           "Hello, World!", "a photo of 2 red rings", "Don't: 3.5 (or 4)?", "Vraiment ? Oui !"]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_chat_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / CHAT_TOKENIZER_DIR)


def test_trained_tokenizer_special_ids(chat_dir: Path) -> None:
    tok = ChatTokenizer(chat_dir)
    assert [tok.pad_token_id, tok.bos_token_id, tok.end_of_turn_id] == [0, 1, 2]
    assert tok.user_ids == [3] and tok.assistant_ids == [4] and tok.image_token_id == 5
    assert tok.vocab_size == len(tok.hf) == len(tok.hf.get_vocab())
    assert tok.hf.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    # <image> is ONE token wherever it appears in a rendered text
    assert tok.hf.encode("<image>What shape is shown?", add_special_tokens=False)[0] == 5
    assert tok.hf.encode("<image>", add_special_tokens=False) == [5]


@pytest.mark.parametrize("text", ANSWERS)
def test_answers_round_trip_with_case_and_punctuation(chat_dir: Path, text: str) -> None:
    tok = ChatTokenizer(chat_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.hf.decode(ids) == text  # no leading-space artefact, nothing cleaned up, not even before stripping


def test_case_is_kept_and_no_prefix_space(chat_dir: Path) -> None:
    tok = ChatTokenizer(chat_dir)
    assert tok.encode("A ring.") != tok.encode("a ring.")
    assert tok.encode("ring") != tok.encode(" ring")  # no space is added in front of a text


def test_special_token_strings_in_text_stay_text(chat_dir: Path) -> None:
    tok = ChatTokenizer(chat_dir)
    ids = tok.encode("say <|end|> and <|user|>")
    assert not set(ids) & {tok.end_of_turn_id, *tok.user_ids, tok.bos_token_id, tok.pad_token_id}
    assert tok.decode(ids) == "say <|end|> and <|user|>"
    assert tok.decode([tok.bos_token_id, *tok.encode("A ring."), tok.end_of_turn_id, tok.pad_token_id]) == "A ring."


def test_chat_template_renders_the_segment_ids(chat_dir: Path) -> None:
    """The template saved with the tokenizer gives exactly the ids the pipelines build (one image token)."""
    tok = ChatTokenizer(chat_dir)
    messages = [{"role": "user", "content": "<image>What shape is shown?"}, {"role": "assistant", "content": "A ring."},
                {"role": "user", "content": "Where is the shape?"}, {"role": "assistant", "content": "On the left."}]
    ours = encode_segments(tok, [(m["role"], m["content"], m["role"] == "assistant") for m in messages], 1)
    assert tok.hf.apply_chat_template(messages, tokenize=True)["input_ids"] == ours.input_ids
    prompt = tok.hf.apply_chat_template(messages[:3], tokenize=True, add_generation_prompt=True)["input_ids"]
    assert prompt == ours.input_ids[:ours.starts[3]]


def test_trained_tokenizer_layout_is_bos_then_turns(chat_dir: Path) -> None:
    """Our template: the prefix is bos alone, nothing follows an end of turn, no system turn (it raises on one)."""
    tok = ChatTokenizer(chat_dir)
    assert (tok.prefix_ids, tok.separator_ids, tok.system_open_ids, tok.system_close_ids) == ([1], [], None, None)


def test_pickles_cheaply_and_loads_lazily(chat_dir: Path) -> None:
    tok = ChatTokenizer(chat_dir)
    assert tok.end_of_turn_id == 2  # loaded
    blob = pickle.dumps(tok)
    assert len(blob) < 1000
    copy = pickle.loads(blob)
    assert copy._tok is None and copy.encode("A ring.") == tok.encode("A ring.")


def test_bare_tokenizer_json_finds_markers_by_name(chat_dir: Path) -> None:
    tok = ChatTokenizer(chat_dir / "tokenizer.json")
    assert (tok.user_ids, tok.assistant_ids, tok.end_of_turn_id, tok.bos_token_id, tok.image_token_id) == ([3], [4], 2, 1, 5)
    assert tok.decode(tok.encode("They are blue.")) == "They are blue."


def _foreign_tokenizer(directory: Path, template: str | None, special: list[str], pad: str | None = None,
                       bos: str | None = None) -> Path:
    """A local HF tokenizer directory that is not ours: BPE with other special tokens, saved with transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    base.train_from_iterator(TEXTS + ["system user assistant helpful"], trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=base, pad_token=pad, bos_token=bos, clean_up_tokenization_spaces=False)
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(str(directory))
    return directory


CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_local_hf_directory_with_chatml_template(tmp_path: Path) -> None:
    d = _foreign_tokenizer(tmp_path / "chatml", CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], pad="<|endoftext|>")
    tok = ChatTokenizer(d)
    hf = tok.hf
    start, end = hf.convert_tokens_to_ids("<|im_start|>"), hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.user_ids == [start, *hf.encode("user\n", add_special_tokens=False)]
    assert tok.assistant_ids == [start, *hf.encode("assistant\n", add_special_tokens=False)]
    assert tok.end_of_turn_id == end and tok.bos_token_id is None
    assert tok.pad_token_id == hf.convert_tokens_to_ids("<|endoftext|>")
    base = len(hf.get_vocab()) - 1
    assert tok.image_token_id == base and tok.vocab_size == base + 1  # <image> was added as one special token
    # the template's default system prompt opens the sequence, and its newline follows every <|im_end|>
    assert tok.prefix_ids == hf.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", add_special_tokens=False)
    assert tok.separator_ids == hf.encode("\n", add_special_tokens=False)
    enc = encode_segments(tok, [("user", "<image>What shape is shown?", False), ("assistant", "A ring.", True)], 2)
    n = len(tok.prefix_ids)
    assert enc.input_ids[n:n + len(tok.user_ids) + 2] == tok.user_ids + [tok.image_token_id] * 2
    assert tok.decode(enc.input_ids) == "system\nYou are a helpful assistant.\nuser\nWhat shape is shown?\nassistant\nA ring."


def test_local_hf_directory_with_explicit_markers(tmp_path: Path) -> None:
    d = _foreign_tokenizer(tmp_path / "plain", None, ["<s>", "</s>", "<pad>"], pad="<pad>", bos="<s>")
    with pytest.raises(ValueError, match="no chat template.*give user_marker"):
        ChatTokenizer(d).user_ids
    tok = ChatTokenizer(d, user_marker="User: ", assistant_marker="Assistant: ", end_of_turn="</s>")
    assert tok.end_of_turn_id == tok.hf.convert_tokens_to_ids("</s>") and tok.bos_token_id == tok.hf.convert_tokens_to_ids("<s>")
    assert tok.decode(tok.user_ids) == "User:"
    # given markers: bos, then marker + text + end of turn per turn; no separator, no system turn
    assert (tok.prefix_ids, tok.separator_ids, tok.system_open_ids) == ([tok.bos_token_id], [], None)
    with pytest.raises(ValueError, match="end of turn 'User: ' is [0-9]+ tokens, not one"):
        ChatTokenizer(d, user_marker="User: ", assistant_marker="A: ", end_of_turn="User: ").end_of_turn_id


def test_template_that_rewrites_messages_is_refused(tmp_path: Path) -> None:
    template = "{% for m in messages %}{{ m['content'] | upper }}</s>{% endfor %}"
    d = _foreign_tokenizer(tmp_path / "upper", template, ["<s>", "</s>"])
    with pytest.raises(ValueError, match="alters the messages' text"):
        ChatTokenizer(d).end_of_turn_id


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"chat_tokenizer' does not exist \(`python -m data.prepare shapes`"):
        ChatTokenizer(tmp_path / CHAT_TOKENIZER_DIR).vocab_size


def test_prepare_shapes_writes_both_tokenizers(tmp_path: Path) -> None:
    """``data.prepare shapes`` trains the chat tokenizer on the shards' texts; CLIP's tokenizer.json is unchanged."""
    from data import prepare
    from mm_lightning.data.tokenizer import TextTokenizer

    out = tmp_path / "shapes"
    manifest = prepare.prepare_shapes(out, train=24, val=4, test=4, progress=False)
    assert manifest["chat_tokenizer"] == CHAT_TOKENIZER_DIR
    clip = TextTokenizer(out / "tokenizer.json", context_length=16)
    assert clip.decode(clip(["A Red Ring"])["input_ids"][0]) == "a red ring"  # CLIP's: lower-cased, as before
    chat = ChatTokenizer(out / CHAT_TOKENIZER_DIR)
    import json
    import tarfile

    with tarfile.open(out / "shapes-train-000000.tar") as tar:
        meta = json.loads(next(tar.extractfile(m) for m in tar.getmembers() if m.name.endswith(".json")).read())
    texts = [t["value"].removeprefix("<image>\n") for t in meta["conversations"]] + meta["captions"]
    texts += [meta["preference"]["chosen"], meta["preference"]["rejected"]]
    for text in texts:
        assert chat.decode(chat.encode(text)) == text
        assert len(chat.encode(text)) <= len(text.split()) + 2  # trained on these texts: about a token a word


def test_shapes_chatml_tokenizer_is_qwen2s_layout_and_old_shards_get_it(tmp_path):
    """``data.prepare shapes`` writes a second chat tokenizer in Qwen2's ChatML layout: Qwen2-0.5B-Instruct's chat
    template as published (its tokenizer_config.json) and special tokens, no bos; our ids for a conversation equal
    apply_chat_template's (the default system turn first); shards written before it get it on first use."""
    from data.builtin import ensure_tokenizer
    from data.prepare_shapes import prepare_shapes
    from mm_lightning.data.chat_tokenizer import CHATML_TOKENIZER_DIR
    from mm_lightning.data.conversations import encode_segments

    qwen2_template = (  # Qwen/Qwen2-0.5B-Instruct, tokenizer_config.json "chat_template"
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    out = tmp_path / "shapes"
    prepare_shapes(out, train=40, val=4, test=4, progress=False)
    tok = ChatTokenizer(out / CHATML_TOKENIZER_DIR)
    assert tok.hf.chat_template == qwen2_template
    assert tok.bos_token_id is None and tok.hf.convert_ids_to_tokens(tok.end_of_turn_id) == "<|im_end|>"
    turns = [("user", "What colour is the shape?", False), ("assistant", "It is red.", True),
             ("user", "How many shapes?", False), ("assistant", "Two.", True)]
    messages = [{"role": role, "content": text} for role, text, _ in turns]
    encoded = encode_segments(tok, turns)
    assert encoded.input_ids == list(tok.hf.apply_chat_template(messages, tokenize=True)["input_ids"])
    assert tok.hf.decode(encoded.input_ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    supervised = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != -100]
    assert tok.hf.decode(supervised) == "It is red.<|im_end|>Two.<|im_end|>"

    import shutil

    shutil.rmtree(out / CHATML_TOKENIZER_DIR)
    assert ensure_tokenizer(out) and (out / CHATML_TOKENIZER_DIR).is_dir() and not ensure_tokenizer(out)

"""Conversations into tensors: segment layout, label masks, image splice, fail-fast checks, padding, data module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mm_lightning.data.chat_tokenizer import CHAT_TOKENIZER_DIR, ChatTokenizer, train_chat_tokenizer
from mm_lightning.data.conversations import (
    IGNORE_INDEX,
    CaptionPipeline,
    ConversationError,
    ConversationPipeline,
    TextPipeline,
    collate_text,
    encode_segments,
    parse_conversation,
    supervised_runs,
)
from mm_lightning.data.datamodule import BadSampleError, WebDataModule
from mm_lightning.data.shards import write_shards
from tests.conftest import png_bytes

TEXTS = ["What shape is shown?", "Where is the shape?", "How many shapes are there?", "A ring.", "On the left.",
         "There are two.", "It is red.", "a red ring on a dark background", "Describe the image."] * 3
BOS, END, USER, ASSISTANT, IMAGE = 1, 2, 3, 4, 5  # the trained tokenizer's special ids (tests/test_chat_tokenizer.py)
CONV = [{"from": "human", "value": "<image>\nWhat shape is shown?", "type": "shape"},
        {"from": "gpt", "value": "A ring."},
        {"from": "human", "value": "Where is the shape?", "type": "position"},
        {"from": "gpt", "value": "On the left."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> ChatTokenizer:
    return ChatTokenizer(train_chat_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / CHAT_TOKENIZER_DIR))


def raw_sample(conversations: list, key: str = "s0", image: bool = True, **json_fields) -> dict:
    sample = {"__key__": key, "json": json.dumps({"conversations": conversations, **json_fields}).encode()}
    if image:
        sample["png"] = png_bytes(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    return sample


def pipe(tok: ChatTokenizer, n: int = 3, max_length: int = 64) -> ConversationPipeline:
    return ConversationPipeline(tok, num_image_tokens=n, max_length=max_length, image_size=16)


def test_multi_turn_ids_and_label_mask_exactly(tok: ChatTokenizer) -> None:
    out = pipe(tok, n=3).decode(raw_sample(CONV), training=True)
    q1, a1, q2, a2 = (tok.encode(t) for t in ("What shape is shown?", "A ring.", "Where is the shape?", "On the left."))
    expected = ([BOS, USER, IMAGE, IMAGE, IMAGE] + q1 + [END, ASSISTANT] + a1 + [END, USER] + q2 + [END, ASSISTANT]
                + a2 + [END])
    assert out["input_ids"] == expected
    m = IGNORE_INDEX
    assert out["labels"] == ([m] * (7 + len(q1)) + a1 + [END] + [m] * (3 + len(q2)) + a2 + [END])
    first = 7 + len(q1)  # labels are not shifted: the first supervised label sits on the answer's first id
    assert out["labels"][first] == out["input_ids"][first] == a1[0] and out["input_ids"][first - 1] == ASSISTANT


@pytest.mark.parametrize("n", [1, 4, 16])
def test_image_placeholder_becomes_exactly_n_tokens_after_the_user_marker(tok: ChatTokenizer, n: int) -> None:
    conv = [{"from": "human", "value": "What shape is shown?\n<image>"}, {"from": "gpt", "value": "A ring."}]
    ids = pipe(tok, n=n).decode(raw_sample(conv), training=True)["input_ids"]
    positions = [i for i, t in enumerate(ids) if t == IMAGE]
    assert positions == list(range(2, 2 + n))  # LLaVA's layout: the image first, wherever the data put it
    assert ids[2 + n:2 + n + len(tok.encode("What shape is shown?"))] == tok.encode("What shape is shown?")


def test_supervised_tokens_decode_back_to_the_answers(tok: ChatTokenizer) -> None:
    out = pipe(tok).decode(raw_sample(CONV), training=True)
    runs = supervised_runs(out["labels"])
    assert [tok.decode(r) for r in runs] == ["A ring.", "On the left."]
    assert all(r[-1] == END for r in runs)


def test_role_content_format_and_stripping(tok: ChatTokenizer) -> None:
    conv = [{"role": "user", "content": " <image> What shape is shown? "}, {"role": "assistant", "content": " A ring.\n"}]
    a = pipe(tok).decode(raw_sample(conv), training=True)
    b = pipe(tok).decode(raw_sample(CONV[:2]), training=True)
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]


def test_a_tokenizer_that_does_not_round_trip_answers_is_caught(tmp_path: Path) -> None:
    """A lower-casing tokenizer: the supervised ids no longer decode to the answer, so the sample fails."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    d = train_chat_tokenizer(TEXTS, tmp_path / "lower")
    hf = AutoTokenizer.from_pretrained(str(d))
    hf.backend_tokenizer.normalizer = normalizers.Lowercase()
    hf.save_pretrained(str(d))
    with pytest.raises(ConversationError, match=r"answer 0 'A ring\.' decodes back as 'a ring\.'"):
        pipe(ChatTokenizer(d)).decode(raw_sample(CONV), training=True)


def test_too_long_raises_counting_image_tokens(tok: ChatTokenizer) -> None:
    n = len(pipe(tok, n=3).decode(raw_sample(CONV), training=True)["input_ids"])
    assert len(pipe(tok, n=3, max_length=n).decode(raw_sample(CONV), training=True)["input_ids"]) == n
    with pytest.raises(ConversationError, match=f"{n + 1} tokens \\(image tokens included\\) exceed max_length {n}"):
        pipe(tok, n=4, max_length=n).decode(raw_sample(CONV), training=True)  # one more image token: too long


@pytest.mark.parametrize("conv, message", [
    ([], "non-empty list"),
    ({"from": "human"}, "non-empty list"),
    ([CONV[1], CONV[0]], "turn 0 is from the assistant"),
    ([CONV[0], CONV[1], CONV[2]], "last turn \\(2\\) is a question with no answer"),
    ([CONV[0], CONV[1], CONV[0], CONV[1]], "turn 2 holds <image>"),
    ([CONV[2], CONV[3]], "no <image> in the first human turn"),
    ([CONV[0], {"from": "gpt", "value": "  "}], "turn 1 is an empty answer"),
    ([CONV[0], {"from": "bot", "value": "A ring."}], "turn 1 has speaker 'bot'"),
    ([CONV[0], {"from": "gpt", "value": 3}], "turn 1 has no text"),
    ([CONV[0], {"from": "gpt", "value": "<image> A ring."}], "turn 1 holds <image>"),
    ([{**CONV[0], "value": "<image><image>What?"}, CONV[1]], "turn 0 holds <image>"),
    (["hello", CONV[1]], "turn 0 is a str"),
])
def test_malformed_conversations_name_the_turn(conv, message: str) -> None:
    with pytest.raises(ConversationError, match=message):
        parse_conversation(conv, image=True)


def test_parse_without_image_removes_the_placeholder() -> None:
    turns = parse_conversation(CONV, image=False)
    assert [t.text for t in turns] == ["What shape is shown?", "A ring.", "Where is the shape?", "On the left."]
    assert [t.type for t in turns] == ["shape", "unknown", "position", "unknown"]


def test_all_masked_batch_raises_instead_of_nan(tok: ChatTokenizer) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    good = pipe(tok).decode(raw_sample(CONV, key="good"), training=True)
    masked = {**good, "labels": [IGNORE_INDEX] * len(good["labels"]), "key": "masked"}
    with pytest.raises(ConversationError, match=r"batch of 2 samples \(masked, masked\) has no supervised token"):
        collate_text([masked, masked], tok.pad_token_id)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    ids = torch.tensor([masked["input_ids"]])
    assert torch.isnan(lm(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX)).loss)  # what the check prevents
    batch = collate_text([masked, good], tok.pad_token_id)  # one supervised sample is enough
    assert torch.isfinite(lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss)


def test_decode_raises_for_a_sample_without_answers(tok: ChatTokenizer) -> None:
    from mm_lightning.data.conversations import check_supervision

    enc = encode_segments(tok, [("user", "What shape is shown?", False), ("assistant", "A ring.", False)])
    with pytest.raises(ConversationError, match="no supervised token"):
        check_supervision(tok, enc, ["A ring."], None)


def test_training_batch_is_right_padded(tok: ChatTokenizer) -> None:
    p = pipe(tok)
    long, short = p.decode(raw_sample(CONV), training=True), p.decode(raw_sample(CONV[:2]), training=True)
    batch = p.collate([short, long])
    assert set(batch) == {"image", "input_ids", "attention_mask", "labels"}
    n, m = len(short["input_ids"]), len(long["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, m) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0, :n].tolist() == short["input_ids"] and (batch["input_ids"][0, n:] == tok.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (m - n) and batch["attention_mask"][1].all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and batch["labels"][1].tolist() == long["labels"]
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.float32


def test_eval_prompts_are_left_padded_and_end_at_the_assistant_marker(tok: ChatTokenizer) -> None:
    p = pipe(tok)
    samples = [p.decode(raw_sample(CONV, key="two"), training=False), p.decode(raw_sample(CONV[:2], key="one"), training=False)]
    batch = p.collate(samples)
    assert batch["answers"] == ["On the left.", "A ring."]
    assert batch["questions"] == ["Where is the shape?", "What shape is shown?"]
    assert batch["question_types"] == ["position", "shape"] and batch["keys"] == ["two", "one"]
    prompts, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert (prompts[:, -1] == ASSISTANT).all() and mask[:, -1].all()
    for row, s in enumerate(samples):
        full = s["input_ids"]
        n = len(s["prompt_ids"])
        assert mask[row].tolist() == [0] * (prompts.shape[1] - n) + [1] * n
        assert (prompts[row, :prompts.shape[1] - n] == tok.pad_token_id).all()
        # prompt + reference answer + end of turn is the whole training sequence
        assert prompts[row, -n:].tolist() + tok.encode(batch["answers"][row]) + [END] == full
    assert batch["input_ids"].shape[0] == 2 and "labels" in batch  # validation loss still possible


def test_caption_pipeline_is_one_turn(tok: ChatTokenizer) -> None:
    sample = {"__key__": "c", "png": raw_sample([])["png"], "txt": b"a red ring on a dark background"}
    p = CaptionPipeline(tok, num_image_tokens=2, max_length=32, image_size=16)
    out = p.decode(sample, training=False)
    cap = tok.encode("a red ring on a dark background")
    assert out["input_ids"] == [BOS, USER, IMAGE, IMAGE, END, ASSISTANT] + cap + [END]
    assert out["labels"] == [IGNORE_INDEX] * 6 + cap + [END]
    assert out["prompt_ids"] == [BOS, USER, IMAGE, IMAGE, END, ASSISTANT] and out["question_type"] == "caption"
    prompted = CaptionPipeline(tok, 2, 32, 16, prompt="Describe the image.").decode(sample, training=True)
    head = [BOS, USER, IMAGE, IMAGE] + tok.encode("Describe the image.") + [END, ASSISTANT]
    assert prompted["input_ids"][:len(head)] == head


def test_text_pipeline_renders_caption_and_conversation_without_image(tok: ChatTokenizer) -> None:
    sample = raw_sample(CONV, image=False)
    sample["txt"] = b"a red ring on a dark background"
    out = TextPipeline(tok, max_length=64).decode(sample, training=True)
    ids = out["input_ids"]
    assert IMAGE not in ids
    cap, q1 = tok.encode("a red ring on a dark background"), tok.encode("What shape is shown?")
    assert ids[:6 + len(cap) + len(q1)] == [BOS, USER, END, ASSISTANT] + cap + [END, USER] + q1
    assert out["labels"] == [IGNORE_INDEX] + ids[1:]  # language modelling: every token but bos
    answers = TextPipeline(tok, max_length=64, supervise="answers").decode(sample, training=True)["labels"]
    assert [tok.decode(r) for r in supervised_runs(answers)] == ["a red ring on a dark background", "A ring.", "On the left."]
    batch = TextPipeline(tok, 64).collate([out, out])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_shapes_shards_through_a_real_data_module(tmp_path: Path) -> None:
    """Shards written by data.prepare shapes, read by WebDataModule with the chat tokenizer it trained."""
    from data import prepare

    out = tmp_path / "shapes"
    prepare.prepare_shapes(out, train=40, val=12, test=4, progress=False)
    tok = ChatTokenizer(out / CHAT_TOKENIZER_DIR)
    p = ConversationPipeline(tok, num_image_tokens=4, max_length=96, image_size=32)
    dm = WebDataModule(train=str(out / "shapes-train-*.tar"), val=str(out / "shapes-val-*.tar"), pipeline=p,
                       batch_size=5, num_workers=2, strict=True)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == [f"{i:08d}" for i in range(12)]  # every sample once
    from mm_lightning.data import synthetic

    for b in batches:
        assert b["image"].shape[1:] == (3, 32, 32) and b["input_ids"].shape == b["labels"].shape
        assert ((b["input_ids"] == IMAGE).sum(1) == 4).all()
        for key, answer, qtype, question in zip(b["keys"], b["answers"], b["question_types"], b["questions"]):
            meta = synthetic.make_sample(int(key), synthetic.split_seed(0, "val"), 32)["json"]
            assert answer == meta["conversations"][-1]["value"] and qtype == meta["conversations"][-2]["type"]
            assert question == meta["conversations"][-2]["value"].removeprefix("<image>\n")
    train = next(iter(dm.train_dataloader()))
    assert set(train) == {"image", "input_ids", "attention_mask", "labels", "skipped"} and train["skipped"] == 0


def _bad_shards(directory: Path) -> str:
    good = raw_sample(CONV, key="good0")
    samples = [good, {**raw_sample(CONV[:2] + CONV[:2]), "__key__": "bad1"}, {**good, "__key__": "good2"}]
    write_shards(samples, directory, "conv", max_count=10)
    return str(directory / "conv-000000.tar")


def test_a_too_long_sample_is_skipped_and_counted_or_raises_naming_shard_and_key(tok: ChatTokenizer, tmp_path: Path) -> None:
    spec = _bad_shards(tmp_path)
    n = len(pipe(tok).decode(raw_sample(CONV), training=True)["input_ids"])
    p = pipe(tok, max_length=n)  # fits the good samples; the bad one has another <image> ...
    dm = WebDataModule(val=spec, pipeline=p, batch_size=4, num_workers=0, strict=True)
    with pytest.raises(BadSampleError, match=r"conv-000000\.tar, sample 'bad1': ConversationError: turn 2 holds <image>"):
        list(dm.val_dataloader())
    long = [CONV[0], CONV[1], {"from": "human", "value": "Where is the shape? " * 4}, CONV[3]]
    write_shards([raw_sample(CONV, key="good0"), raw_sample(long, key="long1")], tmp_path, "long", max_count=10)
    dm = WebDataModule(val=str(tmp_path / "long-000000.tar"), pipeline=p, batch_size=4, num_workers=0, strict=True)
    with pytest.raises(BadSampleError, match=r"long-000000\.tar, sample 'long1': ConversationError: [0-9]+ tokens "
                                             rf"\(image tokens included\) exceed max_length {n}: truncation would cut"):
        list(dm.val_dataloader())
    dm = WebDataModule(val=str(tmp_path / "long-000000.tar"), pipeline=p, batch_size=4, num_workers=0)
    dm.trainer = None
    with pytest.warns(UserWarning, match="sample 'long1'"):
        batches = list(dm.val_dataloader())
    assert [k for b in batches for k in b["keys"]] == ["good0"] and sum(b["skipped"] for b in batches) == 1


# --------------------------------------------------- python -m data.prepare conversations
def _llava_source(tmp_path: Path, entries: int = 8) -> tuple[Path, Path, list[dict]]:
    """A tiny LLaVA-format json and its image folder (PNG and JPEG in sub-folders), written with PIL."""
    from PIL import Image

    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    data = []
    for i in range(entries):
        rel = f"{'coco' if i % 2 else 'vg'}/{i:04d}.{'jpg' if i % 2 else 'png'}"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / rel)
        turns = [{"from": "human", "value": f"What is in picture {i}?\n<image>"}, {"from": "gpt", "value": f"Picture {i}."}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": "And its colours?"}, {"from": "gpt", "value": "Noise, mostly."}]
        data.append({"id": f"img-{i}", "image": rel, "conversations": turns})
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(data))
    return src, images, data


def _prepare(*args: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    from tests.conftest import REPO

    return subprocess.run([sys.executable, "-m", "data.prepare", "conversations", *args, "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_prepare_conversations_writes_instruction_shards_a_data_module_reads(tmp_path: Path) -> None:
    import tarfile

    src, images, data = _llava_source(tmp_path)
    out = tmp_path / "out"
    from data import prepare

    manifest = prepare.main(["conversations", "--src", str(src), "--images", str(images), "--out", str(out),
                             "--val-fraction", "0.25", "--test-fraction", "0", "--samples-per-shard", "2", "--no-progress"])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 6, "val": 2}
    assert manifest["chat_tokenizer"] == CHAT_TOKENIZER_DIR and manifest["format"] == "llava"
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 8 and len(sizes) == 4
    members = {}
    for shard in sorted(out.glob("llava-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    assert sorted(members) == [f"{i:09d}" for i in range(8)]
    for key, sample in members.items():
        i = int(key)
        assert set(sample) == {"png" if i % 2 == 0 else "jpg", "json"}
        assert sample["png" if i % 2 == 0 else "jpg"] == (images / data[i]["image"]).read_bytes()  # original bytes
        assert json.loads(sample["json"]) == {"id": f"img-{i}", "image": data[i]["image"], "conversations": data[i]["conversations"]}

    tok = ChatTokenizer(out / CHAT_TOKENIZER_DIR)
    dm = WebDataModule(train=str(out / "llava-train-*.tar"), val=str(out / "llava-val-*.tar"), batch_size=3, num_workers=0,
                       pipeline=ConversationPipeline(tok, num_image_tokens=2, max_length=64, image_size=16), strict=True)
    dm.setup("fit")
    val = list(dm.val_dataloader())
    by_key = {k: (a, t) for b in val for k, a, t in zip(b["keys"], b["answers"], b["question_types"])}
    assert len(by_key) == 2
    for key, (answer, qtype) in by_key.items():
        assert answer == data[int(key)]["conversations"][-1]["value"] and qtype == "unknown"
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (3, 3, 16, 16) and ((train["input_ids"] == tok.image_token_id).sum(1) == 2).all()


@pytest.mark.parametrize("change, message", [
    (lambda d: d[3].update(image="vg/missing.png"),
     "entry 3 \\(id 'img-3'\\): image 'vg/missing.png' not found under --images"),
    (lambda d: d[2]["conversations"].reverse(), "entry 2 \\(id 'img-2'\\): malformed conversation: turn 0 is from the assistant"),
    (lambda d: d[5]["conversations"][0].update(value="What?"), "entry 5 \\(id 'img-5'\\): malformed conversation: no <image>"),
    (lambda d: d[1].pop("conversations"), "entry 1 \\(id 'img-1'\\) has no 'conversations'"),
    (lambda d: d[4].update(image=["a.png", "b.png"]), "entry 4 \\(id 'img-4'\\): 'image' must be one relative path"),
    (lambda d: d[6].pop("image"), "entry 6 \\(id 'img-6'\\) has no 'image' \\(text-only entry; --skip-text-only"),
    (lambda d: d.__setitem__(0, "hello"), "entry 0 is a str, not an object"),
])
def test_prepare_conversations_names_the_bad_entry_and_writes_nothing(tmp_path: Path, change, message: str) -> None:
    from data.prepare_conversations import prepare_conversations

    src, images, data = _llava_source(tmp_path)
    change(data)
    src.write_text(json.dumps(data))
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        prepare_conversations(src, images, out, progress=False)
    assert not out.exists()  # checked before anything is written


def test_prepare_conversations_cli_errors_are_one_line_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from data import prepare

    src, images, data = _llava_source(tmp_path, entries=4)
    out = tmp_path / "out"
    args = ["conversations", "--src", str(src), "--images", str(images), "--out", str(out), "--no-progress"]
    prepare.main(args)
    before = (out / "manifest.json").read_text()
    data[2]["image"] = "coco/nope.jpg"
    src.write_text(json.dumps(data))
    run = _prepare(*args[1:-1])  # the real command line, once
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().count("\n") == 0 and "entry 2 (id 'img-2'): image 'coco/nope.jpg' not found" in run.stderr
    assert (out / "manifest.json").read_text() == before  # the earlier complete data set is untouched
    src.write_text("[{\"id\": 1,")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "is not JSON" in err and err.strip().count("\n") == 0


def test_prepare_conversations_skips_text_only_entries_on_request(tmp_path: Path) -> None:
    from data.prepare_conversations import prepare_conversations

    src, images, data = _llava_source(tmp_path)
    data.insert(0, {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]})
    src.with_suffix(".jsonl").write_text("\n".join(json.dumps(d) for d in data) + "\n")
    manifest = prepare_conversations(src.with_suffix(".jsonl"), images, tmp_path / "out", val_fraction=0, test_fraction=0,
                                     skip_text_only=True, progress=False)
    assert manifest["splits"]["train"]["num_samples"] == 8 and manifest["skipped_text_only"] == 1
    import tarfile

    keys = {m.name.split(".")[0] for shard in (tmp_path / "out").glob("*.tar") for m in tarfile.open(shard).getmembers()}
    assert keys == {f"{i:09d}" for i in range(1, 9)}  # a sample's key is its entry's index in --src

"""Preference data: the shapes world's confusion pairs, the noisy-SFT pipeline, PreferencePipeline's ids and
label masks, and ``python -m data.prepare preferences``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mm_lightning.data import synthetic as syn
from mm_lightning.data.conversations import IGNORE_INDEX, ConversationPipeline, supervised_runs
from mm_lightning.data.datamodule import WebDataModule
from mm_lightning.data.noisy import NoisyConversationPipeline
from mm_lightning.data.preferences import PreferencePipeline, concatenated
from tests.conftest import png_bytes
from tests.vlm_fixtures import shapes_tokenizer

BOS, END, USER, ASSISTANT, IMAGE = 1, 2, 3, 4, 5  # the trained chat tokenizer's special ids
VALUES = {"shape": syn.CLASS_NAMES, "colour": syn.COLOURS, "count": syn.COUNTS, "size": syn.SIZES, "position": syn.POSITIONS}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return shapes_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return [syn.make_sample(i, seed=syn.split_seed(0, "train")) for i in range(300)]


def raw(pair: dict, key: str = "k0", field: str | None = "preference", **extra) -> dict:
    meta = {field: pair, **extra} if field else {**pair, **extra}
    image = png_bytes(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    return {"__key__": key, "png": image, "json": json.dumps(meta).encode()}


# ------------------------------------------------------------------------------------ the shapes world
def test_confusions_are_a_fixed_wrong_value_of_the_same_type() -> None:
    for qtype, table in syn.CONFUSIONS.items():
        assert set(table) == set(VALUES[qtype])
        assert all(wrong != right and wrong in VALUES[qtype] for right, wrong in table.items())


def test_confusion_pairs_reject_exactly_the_confused_answer(samples: list[dict]) -> None:
    types = Counter()
    for s in samples:
        scene, pair = s["json"]["scene"], s["json"]["confusion_preference"]
        qtype = pair["type"]
        assert pair["prompt"].startswith("<image>\n") and pair["prompt"].removeprefix("<image>\n") in sum(syn.QUESTIONS[qtype], ())
        assert pair["chosen"] == syn.answer(scene, qtype)
        assert pair["rejected"] == syn.answer({**scene, qtype: syn.CONFUSIONS[qtype][scene[qtype]]}, qtype) != pair["chosen"]
        types[qtype] += 1
    assert set(types) == set(syn.QUESTION_TYPES) and min(types.values()) > 10  # position: 1-object scenes only


def test_the_new_pair_leaves_the_other_members_of_a_sample_unchanged() -> None:
    """The confusion pair is drawn last, so images, captions, conversations and the old pair are as in VERSION 3."""
    s = syn.make_sample(7, seed=11)
    rng = np.random.default_rng([11, 7])
    block = np.random.default_rng([11, 104729, 7 // 6]).permutation(6)
    scene = syn.sample_scene(rng, label=int(block[7 % 6]))
    syn.render_scene(scene, 32, rng)
    assert s["txt"] == syn.caption(scene, rng) and s["json"]["conversations"] == syn.conversation(scene, rng)
    assert s["json"]["preference"] == syn.preference_pair(scene, rng)
    assert s["json"]["confusion_preference"] == syn.confusion_pair(scene, rng)


# ---------------------------------------------------------------------------------------- noisy SFT
def test_noisy_pipeline_confuses_the_documented_share_of_the_chosen_types_only(tok, samples: list[dict]) -> None:
    rate = 0.8
    noisy = NoisyConversationPipeline(tok, num_image_tokens=2, max_length=128, image_size=32,
                                      noise_types=["colour", "size"], noise_rate=rate)
    clean = ConversationPipeline(tok, num_image_tokens=2, max_length=128, image_size=32)
    counts: Counter = Counter()
    for s in samples:
        conv, scene = s["json"]["conversations"], s["json"]["scene"]
        got = [tok.decode(r[:-1]) for r in supervised_runs(noisy.decode(s, training=True)["labels"])]
        for human, gpt, answer in zip(conv[::2], conv[1::2], got):
            qtype = human["type"]
            if answer == gpt["value"]:
                counts[qtype, "kept"] += 1
            else:
                assert answer == syn.confused_answer(scene, qtype)
                counts[qtype, "confused"] += 1
        assert noisy.decode(s, training=False)["labels"] == clean.decode(s, training=False)["labels"]  # eval is clean
        assert noisy.decode(s, training=True)["labels"] == noisy.decode(s, training=True)["labels"]  # a fixed data set
    for qtype in ("shape", "count", "position"):
        assert counts[qtype, "confused"] == 0 and counts[qtype, "kept"] > 50
    for qtype in ("colour", "size"):
        n = counts[qtype, "confused"] + counts[qtype, "kept"]
        share = counts[qtype, "confused"] / n
        assert abs(share - rate) < 4 * (rate * (1 - rate) / n) ** 0.5, (qtype, share, n)  # 4 binomial sigmas


def test_noisy_pipeline_rejects_unknown_types_and_rates(tok) -> None:
    with pytest.raises(ValueError, match="unknown question type"):
        NoisyConversationPipeline(tok, noise_types=["color"])
    with pytest.raises(ValueError, match="noise_rate"):
        NoisyConversationPipeline(tok, noise_rate=1.5)


# ------------------------------------------------------------------------------------- the pipeline
PAIR = {"prompt": "<image>\nWhat colour is the shape?", "chosen": "It is red.", "rejected": "It is purple.", "type": "colour"}


def test_pair_ids_and_completion_only_labels_exactly(tok) -> None:
    out = PreferencePipeline(tok, num_image_tokens=3, max_length=64, image_size=16, field="preference").decode(raw(PAIR), True)
    q, c, r = (tok.encode(t) for t in ("What colour is the shape?", "It is red.", "It is purple."))
    prompt = [BOS, USER, IMAGE, IMAGE, IMAGE] + q + [END, ASSISTANT]
    assert out["prompt_ids"] == prompt
    assert out["chosen_ids"] == prompt + c + [END] and out["rejected_ids"] == prompt + r + [END]
    assert out["chosen_labels"] == [IGNORE_INDEX] * len(prompt) + c + [END]
    assert out["rejected_labels"] == [IGNORE_INDEX] * len(prompt) + r + [END]
    assert (out["answer"], out["rejected_answer"], out["question"], out["question_type"]) == (
        "It is red.", "It is purple.", "What colour is the shape?", "colour")


def test_prompt_forms_give_the_same_ids(tok) -> None:
    """TRL's conversational form, LLaVA's from/value, and a prompt without <image> (it goes in front) agree."""
    pipe = PreferencePipeline(tok, num_image_tokens=2, max_length=64, image_size=16, field=None)
    plain = pipe.decode(raw(PAIR, field=None), True)
    forms = [
        {**PAIR, "prompt": [{"role": "user", "content": "<image>\nWhat colour is the shape?"}],
         "chosen": [{"role": "assistant", "content": "It is red."}], "rejected": [{"role": "assistant", "content": "It is purple."}]},
        {**PAIR, "prompt": [{"from": "human", "value": "What colour is the shape? <image>"}]},
        {**PAIR, "prompt": "What colour is the shape?"},
    ]
    for form in forms:
        out = pipe.decode(raw(form, field=None), True)
        assert out["chosen_ids"] == plain["chosen_ids"] and out["rejected_labels"] == plain["rejected_labels"]


def test_multi_turn_prompt_supervises_the_final_completion_only(tok) -> None:
    prompt = [{"role": "user", "content": "<image>\nWhat shape is shown?"}, {"role": "assistant", "content": "A ring."},
              {"role": "user", "content": "What colour is the shape?"}]
    pipe = PreferencePipeline(tok, num_image_tokens=1, max_length=64, image_size=16, field="preference")
    out = pipe.decode(raw({**PAIR, "prompt": prompt}), True)
    assert [tok.decode(run) for run in supervised_runs(out["chosen_labels"])] == ["It is red."]
    assert tok.encode("A ring.")[0] in out["chosen_ids"] and out["question"] == "What colour is the shape?"


@pytest.mark.parametrize("pair, field, message", [
    ({"prompt": "<image> Q?", "chosen": "A."}, "preference", "no 'rejected'"),
    (PAIR, "confusion_preference", "no 'confusion_preference' field"),
    ({**PAIR, "chosen": " "}, "preference", "'chosen' is empty"),
    ({**PAIR, "rejected": "<image> It is red."}, "preference", "'rejected' holds <image>"),
    ({**PAIR, "prompt": [{"role": "assistant", "content": "Hi."}]}, "preference", "turn 0 is from the assistant"),
    ({**PAIR, "prompt": 3}, "preference", "'prompt' must be a string"),
])
def test_bad_pairs_fail_with_a_message_naming_what_is_wrong(tok, pair, field, message) -> None:
    pipe = PreferencePipeline(tok, num_image_tokens=1, max_length=64, image_size=16, field=field)
    with pytest.raises((ValueError, KeyError), match=message):
        pipe.decode(raw(pair), True)


def test_too_long_pair_is_a_bad_sample_counting_image_tokens(tok) -> None:
    n = len(PreferencePipeline(tok, 3, 64, 16, "preference").decode(raw(PAIR), True)["rejected_ids"])
    PreferencePipeline(tok, 3, n, 16, "preference").decode(raw(PAIR), True)
    with pytest.raises(ValueError, match=rf"{n + 1} tokens \(image tokens included\) exceed max_length {n}"):
        PreferencePipeline(tok, 4, n, 16, "preference").decode(raw(PAIR), True)


def test_collate_pads_both_sides_to_one_length_and_concatenates_with_the_image_repeated(tok) -> None:
    pipe = PreferencePipeline(tok, num_image_tokens=2, max_length=64, image_size=16, field="preference")
    pairs = [PAIR, {**PAIR, "prompt": "<image>\nWhich colour does the shape have?", "chosen": "It is a red one.",
                    "type": "colour"}]
    decoded = [pipe.decode(raw(p, key=f"k{i}"), False) for i, p in enumerate(pairs)]
    batch = pipe.collate(decoded)
    length = max(len(d[f"{s}_ids"]) for d in decoded for s in ("chosen", "rejected"))
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_input_ids"].shape == (2, length)
        for i, d in enumerate(decoded):
            n = len(d[f"{side}_ids"])
            assert batch[f"{side}_input_ids"][i, :n].tolist() == d[f"{side}_ids"]
            assert batch[f"{side}_attention_mask"][i].tolist() == [1] * n + [0] * (length - n)
            assert batch[f"{side}_labels"][i, n:].eq(IGNORE_INDEX).all()
    prompts = batch["prompt_input_ids"]
    assert prompts[0, -1] == ASSISTANT and prompts[1, -1] == ASSISTANT  # left-padded: every row ends at its marker
    assert batch["answers"] == ["It is red.", "It is a red one."] and batch["keys"] == ["k0", "k1"]
    both = concatenated(batch)
    assert both["input_ids"].shape == (4, length) and torch.equal(both["image"][2:], both["image"][:2])
    assert torch.equal(both["labels"][2:], batch["rejected_labels"])


def test_shapes_shards_through_the_data_module(tok, tmp_path: Path) -> None:
    from tests.vlm_fixtures import write_shapes

    specs = write_shapes(tmp_path / "shapes", train=32, val=16, test=8)
    pipe = PreferencePipeline(tok, num_image_tokens=4, max_length=96, image_size=32, field="confusion_preference")
    data = WebDataModule(train=specs["train"], val=specs["val"], pipeline=pipe, batch_size=8, num_workers=0, strict=True)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and len(batch["question_types"]) == 8
    assert all(a != r for a, r in zip(batch["answers"], batch["rejected_answers"]))


# ------------------------------------------------------------------------------ data.prepare preferences
def write_source(tmp_path: Path, rows: list[dict]) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(png_bytes(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)))
    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src, images


def test_prepare_preferences_writes_shards_the_pipeline_reads(tmp_path: Path) -> None:
    from data.prepare import main
    from mm_lightning.data.chat_tokenizer import ChatTokenizer

    rows = [{"image": "a.png" if i % 2 else "b.png", "prompt": "What colour is the shape?", "chosen": f"It is red {i}.",
             "rejected": "It is blue.", "type": "colour"} for i in range(40)]
    src, images = write_source(tmp_path, rows)
    manifest = main(["preferences", "--src", str(src), "--images", str(images), "--out", str(tmp_path / "out"),
                     "--val-fraction", "0.1", "--test-fraction", "0.1", "--image-size", "16", "--no-progress"])
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 32, "val": 4, "test": 4}
    tok = ChatTokenizer(tmp_path / "out" / "chat_tokenizer")
    pipe = PreferencePipeline(tok, num_image_tokens=1, max_length=64, image_size=16)
    data = WebDataModule(train=str(tmp_path / "out"), val=str(tmp_path / "out" / "prefs-val-*.tar"), pipeline=pipe,
                         batch_size=4, num_workers=0, strict=True)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and all(a.startswith("It is red") for a in batch["answers"])
    assert set(batch["question_types"]) == {"colour"}


@pytest.mark.parametrize("row, message", [
    ({"image": "missing.png", "prompt": "Q?", "chosen": "A.", "rejected": "B."}, "row 2: image 'missing.png' not found"),
    ({"image": "a.png", "prompt": "Q?", "chosen": "A."}, "row 2 has no 'rejected'"),
    ({"image": "a.png", "prompt": "Q?", "chosen": "A.", "rejected": "A."}, "row 2: chosen and rejected are the same"),
    ({"image": "a.png", "prompt": [{"role": "assistant", "content": "x"}], "chosen": "A.", "rejected": "B."},
     "row 2: malformed pair"),
])
def test_prepare_preferences_names_the_bad_row_and_writes_nothing(tmp_path: Path, capsys, row: dict, message: str) -> None:
    from data.prepare import main

    good = {"image": "a.png", "prompt": "Q?", "chosen": "A.", "rejected": "B."}
    src, images = write_source(tmp_path, [good, row])
    with pytest.raises(SystemExit) as exit_info:
        main(["preferences", "--src", str(src), "--images", str(images), "--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""The shapes world: determinism, and that every target derived from a scene is true of it."""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mm_lightning.data import synthetic as syn

COUNT_TOKENS = {1: {"one", "1", "single", "a", "an"}, 2: {"two", "2"}, 3: {"three", "3"}}


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return list(syn.shapes_samples(300, seed=syn.split_seed(0, "train"), image_size=32))


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def test_same_seed_gives_identical_samples() -> None:
    a = list(syn.shapes_samples(6, seed=3, image_size=32))
    b = list(syn.shapes_samples(6, seed=3, image_size=32))
    assert a == b
    assert list(syn.shapes_samples(3, seed=3, image_size=32, start=3)) == a[3:]
    assert [s["__key__"] for s in a] == [f"{i:08d}" for i in range(6)]


def test_splits_and_seeds_differ() -> None:
    seeds = {split: syn.split_seed(0, split) for split in ("train", "val", "test")}
    assert len(set(seeds.values())) == 3 and syn.split_seed(1, "train") != seeds["train"]
    pngs = {split: [s["png"] for s in syn.shapes_samples(4, seed, 32)] for split, seed in seeds.items()}
    assert not set(pngs["train"]) & set(pngs["val"]) and not set(pngs["train"]) & set(pngs["test"])


@pytest.mark.parametrize("size", [32, 64, 224])
def test_renders_at_any_size_with_the_same_scene(size: int) -> None:
    sample = syn.make_sample(5, seed=0, image_size=size)
    image = Image.open(io.BytesIO(sample["png"]))
    assert image.size == (size, size) and image.mode == "RGB"
    assert sample["json"]["scene"] == syn.make_sample(5, seed=0, image_size=32)["json"]["scene"]


def test_too_small_image_size_is_refused() -> None:
    with pytest.raises(ValueError, match="image_size"):
        syn.make_sample(0, seed=0, image_size=8)


def test_sample_members(samples: list[dict]) -> None:
    for s in samples[:20]:
        assert set(s) == {"__key__", "png", "cls", "txt", "json"}
        assert s["cls"] == syn.CLASS_NAMES.index(s["json"]["scene"]["shape"])
        assert set(s["json"]) == {"scene", "captions", "conversations", "preference", "confusion_preference"}
        assert s["txt"] in s["json"]["captions"] and s["json"]["captions"] == syn.all_captions(s["json"]["scene"])


def test_class_balance_and_attribute_spread(samples: list[dict]) -> None:
    labels = Counter(s["cls"] for s in samples)
    assert labels == {c: 50 for c in range(len(syn.CLASS_NAMES))}  # exact: permuted blocks of 6
    scenes = [s["json"]["scene"] for s in samples]
    for key, values in (("colour", syn.COLOURS), ("size", syn.SIZES), ("count", syn.COUNTS)):
        counts = Counter(sc[key] for sc in scenes)
        expected = len(scenes) / len(values)
        assert set(counts) == set(values) and all(0.6 * expected < n < 1.4 * expected for n in counts.values())


def test_objects_inside_image_and_disjoint() -> None:
    rng = np.random.default_rng(0)
    for _ in range(1500):
        scene = syn.sample_scene(rng)
        objs = scene["objects"]
        assert len(objs) == scene["count"]
        for o in objs:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 < x0 < x1 < 1 and 0 < y0 < y1 < 1
            lo, hi = syn.SIZE_RANGE[scene["size"]]
            assert lo - 1e-3 <= o["side"] <= hi + 1e-3
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                ax0, ay0, ax1, ay1 = a["bbox"]
                bx0, by0, bx1, by1 = b["bbox"]
                assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0, (a, b)
        if scene["count"] == 1:
            assert scene["position"] == syn.position_word(objs[0]["x"], objs[0]["y"])
        else:
            assert scene["position"] is None


def test_crowded_layouts_fall_back_to_disjoint_quadrants() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        sides = [0.4] * 4  # too crowded for rejection sampling: exercises the quadrant fallback
        centres = syn._place(rng, sides)
        boxes = [(x - 0.2, y - 0.2, x + 0.2, y + 0.2) for x, y in centres]
        assert all(0 < v < 1 for box in boxes for v in box)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_rendered_pixels_lie_inside_their_boxes(samples: list[dict]) -> None:
    for s in samples[:60]:
        scene = s["json"]["scene"]
        mask = syn.object_mask(scene, 32)
        inside = np.zeros_like(mask, dtype=bool)
        for o in scene["objects"]:
            x0, y0, x1, y1 = (int(np.floor(v * 32)) for v in o["bbox"])
            inside[y0:y1 + 1, x0:x1 + 1] = True
            assert mask[y0:y1 + 1, x0:x1 + 1].sum() > 4  # every object is drawn
        assert not mask[~inside].any()
        pixels = np.asarray(Image.open(io.BytesIO(s["png"])), np.float32)
        solid = pixels[mask > 0.99].mean(0)  # the objects carry the scene's colour
        assert np.abs(solid - syn.COLOUR_RGB[scene["colour"]]).max() < 30


def test_position_word() -> None:
    assert syn.position_word(0.5, 0.52) == "center"
    assert syn.position_word(0.2, 0.45) == "left" and syn.position_word(0.8, 0.6) == "right"
    assert syn.position_word(0.45, 0.2) == "top" and syn.position_word(0.55, 0.85) == "bottom"


def test_captions_name_shape_colour_and_count(samples: list[dict]) -> None:
    assert len(syn.CAPTION_TEMPLATES) >= 5
    for s in samples:
        scene = s["json"]["scene"]
        captions = syn.all_captions(scene)
        assert s["txt"] in captions and len(set(captions)) == len(captions)
        noun = scene["shape"] if scene["count"] == 1 else syn.PLURALS[scene["shape"]]
        wrong_counts = set().union(*(COUNT_TOKENS[c] for c in syn.COUNTS if c != scene["count"])) - {"a", "an"}
        for text in captions:
            w = words(text)
            assert noun in w and scene["colour"] in w, text
            assert w & COUNT_TOKENS[scene["count"]] and not w & wrong_counts, text
            others = set(syn.CLASS_NAMES) | set(syn.PLURALS.values()) | set(syn.COLOURS)
            assert not w & (others - {noun, scene["colour"]}), text
            assert " a a" not in f" {text}" and not re.search(r"\ba [aeiou]", text), text


def test_plural_forms() -> None:
    scene = {"shape": "cross", "colour": "red", "size": "small", "count": 2}
    assert "two small red crosses" in syn.all_captions(scene)
    assert "one small red cross" in syn.all_captions({**scene, "count": 1})


def test_conversations_are_llava_format_and_true(samples: list[dict]) -> None:
    rounds = Counter()
    for s in samples:
        scene, conv = s["json"]["scene"], s["json"]["conversations"]
        assert len(conv) in (4, 6)
        rounds[len(conv) // 2] += 1
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1
        asked = []
        for human, gpt in zip(conv[::2], conv[1::2]):
            q = human["value"].removeprefix("<image>\n")
            qtype = next(t for t, (one, many) in syn.QUESTIONS.items() if q in one + many)
            assert human["type"] == qtype and "type" not in gpt  # the question's type travels with it
            asked.append(qtype)
            assert gpt["value"] == syn.answer(scene, qtype)
            assert qtype != "position" or scene["count"] == 1
        assert len(set(asked)) == len(asked)
        assert ("position" in asked) == (scene["count"] == 1)  # every single-object scene is asked where it is
    assert set(rounds) == {2, 3}


def test_every_question_type_and_answer_is_common(samples: list[dict]) -> None:
    """Position (askable of single-object scenes only) is asked in a third of the samples, the others in about
    half; every answer value of every type appears (a model can learn each)."""
    asked, answers = Counter(), {t: Counter() for t in syn.QUESTION_TYPES}
    for s in samples:
        for human, gpt in zip(s["json"]["conversations"][::2], s["json"]["conversations"][1::2]):
            asked[human["type"]] += 1
            answers[human["type"]][gpt["value"]] += 1
    n = len(samples)
    assert asked["position"] == sum(s["json"]["scene"]["count"] == 1 for s in samples) > 0.25 * n
    assert all(0.45 * n < asked[t] < 0.65 * n for t in ("shape", "colour", "count", "size"))
    assert {len(answers[t]) for t in ("shape", "colour")} == {12} and len(answers["size"]) == 4  # singular + plural
    assert set(answers["count"]) == {"There is one.", "There are two.", "There are three."}
    assert set(answers["position"]) == set(syn.POSITION_ANSWERS.values())


def test_answers() -> None:
    one = {"shape": "ring", "colour": "blue", "size": "large", "count": 1, "position": "left"}
    many = {**one, "count": 3, "position": None}
    assert syn.answer(one, "shape") == "A ring." and syn.answer(many, "shape") == "Rings."
    assert syn.answer(one, "colour") == "It is blue." and syn.answer(many, "colour") == "They are blue."
    assert syn.answer(one, "count") == "There is one." and syn.answer(many, "count") == "There are three."
    assert syn.answer(many, "size") == "They are large." and syn.answer(one, "position") == "On the left."
    with pytest.raises(ValueError, match="position"):
        syn.answer(many, "position")


def test_preference_pairs(samples: list[dict]) -> None:
    types = Counter()
    for s in samples:
        scene, pref = s["json"]["scene"], s["json"]["preference"]
        assert {"prompt", "chosen", "rejected"} <= set(pref)
        assert pref["prompt"].startswith("<image>\n") and pref["prompt"].count("<image>") == 1
        assert pref["chosen"] == syn.answer(scene, pref["type"]) != pref["rejected"]
        assert pref["prompt"].removeprefix("<image>\n") in sum(syn.QUESTIONS[pref["type"]], ())
        values = {"shape": syn.CLASS_NAMES, "colour": syn.COLOURS, "count": syn.COUNTS, "size": syn.SIZES,
                  "position": syn.POSITIONS}[pref["type"]]
        wrong = [v for v in values if v != scene[pref["type"]]]
        assert pref["rejected"] in {syn.answer({**scene, pref["type"]: v}, pref["type"]) for v in wrong}
        types[pref["type"]] += 1
    assert set(types) == set(syn.QUESTION_TYPES)

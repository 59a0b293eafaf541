"""The procedural "shapes" world: coloured shapes on noisy backgrounds, drawn from a seed.

One scene holds 1-3 non-overlapping objects of ONE shape kind, ONE colour and ONE size.
From the same scene come every task's targets: the class label (the shape kind), captions
(CLIP), LLaVA-style conversations (instruction tuning) and two preference pairs (DPO, reward models):
``preference`` (the correct answer against a random wrong one) and ``confusion_preference`` (against
the *systematic* wrong answer of :data:`CONFUSIONS`, the one a consistently confused annotator or
model gives, as in the noisy-SFT demonstration of :mod:`mm_lightning.data.noisy`). Sample
``index`` of a split with seed ``seed`` is a pure function of ``(seed, index, image_size)``
(the scene does not depend on ``image_size``), so shards can be regenerated, or a sample
recomputed, from the seed alone.

Coordinates are normalised to [0, 1]: ``x`` grows to the right, ``y`` grows downwards (top = 0).
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

#: Bumped whenever the samples drawn from a seed change (``data.prepare`` regenerates stale built-in shards).
VERSION = 4

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring")
PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "cross": "crosses", "diamond": "diamonds", "ring": "rings",
}
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (235, 45, 45), "green": (50, 210, 70), "blue": (45, 95, 245),
    "yellow": (240, 220, 45), "purple": (165, 60, 225), "white": (240, 240, 240),
}
SIZES: tuple[str, ...] = ("small", "large")
# Side of an object's bounding box as a fraction of the image side: (min, max) per size.
SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (0.27, 0.31), "large": (0.38, 0.42)}
COUNTS: tuple[int, ...] = (1, 2, 3)
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
QUESTION_TYPES: tuple[str, ...] = ("shape", "colour", "count", "size", "position")
SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}

# (singular, plural) caption templates. Every one names the shape, the colour and the count.
CAPTION_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("one {size} {colour} {shape}", "{num} {size} {colour} {shapes}"),
    ("a photo of 1 {colour} {shape} on a noisy background", "a photo of {digit} {colour} {shapes} on a noisy background"),
    ("an image showing a single {size} {colour} {shape}", "an image showing {size} {colour} {shapes}, {num} of them"),
    ("there is one {colour} {shape} in the picture", "there are {num} {colour} {shapes} in the picture"),
    ("a {size} {colour} {shape} on a dark background", "{num} {size} {colour} {shapes} on a dark background"),
    ("a photo of a {colour} {shape}", "a photo of {num} {colour} {shapes}"),
)
# Question paraphrases per type: (asked of one object, asked of several).
QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "shape": (("What shape is shown?", "Which shape appears in the image?", "What kind of shape do you see?"),) * 2,
    "colour": (("What colour is the shape?", "Which colour does the shape have?"),
               ("What colour are the shapes?", "Which colour do the shapes have?")),
    "count": (("How many shapes are there?", "How many objects are in the image?", "Count the shapes."),) * 2,
    "size": (("Is the shape small or large?",), ("Are the shapes small or large?",)),
    "position": (("Where is the shape?", "Where in the image is the shape?"),) * 2,
}
POSITION_ANSWERS: dict[str, str] = {
    "left": "On the left.", "right": "On the right.", "top": "At the top.",
    "bottom": "At the bottom.", "center": "In the center.",
}
#: The plausible wrong value a systematically confused annotator (or model) gives for each true value, per
#: question type: look-alike shapes, neighbouring colours, the opposite size or side, one more (or fewer) object.
CONFUSIONS: dict[str, dict[Any, Any]] = {
    "shape": {"circle": "ring", "ring": "circle", "square": "diamond", "diamond": "square",
              "triangle": "cross", "cross": "triangle"},
    "colour": {"red": "purple", "purple": "red", "green": "yellow", "yellow": "green", "blue": "white", "white": "blue"},
    "count": {1: 2, 2: 3, 3: 2},
    "size": {"small": "large", "large": "small"},
    "position": {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"},
}
_MARGIN = 0.03  # gap between an object and the image border (fraction of the side)
_GAP = 0.04  # minimum gap between the bounding boxes of two objects


def split_seed(seed: int, split: str) -> int:
    """A seed for ``split`` derived from the data set ``seed``; splits never share a random stream."""
    code = SPLIT_CODES.get(split, zlib.crc32(split.encode()))
    return int(np.random.SeedSequence([seed, 7919, code]).generate_state(1)[0])


def position_word(x: float, y: float) -> str:
    """Coarse position of a point: ``center`` near the middle, else the dominant direction."""
    dx, dy = x - 0.5, y - 0.5
    if max(abs(dx), abs(dy)) < 0.1:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _place(rng: np.random.Generator, sides: list[float]) -> list[tuple[float, float]]:
    """Centres for boxes of the given sides, inside the image and with gaps between them.

    One object goes into a zone of a random position word (so that word is unambiguous);
    several are placed by rejection sampling, with a 2x2-cell layout as a fallback.
    """
    if len(sides) == 1:
        lo, hi = sides[0] / 2 + _MARGIN, 1 - sides[0] / 2 - _MARGIN
        word = POSITIONS[int(rng.integers(len(POSITIONS)))]
        along, across = rng.uniform(0, 0.06), rng.uniform(-0.06, 0.06)
        if word == "center":
            return [(0.5 + rng.uniform(-0.04, 0.04), 0.5 + rng.uniform(-0.04, 0.04))]
        edge = {"left": lo + along, "top": lo + along, "right": hi - along, "bottom": hi - along}[word]
        return [(edge, 0.5 + across)] if word in ("left", "right") else [(0.5 + across, edge)]
    for _ in range(50):
        centres: list[tuple[float, float]] = []
        for side in sides:
            lo, hi = side / 2 + _MARGIN, 1 - side / 2 - _MARGIN
            for _ in range(30):
                cx, cy = rng.uniform(lo, hi, size=2)
                if all(abs(cx - ox) >= (side + os_) / 2 + _GAP or abs(cy - oy) >= (side + os_) / 2 + _GAP
                       for (ox, oy), os_ in zip(centres, sides)):
                    centres.append((float(cx), float(cy)))
                    break
            else:
                break
        if len(centres) == len(sides):
            return centres
    # Fallback (rare): one object per quadrant, jittered only as far as margins and gaps allow.
    jitter = max(0.0, min(0.25 - max(sides) / 2 - _MARGIN, (0.5 - max(sides) - _GAP) / 2))
    cells = rng.permutation(4)[: len(sides)]
    return [(0.25 + 0.5 * (c % 2) + rng.uniform(-jitter, jitter), 0.25 + 0.5 * (c // 2) + rng.uniform(-jitter, jitter))
            for c in cells]


def sample_scene(rng: np.random.Generator, label: int | None = None) -> dict[str, Any]:
    """Draw a scene: shape kind (``label`` if given), colour, size, count and object layout."""
    label = int(rng.integers(len(CLASS_NAMES))) if label is None else int(label)
    shape, colour = CLASS_NAMES[label], COLOURS[int(rng.integers(len(COLOURS)))]
    size, count = SIZES[int(rng.integers(len(SIZES)))], COUNTS[int(rng.integers(len(COUNTS)))]
    sides = [float(rng.uniform(*SIZE_RANGE[size])) for _ in range(count)]
    objects = []
    for (cx, cy), side in zip(_place(rng, sides), sides):
        box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
        objects.append({"shape": shape, "colour": colour, "size": size, "x": round(cx, 4), "y": round(cy, 4),
                        "side": round(side, 4), "bbox": [round(v, 4) for v in box],
                        "position": position_word(cx, cy)})
    return {"shape": shape, "label": label, "colour": colour, "size": size, "count": count,
            "position": objects[0]["position"] if count == 1 else None, "objects": objects}


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float) -> None:
    h = side / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "square":
        s = 0.9 * h  # a little smaller than its box so it does not look much bigger than a circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=255)
    elif shape == "cross":
        t = 0.13 * side  # thin arms: a plus sign, not a blob, even when small
        draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=255)
        draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=255)
    elif shape == "diamond":
        w = 0.78 * h  # taller than wide, like a playing-card diamond: unlike a circle or a square
        draw.polygon([(cx, cy - h), (cx + w, cy), (cx, cy + h), (cx - w, cy)], fill=255)
    elif shape == "ring":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=255)
        draw.ellipse([cx - 0.5 * h, cy - 0.5 * h, cx + 0.5 * h, cy + 0.5 * h], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(CLASS_NAMES)}")


def object_mask(scene: dict[str, Any], image_size: int) -> np.ndarray:
    """Coverage of each pixel by the scene's objects, float32 (H, W) in [0, 1], anti-aliased.

    Objects are drawn on a supersampled mask and box-filtered down to ``image_size``.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels for shapes to be recognisable, got {image_size}")
    ss = max(2, min(4, 256 // image_size))
    big = image_size * ss
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for obj in scene["objects"]:
        _draw_object(draw, obj["shape"], obj["x"] * big, obj["y"] * big, obj["side"] * big)
    return np.asarray(mask.resize((image_size, image_size), Image.Resampling.BOX), np.float32) / 255


def render_scene(scene: dict[str, Any], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render ``scene`` as an RGB image of ``image_size`` pixels a side.

    The objects (:func:`object_mask`) are painted in the scene's colour (slightly jittered) over
    a dark random background level with a faint tint and gradient, plus pixel noise over all.
    """
    alpha = object_mask(scene, image_size)[..., None]
    ramp = np.linspace(-0.5, 0.5, image_size, dtype=np.float32)
    angle, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(0, 25)
    gradient = amplitude * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    background = rng.uniform(10, 60) + rng.uniform(-10, 10, size=3).astype(np.float32) + gradient[..., None]
    colour = np.asarray(COLOUR_RGB[scene["colour"]], np.float32) + rng.uniform(-12, 12, size=3).astype(np.float32)
    image = background * (1 - alpha) + colour * alpha
    image += np.float32(rng.uniform(3, 10)) * rng.standard_normal(image.shape, dtype=np.float32)
    return Image.fromarray(np.clip(image + 0.5, 0, 255).astype(np.uint8), "RGB")


def _fill(template: str, scene: dict[str, Any]) -> str:
    text = template.format(shape=scene["shape"], shapes=PLURALS[scene["shape"]], colour=scene["colour"],
                           size=scene["size"], num=COUNT_WORDS[scene["count"]], digit=scene["count"])
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def all_captions(scene: dict[str, Any]) -> list[str]:
    """The scene's caption in every template (e.g. for caption ensembles or retrieval targets)."""
    form = 0 if scene["count"] == 1 else 1
    return [_fill(pair[form], scene) for pair in CAPTION_TEMPLATES]


def caption(scene: dict[str, Any], rng: np.random.Generator) -> str:
    """One caption of the scene, in a template drawn by ``rng``."""
    return all_captions(scene)[int(rng.integers(len(CAPTION_TEMPLATES)))]


def question_types(scene: dict[str, Any]) -> tuple[str, ...]:
    """The question types a scene can answer (position only when it holds one object)."""
    return QUESTION_TYPES if scene["count"] == 1 else QUESTION_TYPES[:-1]


def question(scene: dict[str, Any], qtype: str, rng: np.random.Generator) -> str:
    """A paraphrase of a ``qtype`` question fitting the scene's number (one object or several)."""
    options = QUESTIONS[qtype][0 if scene["count"] == 1 else 1]
    return options[int(rng.integers(len(options)))]


def answer(scene: dict[str, Any], qtype: str) -> str:
    """The short deterministic answer to a ``qtype`` question about the scene."""
    one = scene["count"] == 1
    if qtype == "shape":
        return f"A {scene['shape']}." if one else f"{PLURALS[scene['shape']].capitalize()}."
    if qtype == "colour":
        return f"{'It is' if one else 'They are'} {scene['colour']}."
    if qtype == "count":
        return f"There {'is' if one else 'are'} {COUNT_WORDS[scene['count']]}."
    if qtype == "size":
        return f"{'It is' if one else 'They are'} {scene['size']}."
    if qtype == "position":
        if not one:
            raise ValueError("position questions need a scene with exactly one object")
        return POSITION_ANSWERS[scene["position"]]
    raise ValueError(f"unknown question type {qtype!r}; known: {', '.join(QUESTION_TYPES)}")


def conversation(scene: dict[str, Any], rng: np.random.Generator) -> list[dict[str, str]]:
    """A LLaVA-format conversation of 2-3 rounds; ``<image>`` opens the first human turn only.

    Each human turn carries its question ``type``. The types of a conversation are distinct; a
    single-object scene (the only kind that has a position) always gets one position question,
    in a random round, so that position is asked in a third of all samples instead of a sixth
    (shape, colour, count and size: 54% each), and every answer value of every type is common.
    """
    types = list(question_types(scene))
    rounds = int(rng.integers(2, 4))
    if "position" in types:
        others = types[:-1]
        picked = ["position"] + [others[int(i)] for i in rng.choice(len(others), size=rounds - 1, replace=False)]
        picked = [picked[int(i)] for i in rng.permutation(rounds)]
    else:
        picked = [types[int(i)] for i in rng.choice(len(types), size=rounds, replace=False)]
    turns: list[dict[str, str]] = []
    for i, qtype in enumerate(picked):
        q = question(scene, qtype, rng)
        turns.append({"from": "human", "value": f"<image>\n{q}" if i == 0 else q, "type": qtype})
        turns.append({"from": "gpt", "value": answer(scene, qtype)})
    return turns


def preference_pair(scene: dict[str, Any], rng: np.random.Generator) -> dict[str, str]:
    """A DPO pair: the correct answer and a plausible wrong one of the same form.

    The wrong answer is the answer for the same scene with the asked attribute changed
    (another colour, shape, count, size or position).
    """
    types = question_types(scene)
    qtype = types[int(rng.integers(len(types)))]
    choices = {"shape": CLASS_NAMES, "colour": COLOURS, "count": COUNTS, "size": SIZES, "position": POSITIONS}[qtype]
    wrong = [c for c in choices if c != scene[qtype]]
    wrong_value = wrong[int(rng.integers(len(wrong)))]
    chosen = answer(scene, qtype)
    rejected = answer({**scene, qtype: wrong_value}, qtype)
    return {"prompt": f"<image>\n{question(scene, qtype, rng)}", "chosen": chosen, "rejected": rejected,
            "type": qtype}


def confused_answer(scene: dict[str, Any], qtype: str) -> str:
    """The answer to a ``qtype`` question with the asked attribute replaced by its :data:`CONFUSIONS` value."""
    return answer({**scene, qtype: CONFUSIONS[qtype][scene[qtype]]}, qtype)


def confusion_pair(scene: dict[str, Any], rng: np.random.Generator) -> dict[str, str]:
    """A DPO pair whose rejected answer is the systematic confusion (:func:`confused_answer`) of the correct one."""
    types = question_types(scene)
    qtype = types[int(rng.integers(len(types)))]
    return {"prompt": f"<image>\n{question(scene, qtype, rng)}", "chosen": answer(scene, qtype),
            "rejected": confused_answer(scene, qtype), "type": qtype}


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image`` (fast compression: the noise does not compress anyway)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def make_sample(index: int, seed: int, image_size: int = 32) -> dict[str, Any]:
    """WebDataset sample ``index`` of the stream ``seed``: png, cls, txt and json members.

    The label comes from a random permutation of the classes per block of ``len(CLASS_NAMES)``
    indices, so every prefix of a split is class-balanced to within one sample per class.
    """
    block = np.random.default_rng([seed, 104729, index // len(CLASS_NAMES)]).permutation(len(CLASS_NAMES))
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, label=int(block[index % len(CLASS_NAMES)]))
    image = render_scene(scene, image_size, rng)
    return {
        "__key__": f"{index:08d}",
        "png": encode_png(image),
        "cls": scene["label"],
        "txt": caption(scene, rng),
        "json": {"scene": scene, "captions": all_captions(scene), "conversations": conversation(scene, rng),
                 "preference": preference_pair(scene, rng), "confusion_preference": confusion_pair(scene, rng)},
    }


def shapes_samples(num_samples: int, seed: int, image_size: int = 32, start: int = 0) -> Iterator[dict[str, Any]]:
    """Samples ``start .. start + num_samples - 1`` of the stream ``seed`` (see :func:`split_seed`)."""
    for index in range(start, start + num_samples):
        yield make_sample(index, seed, image_size)

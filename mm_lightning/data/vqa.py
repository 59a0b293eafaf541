"""VQA answer scoring: normalisation, exact match, and per-question-type accuracy. Pure functions.

Hand-written rather than torchmetrics (which has no VQA answer normalisation); the rules follow
the VQA evaluation's spirit in a small, predictable form:

``normalize_answer``: lower-case; ``1,000`` -> ``1000``; every punctuation mark becomes a space
(except a decimal point between digits); the articles *a*, *an*, *the* are dropped; number words
*zero* ... *twenty* become digits (one way only: ``"three"`` and ``"3"`` both normalise to ``"3"``);
whitespace collapses. So ``"There are three."`` == ``"there are 3"`` and ``"A ring."`` == ``"ring"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

NUMBER_WORDS = {
    word: str(i) for i, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split())
}
ARTICLES = frozenset({"a", "an", "the"})
OVERALL = "overall"
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PUNCTUATION = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")

#: Per question type: ``(correct, total)``.
Counts = dict[str, tuple[int, int]]


def normalize_answer(text: str) -> str:
    """The canonical form of an answer (see the module docstring for the rules)."""
    text = _PUNCTUATION.sub(" ", _THOUSANDS.sub("", text.lower()))
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def exact_match(prediction: str, reference: str | Sequence[str]) -> bool:
    """Whether ``prediction`` equals ``reference`` (or any of several references) after :func:`normalize_answer`."""
    references = [reference] if isinstance(reference, str) else list(reference)
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(r) for r in references)


def match_counts(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                 question_types: Sequence[str] | None = None) -> Counts:
    """``{type: (correct, total)}`` of exact matches, per question type (all ``"unknown"`` without types)."""
    types = list(question_types) if question_types is not None else ["unknown"] * len(predictions)
    if not len(predictions) == len(references) == len(types):
        raise ValueError(f"{len(predictions)} predictions, {len(references)} references and {len(types)} question types: "
                         "one of each per question")
    counts: dict[str, list[int]] = {}
    for prediction, reference, qtype in zip(predictions, references, types):
        entry = counts.setdefault(qtype, [0, 0])
        entry[0] += int(exact_match(prediction, reference))
        entry[1] += 1
    return {t: (c, n) for t, (c, n) in counts.items()}


def merge_counts(parts: Iterable[Mapping[str, Sequence[int]]]) -> Counts:
    """Sum several :data:`Counts` (batches, or ranks after a gather)."""
    total: dict[str, list[int]] = {}
    for part in parts:
        for qtype, (correct, n) in part.items():
            entry = total.setdefault(qtype, [0, 0])
            entry[0] += int(correct)
            entry[1] += int(n)
    return {t: (c, n) for t, (c, n) in total.items()}


def accuracy_by_type(counts: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """``{"overall": accuracy over all questions, type: accuracy, ...}`` (types with no question left out)."""
    out: dict[str, float] = {}
    correct = sum(int(c) for c, _ in counts.values())
    total = sum(int(n) for _, n in counts.values())
    if total:
        out[OVERALL] = correct / total
    for qtype in sorted(counts):
        c, n = counts[qtype]
        if n:
            out[qtype] = int(c) / int(n)
    return out

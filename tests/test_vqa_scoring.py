"""VQA scoring: answer normalisation, exact match and per-type accuracy on hand-written cases."""

from __future__ import annotations

import pytest

from mm_lightning.data.vqa import accuracy_by_type, exact_match, match_counts, merge_counts, normalize_answer


@pytest.mark.parametrize("text, expected", [
    ("There are three.", "there are 3"),
    ("There are 3", "there are 3"),
    ("A ring.", "ring"),
    ("The  Ring!", "ring"),
    ("an apple, a pear", "apple pear"),
    ("It is RED.", "it is red"),
    ("On the left.", "on left"),
    ("twenty-one", "20 1"),
    ("1,000 people", "1000 people"),
    ("3.5 metres", "3.5 metres"),
    ("Yes.", "yes"),
    ("  \n", ""),
    ("another one", "another 1"),  # words are matched whole: "another" keeps its "an"
    ("don't", "don t"),
    ("snake_case", "snake case"),
])
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("prediction, reference, match", [
    ("There are three.", "There are 3.", True),
    ("there are three", "There are three.", True),
    ("A ring.", "ring", True),
    ("Rings.", "A ring.", False),  # plural is another answer
    ("There are two.", "There are three.", False),
    ("It is red", "It is red.", True),
    ("It is red.", "It is reddish.", False),
    ("On the left.", "On the right.", False),
    ("", "A ring.", False),
    ("3", ["three", "four"], True),
    ("4", ["three", "four"], True),  # any reference counts
    ("5", ["three", "four"], False),
])
def test_exact_match(prediction: str, reference, match: bool) -> None:
    assert exact_match(prediction, reference) is match


def test_counts_and_accuracy_per_type() -> None:
    predictions = ["A ring.", "It is blue.", "There are two.", "There is one.", "On the left."]
    references = ["A ring.", "It is red.", "There are 2", "There are three.", "On the left"]
    types = ["shape", "colour", "count", "count", "position"]
    counts = match_counts(predictions, references, types)
    assert counts == {"shape": (1, 1), "colour": (0, 1), "count": (1, 2), "position": (1, 1)}
    assert accuracy_by_type(counts) == {"overall": 3 / 5, "colour": 0.0, "count": 0.5, "position": 1.0, "shape": 1.0}
    merged = merge_counts([counts, {"count": (2, 2), "size": (0, 3)}])
    assert merged == {"shape": (1, 1), "colour": (0, 1), "count": (3, 4), "position": (1, 1), "size": (0, 3)}
    acc = accuracy_by_type(merged)
    assert acc["overall"] == 5 / 10 and acc["size"] == 0.0 and acc["count"] == 0.75  # overall: per question, not per type
    assert accuracy_by_type({}) == {} and match_counts(["x"], ["x"]) == {"unknown": (1, 1)}


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError, match="2 predictions, 1 references and 2 question types"):
        match_counts(["a", "b"], ["a"], ["shape", "shape"])

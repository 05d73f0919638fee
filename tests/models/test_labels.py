"""Class names to indices: ImageNet's id2label names (commas, synonyms, clashes) and the shipped model's."""

import pytest

from app.models import class_lookup, resolve_label

# Real id2label entries, at their real indices' relative order: 0, 1, 134, 517, 638, 639.
IMAGENET = [
    "tench, Tinca tinca",
    "goldfish, Carassius auratus",
    "crane",
    "crane",
    "maillot",
    "maillot, tank suit",
    "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.mark.parametrize(
    "value, index",
    [
        ("tench", 0),
        ("Tinca tinca", 0),
        ("tench, Tinca tinca", 0),  # the full name
        ("  TENCH ", 0),
        ("tinca   TINCA", 0),  # whitespace collapsed, any case
        ("Carassius auratus", 1),
        ("man-eater", 6),
        ("maillot", 4),  # a full name outranks the other class's synonym
        ("tank suit", 5),
        (5, 5),
        ("5", 5),
    ],
)
def test_names_synonyms_and_indices_resolve(value, index):
    assert resolve_label(value, IMAGENET) == index


def test_a_name_of_two_classes_asks_for_the_index():
    with pytest.raises(ValueError, match=r"'Crane' names more than one class: 2 \('crane'\), 3 \('crane'\)"):
        resolve_label("Crane", IMAGENET)
    assert "crane" not in class_lookup(IMAGENET)


def test_lookup_holds_every_unambiguous_key():
    lookup = class_lookup(IMAGENET)
    assert lookup["tench"] == lookup["tinca tinca"] == lookup["tench, tinca tinca"] == 0
    assert lookup["white shark"] == 6 and lookup["maillot"] == 4 and lookup["tank suit"] == 5


def test_the_shipped_models_names_resolve_as_before():
    assert resolve_label("ankle BOOT", FASHION) == 9
    assert resolve_label("t-shirt/top", FASHION) == 0
    assert resolve_label(9, FASHION) == 9


@pytest.mark.parametrize("value", [10, -1, "10", True, 2.0, None])
def test_out_of_range_and_wrong_types_are_refused(value):
    with pytest.raises(ValueError, match=r"0\.\.9"):
        resolve_label(value, FASHION)


def test_unknown_names_list_a_few_known_ones():
    with pytest.raises(ValueError, match="unknown class 'Sneakers'; did you mean 'sneaker'") as err:
        resolve_label("Sneakers", FASHION)
    assert "known classes: T-shirt/top, Trouser" in str(err.value)  # ten names: all of them
    many = [f"class {i}" for i in range(1000)]
    with pytest.raises(ValueError, match=r"known classes \(1000, or an index 0\.\.999\) include 'class 0',") as err:
        resolve_label("zebra", many)
    assert len(str(err.value)) < 300  # a few names, not a thousand

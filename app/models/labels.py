"""Class names to label indices: by index, by name, or by any comma-separated synonym, case-insensitively.

ImageNet's id2label names class 0 "tench, Tinca tinca"; as in DiTPipeline.get_label_ids, each synonym names
its class, so "tench" and "Tinca tinca" both reach 0. Two choices differ from get_label_ids, where the later
class silently wins a shared key: a full name outranks another class's synonym (ImageNet's 638 is "maillot"
and 639 "maillot, tank suit": "maillot" is 638), and a key that still names two classes (ImageNet's "crane",
134 and 517) resolves to neither, with a message that asks for the index.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from dataclasses import dataclass


def label_key(text: str) -> str:
    """The form names are compared in: case-folded, whitespace collapsed."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True)
class _Tables:
    lookup: dict[str, int]  # every unambiguous key
    ambiguous: dict[str, tuple[int, ...]]  # keys that name two or more classes


@functools.lru_cache(maxsize=16)
def _tables(class_names: tuple[str, ...]) -> _Tables:
    full: dict[str, set[int]] = {}
    synonyms: dict[str, set[int]] = {}
    for index, name in enumerate(class_names):
        full.setdefault(label_key(name), set()).add(index)
        for part in name.split(","):
            if label_key(part):
                synonyms.setdefault(label_key(part), set()).add(index)
    lookup: dict[str, int] = {}
    ambiguous: dict[str, tuple[int, ...]] = {}
    for key in {**synonyms, **full}:
        indices = full.get(key) or synonyms[key]  # a full name outranks synonyms
        if len(indices) == 1:
            lookup[key] = next(iter(indices))
        else:
            ambiguous[key] = tuple(sorted(indices))
    return _Tables(lookup, ambiguous)


def class_lookup(class_names: Sequence[str]) -> dict[str, int]:
    """Every key that names exactly one class (its full name and each comma-separated synonym, in
    label_key form) -> that class's index."""
    return dict(_tables(tuple(class_names)).lookup)


def resolve_label(value: int | str, class_names: Sequence[str]) -> int:
    """A class index, or a class name or synonym in any case, to the class index; ValueError otherwise.

    A string of digits that names no class is read as an index ("7" -> 7)."""
    count = len(class_names)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"a class is an index 0..{count - 1} or a class name, not {value!r}")
    if isinstance(value, int):
        if not 0 <= value < count:
            raise ValueError(f"class index must be in 0..{count - 1}, not {value}")
        return value
    tables = _tables(tuple(class_names))
    key = label_key(value)
    if key in tables.lookup:
        return tables.lookup[key]
    if key in tables.ambiguous:
        named = ", ".join(f"{i} ({class_names[i]!r})" for i in tables.ambiguous[key])
        raise ValueError(f"{value!r} names more than one class: {named}; ask by index")
    if key.isdigit():
        return resolve_label(int(key), class_names)
    raise ValueError(f"unknown class {value!r}; {_known_classes_hint(key, class_names, tables)}")


def _known_classes_hint(key: str, class_names: Sequence[str], tables: _Tables, shown: int = 10) -> str:
    close = difflib.get_close_matches(key, list(tables.lookup), n=3)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    if len(class_names) <= shown:
        return hint + f"known classes: {', '.join(class_names)}"
    listed = ", ".join(repr(n) for n in class_names[:shown])
    return hint + f"known classes ({len(class_names)}, or an index 0..{len(class_names) - 1}) include {listed}, ..."

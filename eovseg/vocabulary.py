"""Vocabulary handling shared by the model and the processor.

A *vocabulary* is a list of class entries. Each entry is one string of comma-separated synonyms,
for example ``"person, child, girl, boy"``. Every synonym is put into each of the prompt templates
below; the text embeddings of one synonym are averaged over the templates, and a class scores the
maximum over its synonyms.
"""

from __future__ import annotations

from collections.abc import Sequence

# The 14 prompt templates of ViLD that EOV-Seg ensembles over (order matters for reproducibility:
# embeddings are reshaped as (synonyms, templates, dim)).
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


class VocabularyError(ValueError):
    """Raised for a vocabulary that cannot be used (empty, duplicated, not strings)."""


def validate_vocabulary(class_names, what: str = "vocabulary") -> list[str]:
    """Check that `class_names` is a non-empty list of distinct, non-empty strings and return it as a list."""
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise VocabularyError(
            f"The {what} must be a list of class-name strings, got {type(class_names).__name__}."
        )
    class_names = list(class_names)
    if len(class_names) == 0:
        raise VocabularyError(f"The {what} is empty: give at least one class name.")
    bad = [(i, c) for i, c in enumerate(class_names) if not isinstance(c, str)]
    if bad:
        i, c = bad[0]
        raise VocabularyError(
            f"The {what} must contain only strings; entry {i} is {type(c).__name__} ({c!r})."
        )
    for i, name in enumerate(class_names):
        synonyms = split_synonyms(name)
        if not synonyms or any(not s.strip() for s in synonyms):
            raise VocabularyError(f"Entry {i} of the {what} ({name!r}) has no class name in it, or an empty synonym.")
    seen: dict[str, int] = {}
    for i, name in enumerate(class_names):
        key = name.strip()
        if key in seen:
            raise VocabularyError(
                f"The {what} has a duplicate class name {name!r} (entries {seen[key]} and {i})."
            )
        seen[key] = i
    return class_names


_FLAG_VALUES = {"true": True, "false": False, "1": True, "0": False}


def parse_flag(value, what: str) -> bool:
    """A yes/no flag from a JSON file or a command line: a JSON boolean, 0/1, or "true"/"false"/"0"/"1" (any case).
    Anything else (`"yes"`, `"no"`, `2`) is refused: `bool("no")` is True, so guessing would flip the user's flag."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _FLAG_VALUES:
        return _FLAG_VALUES[value.strip().lower()]
    raise VocabularyError(f"{what} is {value!r}; a flag must be true/false or 1/0.")


def parse_flags(values, what: str) -> list[bool]:
    """`parse_flag` on every entry of a list (the error names the entry)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise VocabularyError(f"{what} must be a list of true/false flags, got {type(values).__name__} ({values!r}).")
    return [parse_flag(v, f"{what} entry {i}") for i, v in enumerate(values)]


def split_synonyms(class_name: str) -> list[str]:
    """Split a class entry into its synonyms, as the original does (``", "`` and ``","`` separate)."""
    return [s for s in class_name.replace(", ", ",").split(",") if s != ""]


def synonym_counts(class_names: Sequence[str]) -> list[int]:
    """Number of synonyms of each class entry."""
    return [len(split_synonyms(name)) for name in class_names]


def build_prompts(class_names: Sequence[str], templates: Sequence[str] = PROMPT_TEMPLATES) -> list[str]:
    """All prompts of a vocabulary: for each class, for each synonym, for each template."""
    return [template.format(synonym) for name in class_names for synonym in split_synonyms(name) for template in templates]


def seen_class_mask(class_names: Sequence[str], train_class_names: Sequence[str]) -> list[bool]:
    """Whether each class is *seen* in training: any of its synonyms is a synonym of a training class."""
    train_synonyms = {s for name in train_class_names for s in split_synonyms(name)}
    return [not train_synonyms.isdisjoint(split_synonyms(name)) for name in class_names]


def display_name(class_name: str) -> str:
    """The label shown to users for a class entry: its first synonym."""
    synonyms = split_synonyms(class_name)
    return synonyms[0].strip() if synonyms else class_name

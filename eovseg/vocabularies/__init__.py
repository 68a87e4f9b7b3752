"""Built-in vocabularies: the class lists the original EOV-Seg evaluates on, and vocabularies built from a user's list.

    from eovseg.vocabularies import get_vocabulary, list_vocabularies, build_vocabulary

    list_vocabularies()                      # ['ade20k_150', 'ade20k_847', 'cityscapes', 'coco_panoptic', ...]
    ade = get_vocabulary("ade20k_150")       # 150 classes: ade.class_names, ade.is_thing, ade.dataset_ids, ade.colors
    mine = build_vocabulary(["car", "road, street", "sky"], stuff=["road", "sky"])

A vocabulary *name* is accepted wherever a class list is: `processor(text="ade20k_150")`, the pipelines
(`candidate_labels="ade20k_150"`), the demo and the command-line tools (`--vocabulary NAME|FILE`), conversion, training
and evaluation. [`load_vocabulary`] is the one place that turns such a specification (a name, a file or a list) into a
[`Vocabulary`].

The JSON files in this folder are data (the datasets' class names with prompt-engineered synonyms, dataset ids, thing
flags and colours) from the original repository; see `ATTRIBUTION.md`. Their entries are kept exactly as the original
has them, so the prompts tokenize to the original's ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..vocabulary import VocabularyError, display_name, parse_flag, parse_flags, validate_vocabulary

__all__ = [
    "Vocabulary",
    "build_vocabulary",
    "get_vocabulary",
    "list_vocabularies",
    "load_vocabulary",
    "read_vocabulary_file",
    "set_default_vocabulary",
]

_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Vocabulary:
    """A class vocabulary with what panoptic segmentation and evaluation need to know about each class.

    Attributes:
        name (`str`): the built-in name (`"ade20k_150"`), the file it was read from, or `"custom"`.
        class_names (`list[str]`): one entry per class, comma-separated synonyms (the first is the display name).
        is_thing (`list[bool]`): whether each class is a thing (instances kept apart) or stuff (merged). Classes of a
            semantic-only data set, which the original gives no thing flag, are stuff.
        dataset_ids (`list[int]`): each class's category id in its data set (`0 .. K-1` for a user's list).
        colors (`list[tuple[int, int, int]] | None`): display colour of each class, when the data set defines them.
        task (`str`): what the original uses the list for: `"panoptic"`, `"semantic"` or `"instance"`.
        train_ids (`list[int] | None`): Cityscapes / ADE-847 training ids, where the data set has them.
    """

    name: str
    class_names: list[str]
    is_thing: list[bool]
    dataset_ids: list[int]
    colors: list[tuple[int, int, int]] | None = None
    task: str = "panoptic"
    train_ids: list[int] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.class_names)

    @property
    def display_names(self) -> list[str]:
        """The label shown for each class (its first synonym)."""
        return [display_name(name) for name in self.class_names]

    @property
    def stuff_ids(self) -> list[int]:
        """Indices (label ids) of the stuff classes."""
        return [i for i, thing in enumerate(self.is_thing) if not thing]

    def categories(self) -> list[dict]:
        """The vocabulary as evaluation and training categories: `[{"id", "name", "isthing"}]` (dataset ids)."""
        return [
            {"id": i, "name": name, "isthing": int(thing)}
            for i, name, thing in zip(self.dataset_ids, self.class_names, self.is_thing)
        ]


def list_vocabularies() -> list[str]:
    """Names of the built-in vocabularies."""
    return sorted(p.stem for p in _DIR.glob("*.json"))


def _unknown_name_message(name: str) -> str:
    return (
        f"Unknown vocabulary {name!r}: the built-in vocabularies are {', '.join(list_vocabularies())}. For your own "
        "classes give a list of class names (one string of comma-separated synonyms per class, e.g. [\"car\"])."
    )


@lru_cache(maxsize=None)
def _load_builtin(name: str) -> Vocabulary:
    data = json.loads((_DIR / f"{name}.json").read_text(encoding="utf-8"))
    classes = data["classes"]
    colors = [tuple(c["color"]) for c in classes] if all("color" in c for c in classes) else None
    train_ids = [c["train_id"] for c in classes] if all("train_id" in c for c in classes) else None
    return Vocabulary(
        name=name,
        class_names=[c["name"] for c in classes],
        is_thing=[bool(c.get("isthing", 0)) for c in classes],
        dataset_ids=[int(c["id"]) for c in classes],
        colors=colors,
        task=data.get("task", "panoptic"),
        train_ids=train_ids,
    )


def get_vocabulary(name: str) -> Vocabulary:
    """A built-in vocabulary by name (see [`list_vocabularies`]); an unknown name raises a `VocabularyError` listing
    the known ones."""
    if not isinstance(name, str) or name not in list_vocabularies():
        raise VocabularyError(_unknown_name_message(str(name)))
    vocabulary = _load_builtin(name)
    # Copies of the lists, so that a caller editing them does not change the cached vocabulary.
    return Vocabulary(
        vocabulary.name, list(vocabulary.class_names), list(vocabulary.is_thing), list(vocabulary.dataset_ids),
        list(vocabulary.colors) if vocabulary.colors else None, vocabulary.task,
        list(vocabulary.train_ids) if vocabulary.train_ids else None,
    )


def build_vocabulary(
    class_names: Sequence[str],
    stuff: Sequence[str] | None = None,
    is_thing: Sequence[bool] | None = None,
    name: str = "custom",
) -> Vocabulary:
    """A vocabulary from a user's class list: every class is a thing unless it is named in `stuff` (by its full
    entry or its display name) or `is_thing` says otherwise. Dataset ids are `0 .. K-1`."""
    class_names = validate_vocabulary(class_names)
    if stuff is not None and is_thing is not None:
        raise VocabularyError("Give either stuff or is_thing, not both.")
    if is_thing is None:
        stuff = [stuff] if isinstance(stuff, str) else list(stuff or [])
        known = {n.strip() for n in class_names} | {display_name(n) for n in class_names}
        unknown = [s for s in stuff if s.strip() not in known]
        if unknown:
            raise VocabularyError(f"Stuff classes {unknown} are not in the vocabulary {class_names}.")
        marked = {s.strip() for s in stuff}
        is_thing = [n.strip() not in marked and display_name(n) not in marked for n in class_names]
    else:
        is_thing = parse_flags(is_thing, "is_thing")  # the rule of vocabulary files: "no" is refused, not True
        if len(is_thing) != len(class_names):
            raise VocabularyError(f"is_thing has {len(is_thing)} flags for {len(class_names)} classes.")
    return Vocabulary(name, class_names, list(is_thing), list(range(len(class_names))))


def read_vocabulary_file(path: str | os.PathLike) -> Vocabulary:
    """A vocabulary from a file:

    - JSON: a built-in-style object (`{"classes": [{"id", "name", "isthing", "color"}]}`), `{"classes": [names],
      "is_thing": [flags]}`, a COCO panoptic JSON (`{"categories": [{"id", "name", "isthing"}]}`), or a plain list of
      names or of `{"id", "name", "isthing"}` objects;
    - text: one class entry per line, optionally prefixed by `id:` as in the original's `*_with_prompt_eng.txt`
      files (whose `invalid_class_id` placeholder line is skipped, as the original skips it). All classes are things.
    """
    path = Path(path)
    if not path.is_file():
        raise VocabularyError(f"Vocabulary file {str(path)!r} does not exist (nor is it a built-in name: "
                              f"{', '.join(list_vocabularies())}).")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise VocabularyError(f"Cannot read vocabulary file {str(path)!r} ({err}).") from None
    if path.suffix.lower() == ".json":
        return _vocabulary_from_json(text, path)
    names, ids = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        head, sep, rest = line.partition(":")
        has_id = bool(sep) and head.strip().isdigit()
        entry = rest if has_id else line
        if entry.strip() == "invalid_class_id":
            continue
        names.append(entry)
        ids.append(int(head) if has_id else len(ids))
    names = validate_vocabulary(names, f"vocabulary in {path.name}")
    return Vocabulary(str(path), names, [True] * len(names), ids)


def _vocabulary_from_json(text: str, path: Path) -> Vocabulary:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise VocabularyError(f"Vocabulary file {str(path)!r} is not valid JSON ({err}).") from None
    is_thing = None
    if isinstance(data, dict) and not isinstance(data.get("classes", data.get("categories")), list):
        raise VocabularyError(f"{path.name}: no \"classes\" (or \"categories\") list (keys: {', '.join(map(str, data))}); "
                              'expected {"classes": [...], "is_thing": [...]}, {"categories": [...]} or a plain list.')
    if isinstance(data, dict):
        is_thing = data.get("is_thing")
        data = data.get("classes", data.get("categories"))
    if not isinstance(data, list) or not data:
        raise VocabularyError(f"{path.name}: expected a list of classes, {{'classes': [...]}} or {{'categories': [...]}}.")
    if all(isinstance(c, dict) for c in data):
        if not all("name" in c for c in data):
            raise VocabularyError(f"{path.name}: every class object needs a 'name'.")
        names = validate_vocabulary([c["name"] for c in data], f"vocabulary in {path.name}")
        flags = [parse_flag(c.get("isthing", c.get("is_thing", 1)), f"{path.name}: class {c['name']!r} isthing")
                 for c in data]
        ids = [int(c.get("id", i)) for i, c in enumerate(data)]
        colors = ([_parse_color(c["color"], f"{path.name}: class {c['name']!r} color") for c in data]
                  if all("color" in c for c in data) else None)
        return Vocabulary(str(path), names, flags, ids, colors)
    names = validate_vocabulary(data, f"vocabulary in {path.name}")
    if is_thing is not None:
        is_thing = parse_flags(is_thing, f"{path.name}: is_thing")
    if is_thing is not None and len(is_thing) != len(names):
        raise VocabularyError(f"{path.name}: is_thing has {len(is_thing)} flags for {len(names)} classes.")
    return build_vocabulary(names, is_thing=is_thing, name=str(path))


def _parse_color(value, where: str) -> tuple[int, int, int]:
    """A file's display colour: `[r, g, b]`, whole numbers from 0 to 255 (else refused here, not when drawing)."""
    if not (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        raise VocabularyError(f"{where} must be [r, g, b] with whole numbers from 0 to 255, got {value!r}.")
    return tuple(value)


def load_vocabulary(spec, stuff: Sequence[str] | None = None) -> Vocabulary:
    """A [`Vocabulary`] from a built-in name, a file path (see [`read_vocabulary_file`]), a list of class entries
    (things unless named in `stuff`) or a `Vocabulary` (returned as is)."""
    if isinstance(spec, Vocabulary):
        return spec
    if isinstance(spec, str) and spec in list_vocabularies():
        return get_vocabulary(spec)
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and (os.path.isfile(spec) or _looks_like_path(spec))):
        return read_vocabulary_file(spec)
    if isinstance(spec, str):
        raise VocabularyError(_unknown_name_message(spec) + " A vocabulary file must exist.")
    return build_vocabulary(spec, stuff=stuff)


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or spec.lower().endswith((".json", ".txt"))


def set_default_vocabulary(model, processor, vocabulary, stuff: Sequence[str] | None = None) -> Vocabulary:
    """Make `vocabulary` (a name, file, list or [`Vocabulary`]) the default vocabulary of `model`, with its text
    embeddings stored with the weights (`model.set_default_vocabulary`), encoded by `processor`. Returns it."""
    vocabulary = load_vocabulary(vocabulary, stuff=stuff)
    input_ids = processor.encode_vocabulary(vocabulary.class_names, return_tensors="pt")["input_ids"]
    model.set_default_vocabulary(vocabulary.class_names, vocabulary.is_thing, input_ids)
    return vocabulary

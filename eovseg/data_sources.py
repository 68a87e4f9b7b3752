"""Where the training and evaluation commands' rows and classes come from: one loader and one category resolver.

* [`load_local_dataset`]: a `datasets.Dataset` from a local path, never downloaded: a `save_to_disk` folder, a
  data file (parquet, json/jsonl, arrow, csv) or a folder `datasets.load_dataset` reads; of a `DatasetDict`, the
  split asked for, else the first of the command's default splits present, else the only one.
* [`resolve_categories`]: the classes to train or evaluate, `[{"id", "name", "isthing"}]` (`id` the data set's
  `category_id`, `name` the vocabulary entry, `isthing` a bool): the ones given (a built-in vocabulary name, a
  vocabulary file, a list of category dicts, or a list of class names looked up in the model's vocabulary), else
  the ones stored with the data set, else the model configuration's default vocabulary (ids `0 .. K-1`).

`eovseg.training.train` and `eovseg.evaluation.evaluate` both call these (the evaluation also reads the on-disk
layouts of `eovseg.evaluation.folders` and the synthetic data set before falling back on [`load_local_dataset`]).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .inputs import as_int

__all__ = [
    "categories_for_command",
    "categories_from_config",
    "dataset_categories",
    "load_local_dataset",
    "normalize_categories",
    "resolve_categories",
]

_DATA_FILE_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "arrow": "arrow", "csv": "csv"}


# ----------------------------------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------------------------------


def _is_saved_dataset(path: str) -> bool:
    """A folder written by `save_to_disk` (and not a folder of data files that happens to hold a `state.json`)."""
    markers = ("dataset_dict.json", "state.json", "dataset_info.json")
    return (
        os.path.isdir(path)
        and any(os.path.exists(os.path.join(path, f)) for f in markers)
        and not any(f.endswith((".parquet", ".jsonl", ".csv")) for f in os.listdir(path))
    )


def load_local_dataset(
    path: str, split: str | None = None, default_splits: Sequence[str] = (), split_option: str = "--split"
):
    """A `datasets.Dataset` from a local path; nothing is downloaded.

    Args:
        path: a `save_to_disk` folder, a data file (`.parquet`, `.json`, `.jsonl`, `.arrow`, `.csv`) or a folder
            `datasets.load_dataset` reads (parquet / json / image folders, ...).
        split: the split of a `DatasetDict` to return; an error when it has no such split.
        default_splits: without `split`, the first of these present is returned, else the only split.
        split_option: the command-line option that chooses the split, named in the error when one must be chosen.
    """
    import datasets

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; give a local data set (nothing is downloaded) or 'synthetic'.")
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        if ext not in _DATA_FILE_BUILDERS:
            raise ValueError(f"{path}: unsupported data file type {ext!r}.")
        if os.path.getsize(path) == 0:
            raise ValueError(f"data set {path!r} has no rows (the file is empty).")
    try:
        if _is_saved_dataset(path):
            data = datasets.load_from_disk(path)
        elif os.path.isfile(path):
            data = datasets.load_dataset(_DATA_FILE_BUILDERS[ext], data_files=path)
        else:
            data = datasets.load_dataset(path)
    except Exception as error:  # datasets' and pyarrow's own errors, raised deep inside and often several lines long
        raise _unreadable(path, error) from error
    data = pick_split(data, split, default_splits, split_option)
    if hasattr(data, "__len__") and len(data) == 0:
        raise ValueError(f"data set {path!r} has no rows" + (f" in split {split!r}." if split else "."))
    return data


def _unreadable(path: str, error: BaseException) -> ValueError:
    """The one-line error of a data set `datasets` cannot load: a saved split without rows (which
    `datasets.load_from_disk` cannot even open), else the innermost cause's first line."""
    for folder, _, files in os.walk(path) if os.path.isdir(path) else ():
        if "state.json" in files and not _saved_data_files(os.path.join(folder, "state.json")):
            where = os.path.relpath(folder, path)
            return ValueError(f"data set {path!r} has no rows" + ("." if where == "." else f" in split {where!r}."))
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).strip()
    reason = text.splitlines()[0] if text else type(cause).__name__
    return ValueError(f"cannot read {path!r} as a data set ({type(cause).__name__}: {reason})")


def _saved_data_files(state_file: str) -> list:
    import json

    try:
        with open(state_file, encoding="utf-8") as handle:
            return list(json.load(handle).get("_data_files") or [])
    except (OSError, ValueError, AttributeError):
        return [None]  # unreadable: not known to be empty, the loader's own error is reported


def synthetic_eval_dataset(num_images: int | None = None, size: int | None = None):
    """The held-out synthetic set (`eovseg.synthetic`): what `eovseg train --eval_dataset synthetic` evaluates on and
    `eovseg evaluate --dataset synthetic` evaluates, with the same defaults (`eovseg.parsers`), so that one model
    gets one figure. Its images are drawn from their own seed, never from the training's."""
    from .parsers import SYNTHETIC_EVAL_IMAGES, SYNTHETIC_EVAL_SEED, SYNTHETIC_IMAGE_SIZE
    from .synthetic import make_synthetic_panoptic_dataset

    num_images = SYNTHETIC_EVAL_IMAGES if num_images is None else num_images
    size = SYNTHETIC_IMAGE_SIZE if size is None else size
    return make_synthetic_panoptic_dataset(num_images, size, size, seed=SYNTHETIC_EVAL_SEED)


def pick_split(data, split: str | None, default_splits: Sequence[str] = (), split_option: str = "--split"):
    """The split of a `DatasetDict` (or `IterableDatasetDict`) that [`load_local_dataset`] returns; a data set
    that is not a dict of splits is returned as it is."""
    import datasets

    if not isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is not None:  # a split asked of a data set without splits would be ignored without a word
            raise ValueError(f"{split_option} {split}: the data set has no splits (it is a single data set).")
        return data
    if split is not None:
        if split not in data:
            raise KeyError(f"No split {split!r}; splits: {list(data)}.")
        return data[split]
    for name in default_splits:
        if name in data:
            return data[name]
    if len(data) == 1:
        return next(iter(data.values()))
    raise ValueError(f"Choose a split among {list(data)} ({split_option}).")


# ----------------------------------------------------------------------------------------------------------------------
# Categories
# ----------------------------------------------------------------------------------------------------------------------


def categories_from_config(config) -> list[dict]:
    """Categories of a model configuration's default vocabulary: ids `0 .. K-1`, `isthing` from `is_thing`."""
    vocabulary = list(getattr(config, "vocabulary", None) or [])
    if not vocabulary:
        raise ValueError("The model configuration has no vocabulary: give the categories.")
    is_thing = getattr(config, "is_thing", None)
    if is_thing is None or len(is_thing) != len(vocabulary):
        raise ValueError("The model configuration has no is_thing flags matching its vocabulary: give the categories.")
    return [{"id": i, "name": name, "isthing": bool(t)} for i, (name, t) in enumerate(zip(vocabulary, is_thing))]


def dataset_categories(dataset) -> list[dict] | None:
    """Categories stored with a data set: the `categories` of an on-disk folder (`eovseg.evaluation.folders`), or a
    JSON `"categories"` list in `dataset.info.description` (as the synthetic data set stores them); else None."""
    from .synthetic import get_dataset_categories

    stored = getattr(dataset, "categories", None)
    if isinstance(stored, list):
        return stored
    return get_dataset_categories(dataset)


def resolve_categories(categories, dataset=None, config=None) -> list[dict]:
    """The classes a command trains or evaluates, as [`normalize_categories`] gives them.

    Args:
        categories: a built-in vocabulary name or a vocabulary file (read by `eovseg.vocabularies.load_vocabulary`:
            `[{"id", "name", "isthing"}]`, a COCO panoptic JSON, ...), a list of category dicts (or a dict
            `{id: {...}}`), a list of class names (each must be in the model's vocabulary, which gives its id and
            thing flag), or None.
        dataset: without `categories`, its stored ones ([`dataset_categories`]) are used.
        config: the model configuration; without either of the above, its default vocabulary.
    """
    if categories is None:
        stored = dataset_categories(dataset) if dataset is not None else None
        return normalize_categories(stored) if stored else categories_from_config(config)
    if isinstance(categories, (str, os.PathLike)):
        from .vocabularies import load_vocabulary

        categories = load_vocabulary(categories).categories()
    elif isinstance(categories, Sequence) and categories and all(isinstance(c, str) for c in categories):
        categories = _categories_from_names(list(categories), config)
    return normalize_categories(categories)


def categories_for_command(categories, dataset, config, option: str = "--categories") -> list[dict]:
    """The classes of the `train` and `evaluate` commands: the ones given with `option`, else the data set's stored
    ones. A data set that stores none is refused: the model's vocabulary (a preset's placeholder names, ids
    0 .. K-1) would be taken for the data set's classes, with its thing / stuff flags, without a word."""
    if categories is None and not (dataset_categories(dataset) if dataset is not None else None):
        raise ValueError(
            f"The data set stores no categories: give its classes with {option} NAME|FILE (a built-in vocabulary "
            "such as coco_panoptic, or a JSON file of [{id, name, isthing}] whose ids are the data set's category_id)."
        )
    return resolve_categories(categories, dataset, config)


def _categories_from_names(names: list[str], config) -> list[dict]:
    known = categories_from_config(config) if getattr(config, "vocabulary", None) else []
    by_name = {c["name"].strip(): c for c in known}
    missing = [n for n in names if n.strip() not in by_name]
    if missing:
        raise ValueError(
            f"The classes {missing[:5]} are not in the model's vocabulary, so whether they are things or stuff is "
            "unknown: give the vocabulary as a list of {'id', 'name', 'isthing'} dicts."
        )
    return [{"id": by_name[n.strip()]["id"], "name": n, "isthing": by_name[n.strip()]["isthing"]} for n in names]


def normalize_categories(categories: Any) -> list[dict]:
    """A list of `{"id": int, "name": str, "isthing": bool}` from a COCO-style list of category dicts (`isthing` or
    `is_thing`, a flag as `eovseg.vocabulary.parse_flag` reads it; `name` optional) or a dict `{id: {...}}`."""
    if categories is None:
        raise ValueError("categories are required: a list of {'id', 'name', 'isthing'} dicts (COCO panoptic style).")
    if isinstance(categories, Mapping):
        categories = [{"id": key, **dict(info)} if "id" not in info else dict(info) for key, info in categories.items()]
    result, seen = [], set()
    for i, info in enumerate(categories):
        if not isinstance(info, Mapping):
            raise TypeError(f"categories[{i}] must be a dict with 'id' and 'isthing', got {type(info).__name__}.")
        if "id" not in info:
            raise KeyError(f"categories[{i}] has no 'id'.")
        cat_id = as_int(info["id"], f"categories[{i}]['id']")
        if cat_id in seen:
            raise ValueError(f"categories: the id {cat_id} appears twice.")
        seen.add(cat_id)
        isthing = info.get("isthing", info.get("is_thing"))
        if isthing is None:
            raise KeyError(f"categories[{i}] (id {cat_id}) has no 'isthing' flag.")
        result.append({"id": cat_id, "name": str(info.get("name", cat_id)), "isthing": _flag(isthing, cat_id)})
    if not result:
        raise ValueError("categories is empty.")
    return result


def _flag(value: Any, cat_id: int) -> bool:
    from .vocabulary import parse_flag

    if hasattr(value, "item"):  # NumPy / torch scalars from a data set's columns
        value = value.item()
    return parse_flag(value, f"categories: isthing of id {cat_id}")

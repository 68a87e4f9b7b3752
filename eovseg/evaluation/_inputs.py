"""Conversion of the inputs the metrics accept (tensors, arrays, PIL images, COCO RLE) to NumPy."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..inputs import rgb_to_id


def to_numpy(value: Any, where: str) -> np.ndarray:
    """A NumPy array from a NumPy array, a torch tensor, a PIL image, a path to an image file or nested lists."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        return value.detach().cpu().numpy()
    if isinstance(value, (str, os.PathLike)):
        import PIL.Image

        with PIL.Image.open(value) as image:
            return _pil_to_numpy(image)
    if hasattr(value, "getbands") and hasattr(value, "mode"):  # PIL.Image.Image
        return _pil_to_numpy(value)
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    raise TypeError(
        f"{where}: expected a NumPy array, a torch tensor, a PIL image, a file path or nested lists, "
        f"got {type(value).__name__}."
    )


def _pil_to_numpy(image) -> np.ndarray:
    if image.mode in ("RGBA", "P", "LA", "CMYK", "YCbCr"):
        image = image.convert("RGB")
    return np.asarray(image)


def id_map(value: Any, where: str) -> np.ndarray:
    """A (H, W) int64 map of segment ids from a 2-d id map or a (H, W, 3) COCO-panoptic RGB encoding
    (`(H, W, 4)` loses its alpha channel; a channels-first `(3, H, W)` tensor is not accepted, to avoid ambiguity)."""
    array = to_numpy(value, where)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return rgb_to_id(array[..., :3])
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(
            f"{where}: expected a (height, width) map of ids or a (height, width, 3) RGB-encoded panoptic map, "
            f"got an array of shape {array.shape}."
        )
    if array.dtype == bool:
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        if np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise ValueError(f"{where}: the map must hold integer ids, got dtype {array.dtype}.")
    return array.astype(np.int64, copy=False)


def label_map(value: Any, where: str) -> np.ndarray:
    """A (H, W) int64 map of class labels."""
    array = to_numpy(value, where)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"{where}: expected a (height, width) map of class labels, got an array of shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer):
        if array.dtype == bool or (
            np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and np.all(array == np.round(array))
        ):
            array = array.astype(np.int64)
        else:
            raise ValueError(f"{where}: the map must hold integer class labels, got dtype {array.dtype}.")
    return array.astype(np.int64, copy=False)


def get_segments_info(example: Any, where: str) -> tuple[Any, list[Mapping]]:
    """(segmentation, segments_info) of a prediction or reference dict.

    The segmentation is found under `segmentation` (post-processing output), `panoptic_seg`, `annotation`,
    `label` or `mask`; the segments under `segments_info`. A `(segmentation, segments_info)` pair is accepted too.
    A dataset's columns-of-lists form of `segments_info` (`{"id": [...], "category_id": [...]}`) is turned into a
    list of dicts.
    """
    if isinstance(example, Mapping):
        for key in ("segmentation", "panoptic_seg", "annotation", "label", "mask"):
            if key in example:
                segmentation = example[key]
                break
        else:
            raise KeyError(
                f"{where}: no segmentation found; expected one of the keys 'segmentation', 'panoptic_seg', "
                f"'annotation', 'label' or 'mask' (got {sorted(example)})."
            )
        if "segments_info" not in example:
            raise KeyError(f"{where}: no 'segments_info' (got keys {sorted(example)}).")
        segments = example["segments_info"]
    elif isinstance(example, (tuple, list)) and len(example) == 2:
        segmentation, segments = example
    else:
        raise TypeError(
            f"{where}: expected a dict with 'segmentation' and 'segments_info' (or a (segmentation, segments_info) "
            f"pair), got {type(example).__name__}."
        )
    return segmentation, normalize_segments(segments, where)


def normalize_segments(segments: Any, where: str) -> list[Mapping]:
    if segments is None:
        return []
    if isinstance(segments, Mapping):
        # Column-oriented form, as `datasets` may store a sequence of structs.
        keys = list(segments)
        lengths = {len(segments[k]) for k in keys}
        if len(lengths) > 1:
            raise ValueError(f"{where}: the columns of segments_info have different lengths {sorted(lengths)}.")
        n = lengths.pop() if lengths else 0
        return [{k: segments[k][i] for k in keys} for i in range(n)]
    if not isinstance(segments, Sequence):
        raise TypeError(f"{where}: segments_info must be a list of dicts, got {type(segments).__name__}.")
    for i, segment in enumerate(segments):
        if not isinstance(segment, Mapping):
            raise TypeError(f"{where}: segments_info[{i}] must be a dict, got {type(segment).__name__}.")
    return list(segments)


def as_int(value: Any, where: str) -> int:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)):
        raise TypeError(f"{where}: expected an integer, got {value!r}.")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{where}: expected an integer, got {value!r}.")
    return int(value)


def as_bool_flag(value: Any) -> bool:
    if hasattr(value, "item"):
        value = value.item()
    return bool(value)


class LabelMapping:
    """Maps a segment to its category id: `category_id` when the segment has one, else `label_id` (an index into
    the model's vocabulary) through `label_id_to_category_id` (a dict, a list/tuple indexed by label id, or None
    for the identity)."""

    def __init__(self, label_id_to_category_id=None):
        if label_id_to_category_id is None:
            self._lookup = None
        elif isinstance(label_id_to_category_id, Mapping):
            self._lookup = {int(k): int(v) for k, v in label_id_to_category_id.items()}
        elif isinstance(label_id_to_category_id, Sequence) and not isinstance(label_id_to_category_id, str):
            self._lookup = {i: int(v) for i, v in enumerate(label_id_to_category_id)}
        else:
            raise TypeError(
                "label_id_to_category_id must be a dict, a list indexed by label id, or None, got "
                f"{type(label_id_to_category_id).__name__}."
            )

    def category_of(self, segment: Mapping, where: str) -> int:
        if "category_id" in segment and segment["category_id"] is not None:
            return as_int(segment["category_id"], f"{where} category_id")
        if "label_id" in segment and segment["label_id"] is not None:
            label = as_int(segment["label_id"], f"{where} label_id")
            if self._lookup is None:
                return label
            if label not in self._lookup:
                raise KeyError(f"{where}: label_id {label} has no entry in label_id_to_category_id.")
            return self._lookup[label]
        raise KeyError(f"{where}: a segment needs a 'category_id' or a 'label_id' (got keys {sorted(segment)}).")


def normalize_categories(categories: Any) -> list[dict]:
    """A list of `{"id": int, "name": str, "isthing": bool}` from a COCO-style list of category dicts (`isthing` or
    `is_thing`; `name` optional) or a dict `{id: {...}}`."""
    if categories is None:
        raise ValueError("categories are required: a list of {'id', 'name', 'isthing'} dicts (COCO panoptic style).")
    if isinstance(categories, Mapping):
        items = []
        for key, info in categories.items():
            info = dict(info)
            info.setdefault("id", key)
            items.append(info)
        categories = items
    result = []
    seen = set()
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
        result.append({"id": cat_id, "name": str(info.get("name", cat_id)), "isthing": as_bool_flag(isthing)})
    if not result:
        raise ValueError("categories is empty.")
    return result


def nan_to_none(value: Any) -> Any:
    """A copy of nested dicts/lists with NaN floats replaced by None (for strict JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    if isinstance(value, np.generic):
        return nan_to_none(value.item())
    return value


class StreamingMetric:
    """Base of the streaming metrics: `add(prediction, reference)` per image; `add_batch` feeds pairs to it."""

    def add(self, prediction: Any, reference: Any):  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def add_batch(self, predictions: Sequence, references: Sequence) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"add_batch: {len(predictions)} predictions for {len(references)} references.")
        for prediction, reference in zip(predictions, references):
            self.add(prediction, reference)

"""What the metrics read besides the maps themselves (decoded by `eovseg.inputs`): prediction / reference dicts,
their segments' categories, and JSON output."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..inputs import as_int, normalize_segments


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

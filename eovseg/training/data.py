"""From Hugging Face `datasets` rows to EOV-Seg training inputs.

* [`PanopticSegmentationDataset`] reads COCO-panoptic style rows (an image, the RGB-encoded panoptic PNG with
  `id = R + 256 G + 256^2 B`, and `segments_info` with `id` / `category_id` / `iscrowd` per segment) and gives, per
  image, the (augmented) image and one binary target mask and class per non-crowd segment, as the original's
  COCO panoptic dataset mapper does.
* [`SemanticSegmentationDataset`] reads (image, label map) rows and gives one target per class present.
* [`LargeScaleJitter`] is the original's training augmentation (random horizontal flip, resize to a random scale
  of the crop size, random crop / pad to the crop size); [`ResizeShortestEdge`] its test-time resize.
* [`EovSegDataCollator`] normalizes the images, pads images (with zeros after normalization) and masks to a common
  size divisible by 32, and adds the vocabulary tensors once per batch.

Augmentations draw from `numpy.random.default_rng([seed, epoch, row])`: what a row becomes depends only on the seed,
the epoch ([`set_epoch`]) and the row, whatever the order, the worker or the process that loads it, which makes
resuming a run exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..configuration_eovseg import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from .. import inputs
from ..inputs import decode_image, get_resize_output_shape, normalize, normalize_segments, pad_batch, resize_image, resize_nearest

__all__ = [
    "DatasetFormatError",
    "EovSegDataCollator",
    "ImageLabelDataset",
    "LargeScaleJitter",
    "MixedSegmentationDataset",
    "PanopticSegmentationDataset",
    "ResizeShortestEdge",
    "SemanticSegmentationDataset",
]

# Label value of pixels outside any segment after padding a panoptic id map (segment ids are >= 0).
_NO_SEGMENT = -1


class DatasetFormatError(ValueError):
    """A data set row (or the data set's columns) cannot be turned into training inputs."""


# ----------------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------------


def _dataset_error(decode, value: Any, where: str) -> np.ndarray:
    """`decode(value, where)` (an `eovseg.inputs` decoder) with its errors as `DatasetFormatError`."""
    try:
        return decode(value, where)
    except ValueError as error:
        raise DatasetFormatError(str(error)) from None


def decode_rgb_image(value: Any, where: str) -> np.ndarray:
    """An image as a (H, W, 3) uint8 RGB array, decoded as the image processor decodes images (every PIL mode, bit
    depth and array layout: `eovseg.inputs.decode_image`); errors as `DatasetFormatError`."""
    if not isinstance(value, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        raise DatasetFormatError(f"{where}: expected a PIL image or an array, got {type(value).__name__}.")
    return _dataset_error(decode_image, value, where)


def decode_panoptic_ids(value: Any, where: str) -> np.ndarray:
    """A panoptic annotation as an int64 (H, W) segment-id map (`eovseg.inputs.decode_panoptic_ids`)."""
    return _dataset_error(inputs.decode_panoptic_ids, value, where)


def decode_label_map(value: Any, where: str) -> np.ndarray:
    """A semantic label map as an int64 (H, W) array (`eovseg.inputs.decode_label_map`)."""
    return _dataset_error(inputs.decode_label_map, value, where)


def normalize_segments_info(value: Any, where: str) -> list[dict]:
    """`segments_info` as a list of dicts (the evaluation's reader: a list of dicts or a dict of lists, as a
    `datasets.Sequence` of a struct), each with `id` and `category_id`; errors as `DatasetFormatError`."""
    try:
        segments = normalize_segments(value, where)
    except (TypeError, ValueError) as error:
        raise DatasetFormatError(str(error)) from None
    for j, segment in enumerate(segments):
        if "id" not in segment or "category_id" not in segment:
            raise DatasetFormatError(f"{where}: segments_info[{j}] must be a dict with 'id' and 'category_id'.")
    return [dict(segment) for segment in segments]


# ----------------------------------------------------------------------------------------------------------------------
# Geometric transforms
# ----------------------------------------------------------------------------------------------------------------------


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return _dataset_error(lambda x, where: resize_nearest(x, tuple(size), where), labels, "the label map")


@dataclass
class LargeScaleJitter:
    """The original's training augmentation ("large-scale jitter", detectron2's `RandomFlip`, `ResizeScale`,
    `FixedSizeCrop`), applied to the image and its label map alike:

    1. horizontal flip with probability `flip_probability`;
    2. a scale `s ~ U(min_scale, max_scale)`; the image is resized (bilinear; labels nearest) by the largest factor
       that fits it in `(s * crop_height, s * crop_width)`, each side rounded;
    3. a random crop of at most `(crop_height, crop_width)`: the offset is `round(u * max_offset)` with one
       `u ~ U(0, 1)` for both axes, as detectron2 draws it;
    4. padding at the bottom/right to the crop size: the image with `image_pad_value` (128 in 0-255 units, before
       normalization, as detectron2), the labels with the map's "no target" value.

    Returns the image, the labels and the (height, width) of the real content in the padded result.
    """

    crop_size: int | tuple[int, int] = 1024
    min_scale: float = 0.1
    max_scale: float = 2.0
    flip_probability: float = 0.5
    image_pad_value: float = 128.0

    def __post_init__(self):
        if isinstance(self.crop_size, int):
            self.crop_size = (self.crop_size, self.crop_size)
        self.crop_size = (int(self.crop_size[0]), int(self.crop_size[1]))
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"Need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}.")

    def __call__(self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, label_pad_value: int):
        if rng.random() < self.flip_probability:
            image, labels = image[:, ::-1], labels[:, ::-1]
        height, width = image.shape[:2]
        crop_h, crop_w = self.crop_size
        scale = rng.uniform(self.min_scale, self.max_scale)
        factor = min(scale * crop_h / height, scale * crop_w / width)
        new_h, new_w = max(1, int(np.round(height * factor))), max(1, int(np.round(width * factor)))
        image = resize_image(np.ascontiguousarray(image), (new_h, new_w))
        labels = _resize_labels(np.ascontiguousarray(labels), (new_h, new_w))
        u = rng.uniform(0.0, 1.0)
        top = int(np.round(max(new_h - crop_h, 0) * u))
        left = int(np.round(max(new_w - crop_w, 0) * u))
        image = image[top : top + crop_h, left : left + crop_w]
        labels = labels[top : top + crop_h, left : left + crop_w]
        valid = image.shape[:2]
        out_image = np.full((crop_h, crop_w, 3), self.image_pad_value, dtype=np.float32)
        out_image[: valid[0], : valid[1]] = image
        out_labels = np.full((crop_h, crop_w), label_pad_value, dtype=np.int64)
        out_labels[: valid[0], : valid[1]] = labels
        return out_image, out_labels, valid


@dataclass
class ResizeShortestEdge:
    """The test-time resize: the shorter side to `shortest_edge` unless the longer one would exceed
    `longest_edge` (the image processor's rule); bilinear for the image, nearest for the labels."""

    shortest_edge: int = 640
    longest_edge: int | None = 2560

    def __call__(self, image: np.ndarray, labels: np.ndarray, rng=None, label_pad_value: int = 0):
        size = get_resize_output_shape(image.shape[0], image.shape[1], self.shortest_edge, self.longest_edge)
        return resize_image(image, size), _resize_labels(labels, size), size


# ----------------------------------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------------------------------


class _SegmentationDataset(torch.utils.data.Dataset):
    """Common part: column checks, epoch-wise shuffling and per-sample random generators."""

    def __init__(self, dataset, transform=None, seed: int = 0, shuffle: bool = False):
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        names = getattr(dataset, "column_names", None)
        if names is None and len(dataset):
            first = dataset[0]
            names = list(first) if isinstance(first, Mapping) else None
        if names is not None:
            for argument, column in self._columns().items():
                if column not in names:
                    raise DatasetFormatError(
                        f"The data set has no column {column!r} ({argument}); its columns are {list(names)}. Pass "
                        f"{argument}=... to name the right one."
                    )
        self._order = None

    def _columns(self) -> dict[str, str]:
        """{constructor argument: column name} of the required columns."""
        raise NotImplementedError

    def _image_and_annotation(self, row: Mapping, where: str, column: str, decode, what: str):
        """The row's RGB image and its decoded annotation (`decode(value, where)`), which must have the same size."""
        image = decode_rgb_image(row[self.image_column], f"{where} ({self.image_column!r})")
        annotation = decode(row[column], f"{where} ({column!r})")
        if annotation.shape != image.shape[:2]:
            raise DatasetFormatError(
                f"{where}: the image is {image.shape[0]}x{image.shape[1]} but its {what} ({column!r}) is "
                f"{annotation.shape[0]}x{annotation.shape[1]}; they must have the same size."
            )
        return image, annotation

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the shuffled order (when `shuffle`) and the augmentations depend on it."""
        self.epoch = int(epoch)
        self._order = None

    def row_index(self, index: int) -> int:
        if not self.shuffle:
            return index
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.dataset), generator=generator).tolist()
        return self._order[index]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        row = self.row_index(index)
        rng = np.random.default_rng([self.seed, self.epoch, row])
        return self.encode(self.dataset[row], row, rng)

    def _transform(self, image: np.ndarray, labels: np.ndarray, rng, pad: int):
        if self.transform is None:
            return image, labels, image.shape[:2]
        return self.transform(image, labels, rng, pad)

    @staticmethod
    def _pack(image: np.ndarray, labels: np.ndarray, valid, values: list[int], classes: list[int]) -> dict:
        labels_t = torch.from_numpy(np.ascontiguousarray(labels))
        if values:
            masks = labels_t[None] == torch.tensor(values, dtype=torch.int64).view(-1, 1, 1)
        else:
            masks = torch.zeros((0, *labels_t.shape), dtype=torch.bool)
        return {
            # (3, H, W) RGB in 0-255: uint8, or float32 once padded with a grey value by LargeScaleJitter
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
            "image_size": torch.tensor(tuple(valid), dtype=torch.long),  # (height, width) of the real content
            "mask_labels": masks,  # (N, H, W) bool
            "class_labels": torch.tensor(classes, dtype=torch.long),  # (N,)
        }


class PanopticSegmentationDataset(_SegmentationDataset):
    """A COCO-panoptic style `datasets.Dataset` (or any sequence of row dicts) as EOV-Seg training examples.

    Each example has one target per segment of `segments_info` that is not a crowd region, in that order, even when
    the crop leaves its mask empty (the original's dataset mapper); crowd segments and pixels of unlisted ids (0:
    unlabeled) belong to no target.

    Args:
        dataset: the rows.
        transform: [`LargeScaleJitter`] for training, [`ResizeShortestEdge`] for evaluation, or None.
        image_column, panoptic_column, segments_info_column: column names.
        category_id_to_label: maps the `category_id`s of the data set to class indices of the training vocabulary
            (e.g. COCO's ids 1..200 to 0..132); None: `category_id` is the class index.
        seed: seeds the augmentations (and the order, with `shuffle`).
        shuffle: serve the rows in a random order that changes with [`set_epoch`] (for loops that do not shuffle
            themselves).

    Raises:
        DatasetFormatError: at construction when a column is missing; when a row's annotation and image differ in
            size, when `segments_info` lists an id absent from the annotation, or a category has no class index.
    """

    def __init__(
        self,
        dataset,
        transform=None,
        *,
        image_column: str = "image",
        panoptic_column: str = "label",
        segments_info_column: str = "segments_info",
        category_id_to_label: Mapping[int, int] | None = None,
        seed: int = 0,
        shuffle: bool = False,
    ):
        self.image_column = image_column
        self.panoptic_column = panoptic_column
        self.segments_info_column = segments_info_column
        self.category_id_to_label = (
            {int(k): int(v) for k, v in category_id_to_label.items()} if category_id_to_label is not None else None
        )
        super().__init__(dataset, transform, seed, shuffle)

    def _columns(self):
        return {
            "image_column": self.image_column,
            "panoptic_column": self.panoptic_column,
            "segments_info_column": self.segments_info_column,
        }

    def encode(self, row: Mapping, index: int, rng: np.random.Generator | None = None) -> dict:
        where = f"row {index}"
        image, ids = self._image_and_annotation(row, where, self.panoptic_column, decode_panoptic_ids,
                                                "panoptic annotation")
        segments = normalize_segments_info(row[self.segments_info_column], where)
        listed = np.array([int(s["id"]) for s in segments], dtype=np.int64)
        missing = listed[~np.isin(listed, np.unique(ids))]
        if missing.size:
            raise DatasetFormatError(
                f"{where}: segments_info lists segment id(s) {missing.tolist()[:10]} that do not occur in its "
                f"panoptic annotation ({self.panoptic_column!r})."
            )
        values, classes = [], []
        for segment in segments:
            if int(segment.get("iscrowd", 0) or 0):
                continue
            category = int(segment["category_id"])
            if self.category_id_to_label is not None:
                if category not in self.category_id_to_label:
                    raise DatasetFormatError(
                        f"{where}: category_id {category} has no class index in category_id_to_label."
                    )
                category = self.category_id_to_label[category]
            values.append(int(segment["id"]))
            classes.append(category)
        image, ids, valid = self._transform(image, ids, rng, _NO_SEGMENT)
        return self._pack(image, ids, valid, values, classes)


class SemanticSegmentationDataset(_SegmentationDataset):
    """(image, label map) rows as EOV-Seg training examples: one target mask per class present, in increasing
    class order; pixels equal to `ignore_index` belong to no target.

    Args:
        dataset: the rows.
        transform: [`LargeScaleJitter`], [`ResizeShortestEdge`] or None.
        image_column, label_column: column names.
        ignore_index: label of unlabeled pixels.
        label_to_class: maps label values to class indices of the training vocabulary; labels absent from it are
            ignored. None: the label is the class index.
        seed, shuffle: as for [`PanopticSegmentationDataset`].
    """

    def __init__(
        self,
        dataset,
        transform=None,
        *,
        image_column: str = "image",
        label_column: str = "label",
        ignore_index: int = 255,
        label_to_class: Mapping[int, int] | None = None,
        seed: int = 0,
        shuffle: bool = False,
    ):
        self.image_column = image_column
        self.label_column = label_column
        self.ignore_index = int(ignore_index)
        self.label_to_class = {int(k): int(v) for k, v in label_to_class.items()} if label_to_class is not None else None
        super().__init__(dataset, transform, seed, shuffle)

    def _columns(self):
        return {"image_column": self.image_column, "label_column": self.label_column}

    def encode(self, row: Mapping, index: int, rng: np.random.Generator | None = None) -> dict:
        where = f"row {index}"
        image, labels = self._image_and_annotation(row, where, self.label_column, decode_label_map, "label map")
        if self.label_to_class is not None:
            mapped = np.full(labels.shape, self.ignore_index, dtype=np.int64)
            for label, cls in self.label_to_class.items():
                mapped[labels == label] = cls
            labels = mapped
        image, labels, valid = self._transform(image, labels, rng, self.ignore_index)
        values = [int(v) for v in np.unique(labels) if v != self.ignore_index]
        if values and values[0] < 0:
            raise DatasetFormatError(f"{where}: negative class labels ({values[0]}) in {self.label_column!r}.")
        return self._pack(image, labels, valid, values, values)


class ImageLabelDataset(_SegmentationDataset):
    """Image-classification rows (an image and a list of labels, multi-label) as training examples for OPSNet's
    Decoupled Supervision: each example has the (augmented) image, no target masks, and `image_labels`, the indices
    of its labels in `label_names` (the image-level vocabulary, kept apart from the panoptic one).

    Args:
        dataset: a `datasets.Dataset` (or a sequence of row dicts) with an image column and a label column holding,
            per row, a list of label names (entries of `label_names`) or of indices into it (a single one is taken
            as a one-element list).
        label_names: the image-level vocabulary (one class entry of comma-separated synonyms per label).
        transform: augmentation ([`LargeScaleJitter`]) or None.
        image_column, labels_column: the column names.
        seed, shuffle: as for [`PanopticSegmentationDataset`].
    """

    def __init__(
        self,
        dataset,
        label_names: Sequence[str],
        transform=None,
        image_column: str = "image",
        labels_column: str = "labels",
        seed: int = 0,
        shuffle: bool = False,
    ):
        self.image_column = image_column
        self.labels_column = labels_column
        self.label_names = [str(name) for name in label_names]
        if not self.label_names:
            raise DatasetFormatError("label_names (the image-level vocabulary) is empty.")
        self._index_of = {name: i for i, name in enumerate(self.label_names)}
        super().__init__(dataset, transform, seed, shuffle)

    def _columns(self):
        return {"image_column": self.image_column, "labels_column": self.labels_column}

    def label_indices(self, value: Any, where: str) -> list[int]:
        """The label indices of one row's label column value."""
        values = [value] if isinstance(value, (str, int, np.integer)) else list(value)
        indices = []
        for label in values:
            if isinstance(label, str):
                if label not in self._index_of:
                    raise DatasetFormatError(f"{where}: label {label!r} is not in label_names {self.label_names}.")
                indices.append(self._index_of[label])
            elif isinstance(label, (int, np.integer)) and 0 <= int(label) < len(self.label_names):
                indices.append(int(label))
            else:
                raise DatasetFormatError(
                    f"{where}: label {label!r} is neither a name of label_names nor an index below {len(self.label_names)}."
                )
        return sorted(set(indices))

    def encode(self, row: Mapping, index: int, rng: np.random.Generator | None = None) -> dict:
        where = f"row {index}"
        image = decode_rgb_image(row[self.image_column], f"{where} ({self.image_column!r})")
        labels = self.label_indices(row[self.labels_column], f"{where} ({self.labels_column!r})")
        image, _, valid = self._transform(image, np.zeros(image.shape[:2], dtype=np.int64), rng, 0)
        example = self._pack(image, np.zeros(image.shape[:2], dtype=np.int64), valid, [], [])
        example["image_labels"] = torch.tensor(labels, dtype=torch.long)
        return example


class MixedSegmentationDataset(torch.utils.data.Dataset):
    """Panoptic examples interleaved with image-level ones ([`ImageLabelDataset`]) so that a fraction
    `image_label_ratio` of every stretch of examples (hence of every batch, up to rounding) is image-level.

    Example `i` is image-level when `floor((i + 1) r) > floor(i r)`; the two data sets are read in their own
    (shuffled) orders, the image-level one repeated as often as needed. The length is `len(panoptic) / (1 - r)`.
    """

    def __init__(self, panoptic: torch.utils.data.Dataset, image_level: ImageLabelDataset, image_label_ratio: float = 0.5):
        if not 0 < image_label_ratio < 1:
            raise ValueError(f"image_label_ratio must be in (0, 1), got {image_label_ratio}.")
        if len(panoptic) == 0 or len(image_level) == 0:
            raise DatasetFormatError("Both the panoptic and the image-level data sets need at least one row.")
        self.panoptic = panoptic
        self.image_level = image_level
        self.ratio = float(image_label_ratio)

    def set_epoch(self, epoch: int) -> None:
        self.panoptic.set_epoch(epoch)
        self.image_level.set_epoch(epoch)

    def __len__(self) -> int:
        return int(len(self.panoptic) / (1 - self.ratio))

    def __getitem__(self, index: int) -> dict:
        before = math.floor(index * self.ratio)
        if math.floor((index + 1) * self.ratio) > before:
            return self.image_level[before % len(self.image_level)]
        return self.panoptic[(index - before) % len(self.panoptic)]


# ----------------------------------------------------------------------------------------------------------------------
# Collator
# ----------------------------------------------------------------------------------------------------------------------


class EovSegDataCollator:
    """Batch examples of [`PanopticSegmentationDataset`] / [`SemanticSegmentationDataset`] for the model.

    Images (0-255 RGB) are normalized with `pixel_mean` / `pixel_std` and zero-padded at the bottom/right to the
    batch's largest size rounded up to `size_divisibility`; `pixel_mask` is 1 on each image's real content
    (`image_size`). Target masks are padded with zeros to the same size. The vocabulary tensors (`input_ids`,
    `synonym_counts`, `class_seen_mask` from `EovSegProcessor.encode_vocabulary`) are added once per batch.

    Examples of [`ImageLabelDataset`] (Decoupled Supervision) add `image_labels` to the batch: per image, its
    image-level label indices, None for panoptic images; `image_label_vocabulary` (`encode_vocabulary` of the
    image-level vocabulary) is then added as `image_label_input_ids` / `image_label_synonym_counts`.

    Works as `data_collator` of `transformers.Trainer` (with `remove_unused_columns=False`) and as `collate_fn` of a
    `DataLoader`.
    """

    def __init__(
        self,
        vocabulary: Mapping[str, Any] | None = None,
        pixel_mean: Sequence[float] = IMAGENET_PIXEL_MEAN,
        pixel_std: Sequence[float] = IMAGENET_PIXEL_STD,
        size_divisibility: int = 32,
        image_label_vocabulary: Mapping[str, Any] | None = None,
    ):
        self.image_label_vocabulary = {
            f"image_label_{key}": torch.as_tensor(value)
            for key, value in (image_label_vocabulary or {}).items()
            if key in ("input_ids", "synonym_counts")
        }
        self.vocabulary = {}
        for key, value in (vocabulary or {}).items():
            if key in ("input_ids", "synonym_counts", "class_seen_mask", "text_embeddings"):
                self.vocabulary[key] = torch.as_tensor(value)
        self.pixel_mean, self.pixel_std = list(pixel_mean), list(pixel_std)
        self.size_divisibility = int(size_divisibility)

    @classmethod
    def from_processor(
        cls, processor, class_names: Sequence[str], config=None, image_label_names: Sequence[str] | None = None
    ) -> "EovSegDataCollator":
        """A collator for `class_names` with the statistics of `config` (pixel_mean / pixel_std / size_divisibility)
        when given, else the processor's image processor (its `image_mean` / `image_std` in 0-255 units), and the
        image-level vocabulary `image_label_names` of Decoupled Supervision when given."""
        vocabulary = processor.encode_vocabulary(list(class_names), return_tensors="pt")
        if config is not None:
            mean, std, div = config.pixel_mean, config.pixel_std, config.size_divisibility
        else:
            image_processor = processor.image_processor
            mean, std = image_processor.image_mean, image_processor.image_std
            div = getattr(image_processor, "size_divisibility", 32)
        image_label_vocabulary = None
        if image_label_names is not None:
            image_label_vocabulary = processor.encode_vocabulary(list(image_label_names), return_tensors="pt")
        return cls(vocabulary, mean, std, div, image_label_vocabulary)

    def __call__(self, examples: Sequence[Mapping]) -> dict:
        if not examples:
            raise ValueError("Cannot collate an empty batch.")
        images = [normalize(torch.as_tensor(ex["image"]).to(torch.float32), self.pixel_mean, self.pixel_std) for ex in examples]
        valid_sizes = [tuple(int(v) for v in ex.get("image_size", image.shape[-2:])) for ex, image in zip(examples, images)]
        pixel_values, pixel_mask = pad_batch(images, self.size_divisibility, valid_sizes)
        height, width = pixel_values.shape[-2:]
        mask_labels, class_labels = [], []
        for ex in examples:
            masks = torch.as_tensor(ex["mask_labels"])
            padded = torch.zeros((masks.shape[0], height, width), dtype=torch.float32)
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            mask_labels.append(padded)
            class_labels.append(torch.as_tensor(ex["class_labels"], dtype=torch.long))
        out = {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "mask_labels": mask_labels, "class_labels": class_labels}
        out.update(self.vocabulary)
        if any("image_labels" in ex for ex in examples):
            if not self.image_label_vocabulary:
                raise ValueError("Image-level examples need the collator's image_label_vocabulary (image_label_names).")
            out["image_labels"] = [ex.get("image_labels") for ex in examples]
            out.update(self.image_label_vocabulary)
        return out

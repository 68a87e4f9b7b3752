"""Evaluate an EOV-Seg model on a data set: panoptic quality, semantic mIoU & co., instance mask AP.

`evaluate_model(model, processor, dataset, task, ...)` is what the training loop calls; the command line is

    eovseg evaluate --model DIR --dataset PATH_OR_synthetic [--split validation]
        [--vocabulary NAME|categories.json] [--task panoptic|semantic|instance|all] [--batch_size N]
        [--output results.json [--overwrite]]
    torchrun --nproc_per_node N -m eovseg.evaluation.evaluate ...   # or: accelerate launch -m ...

(several processes share the data set and report exactly the numbers of one; only the main process prints and
writes). The data set may be on disk in its usual layout: a COCO-panoptic JSON with its PNG folder and images
(COCO, ADE20K-150 panoptic, Cityscapes panoptic), or a folder of images with `--label_root` a folder of label maps
(ADE20K, Pascal Context, VOC); see `eovseg.evaluation.folders`.

Otherwise it is a Hugging Face `datasets.Dataset` (or `IterableDataset`) in the COCO-panoptic layout: an image
column, a panoptic annotation column (an RGB-encoded PNG, `id = R + 256 G + 256^2 B`, or a 2-d id map) and a
`segments_info` column (`id`, `category_id`, `iscrowd` per segment). Column names are configurable
([`DatasetColumns`]). For semantic segmentation an optional column of class maps may be used instead of the
panoptic annotation (its values are category ids; pixels of other values are ignored).

The *categories* say which classes the model is asked for and how to score them: a list of
`{"id": category id used in segments_info, "name": vocabulary entry (comma-separated synonyms), "isthing": 0/1}`.
The model's vocabulary is `[c["name"] for c in categories]`, so its label id `i` is category `categories[i]["id"]`.
By default they are those stored with the data set (`info.description`), else the model configuration's
(`vocabulary`, `is_thing`, ids `0 .. K-1`).

Every score is in percent (see `eovseg.evaluation`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..command_line import command_main, progress_bar, progress_switch
from ..data_sources import (
    categories_for_command,
    synthetic_eval_dataset,
    categories_from_config,
    dataset_categories,
    load_local_dataset,
    pick_split,
    resolve_categories,
)
from ..parsers import EVALUATION_TASKS as TASKS
from ..parsers import evaluate_parser as build_parser
from ..inputs import decode_label_map, decode_panoptic_ids, normalize_segments
from ._inputs import nan_to_none
from .folders import CocoPanopticFolder, SemanticLabelFolder, is_coco_panoptic_json
from .instance import InstanceSegmentationMetric
from .panoptic import PanopticQuality
from .semantic import SemanticSegmentationMetric


__all__ = [
    "DatasetColumns",
    "categories_from_config",
    "dataset_categories",
    "evaluate_model",
    "format_results",
    "load_eval_dataset",
    "main",
    "run",
]

# The splits a data set is evaluated on when none is given, in order of preference.
_EVAL_SPLITS = ("validation", "val", "test")

logger = logging.getLogger(__name__)

# Column names tried, in order, when the configured one is missing from the data set.
_FALLBACKS = {
    "image": ("image", "pixel_values", "img"),
    "panoptic": ("label", "panoptic", "annotation", "panoptic_seg", "pan_seg", "segmentation", "panoptic_map"),
    "segments_info": ("segments_info", "segments", "segment_info"),
}


@dataclass
class DatasetColumns:
    """Names of the data set's columns, with the defaults of `eovseg.training`'s data sets (`image`, `label`,
    `segments_info`). When a configured image / panoptic / segments_info column is missing, the usual names are
    tried (`label`, `panoptic`, `annotation`, `panoptic_seg`, ... for the panoptic annotation). `semantic` names a
    column of class maps (values: category ids) to use for semantic evaluation instead of the panoptic annotation;
    with it and the semantic task alone, no panoptic column is needed."""

    image: str = "image"
    panoptic: str | None = "label"
    segments_info: str = "segments_info"
    semantic: str | None = None

    def resolve(self, column_names: Iterable[str] | None, need_panoptic: bool) -> "DatasetColumns":
        names = list(column_names) if column_names is not None else None
        if names is None:
            return self

        def pick(kind: str, configured: str | None, required: bool) -> str | None:
            if configured is not None and configured in names:
                return configured
            for candidate in _FALLBACKS[kind]:
                if candidate in names:
                    return candidate
            if required:
                raise KeyError(
                    f"The data set has no {kind} column {configured!r} (columns: {names}); set it with "
                    f"DatasetColumns({kind}=...) / --{kind}_column."
                )
            return None

        if self.semantic is not None and self.semantic not in names:
            raise KeyError(f"The data set has no semantic column {self.semantic!r} (columns: {names}).")
        return DatasetColumns(
            image=pick("image", self.image, True),
            panoptic=pick("panoptic", self.panoptic, True) if need_panoptic else None,
            segments_info=pick("segments_info", self.segments_info, True) if need_panoptic else None,
            semantic=self.semantic,
        )


# ---------------------------------------------------------------------------------------------- data


def load_eval_dataset(
    path: str,
    split: str | None = None,
    num_synthetic: int | None = None,
    synthetic_image_size: int | None = None,
    *,
    panoptic_root: str | None = None,
    image_root: str | None = None,
    label_root: str | None = None,
    split_file: str | None = None,
):
    """A data set from a local path, or the synthetic one (`"synthetic"`). Never downloads anything:

    - a COCO-panoptic JSON file (`panoptic_val2017.json`, `ade20k_panoptic_val.json`, ...): a
      [`CocoPanopticFolder`] (PNGs in `panoptic_root`, default the JSON's path without `.json`; images in
      `image_root`, default found next to the JSON);
    - a folder of images with `label_root` given: a [`SemanticLabelFolder`] (label maps paired by file stem,
      optionally listed in `split_file`);
    - anything else: `eovseg.data_sources.load_local_dataset` (a `save_to_disk` folder, a data file, a folder
      `datasets.load_dataset` reads; of a `DatasetDict`, `split`, else validation / val / test, else the only one).
    """
    if label_root is not None:
        return SemanticLabelFolder(path, label_root, split_file)
    if is_coco_panoptic_json(path):
        return CocoPanopticFolder(path, panoptic_root, image_root)
    if path == "synthetic":  # the held-out set `eovseg train --eval_dataset synthetic` evaluates on
        dataset = synthetic_eval_dataset(num_synthetic, synthetic_image_size)
        return pick_split(dataset, split, _EVAL_SPLITS, "--split")
    return load_local_dataset(path, split, _EVAL_SPLITS)


class _Shard:
    """This process's share of the data set: rows `start .. stop` of the first `total` (sized data sets, split in
    contiguous blocks as `np.array_split` does), or every `size`-th row from `rank` (iterables)."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = int(rank), int(size)

    @classmethod
    def of(cls, accelerator) -> "_Shard":
        if accelerator is None:
            return cls()
        return cls(accelerator.process_index, accelerator.num_processes)

    def bounds(self, total: int) -> tuple[int, int]:
        base, extra = divmod(total, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)


def _iterate_batches(dataset, batch_size: int, max_samples: int | None, shard: _Shard = _Shard()):
    """(row indices in the data set, rows as dicts), `batch_size` rows at a time, over this process's shard."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__") and not isinstance(dataset, Mapping):
        total = len(dataset)
        if max_samples is not None:
            total = min(total, max_samples)
        first, last = shard.bounds(total)
        for start in range(first, last, batch_size):
            stop = min(last, start + batch_size)
            if hasattr(dataset, "column_names"):  # datasets.Dataset: slice, columns of lists
                columns = dataset[start:stop]
                yield range(start, stop), [{k: v[i] for k, v in columns.items()} for i in range(stop - start)]
            else:
                yield range(start, stop), [dataset[i] for i in range(start, stop)]
        return
    indices, batch = [], []
    for i, row in enumerate(dataset):
        if max_samples is not None and i >= max_samples:
            break
        if i % shard.size != shard.rank:
            continue
        indices.append(i)
        batch.append(row)
        if len(batch) == batch_size:
            yield indices, batch
            indices, batch = [], []
    if batch:
        yield indices, batch


def _num_rows(dataset, max_samples, shard: _Shard = _Shard()):
    try:
        n = len(dataset)
    except TypeError:
        return max_samples
    n = n if max_samples is None else min(n, max_samples)
    start, stop = shard.bounds(n)
    return stop - start


# ---------------------------------------------------------------------------------------------- runner


def _tasks(task) -> list[str]:
    if isinstance(task, str):
        return list(TASKS) if task == "all" else [task]
    tasks = list(task)
    return tasks


def _semantic_reference(
    row,
    columns: DatasetColumns,
    category_to_label: dict[int, int],
    ignore_index: int,
    semantic_labels: str = "category_id",
    reduce_labels: bool = False,
):
    if columns.semantic is not None:
        labels = decode_label_map(row[columns.semantic], "semantic reference")
        if reduce_labels:  # label 0 is "other": ignored; the classes are 1 .. K
            labels = np.where(labels == 0, ignore_index, labels - 1)
            labels[labels == ignore_index - 1] = ignore_index
        if semantic_labels == "index":
            return np.where((labels >= 0) & (labels < len(category_to_label)), labels, ignore_index)
        out = np.full(labels.shape, ignore_index, dtype=np.int64)
        for category, label in category_to_label.items():
            out[labels == category] = label
        return out
    ids = decode_panoptic_ids(row[columns.panoptic], "panoptic reference")
    segments = normalize_segments(row[columns.segments_info], "reference segments_info")
    out = np.full(ids.shape, ignore_index, dtype=np.int64)
    for segment in segments:
        category = int(segment["category_id"])
        if int(segment["id"]) == 0 or category not in category_to_label:
            continue
        out[ids == int(segment["id"])] = category_to_label[category]
    return out


def _image_size(image) -> tuple[int, int] | None:
    """(height, width) of a PIL image, an (H, W, C) array or a (C, H, W) tensor; None when unknown."""
    if hasattr(image, "getbands") and hasattr(image, "size"):
        return int(image.size[1]), int(image.size[0])
    shape = getattr(image, "shape", None)
    if shape is None or len(shape) != 3:
        return None
    if hasattr(image, "detach"):
        return int(shape[1]), int(shape[2])
    return int(shape[0]), int(shape[1])


def _read_references(rows, indices, columns: DatasetColumns, images) -> tuple[list, list]:
    """The panoptic references (None for semantic-only data) and the size of each annotation, refusing an
    annotation whose size is not its image's (a label map at half resolution would be scored silently)."""
    references, sizes = [], []
    for index, row, image in zip(indices, rows, images):
        reference = None
        if columns.panoptic is not None:
            reference = {
                "segmentation": decode_panoptic_ids(row[columns.panoptic], f"row {index}: panoptic reference"),
                "segments_info": normalize_segments(row[columns.segments_info], f"row {index}: segments_info"),
            }
            size = reference["segmentation"].shape
        else:
            size = decode_label_map(row[columns.semantic], f"row {index}: semantic reference").shape
        image_size = _image_size(image)
        if image_size is not None and tuple(image_size) != tuple(size):
            raise ValueError(
                f"row {index}: the annotation is {size[0]}x{size[1]} but the image is {image_size[0]}x"
                f"{image_size[1]}; annotations must have their image's size (refusing to score a resized one)."
            )
        references.append(reference)
        sizes.append(tuple(int(s) for s in size))
    return references, sizes


def _check_vocabulary_meets_ground_truth(dataset, columns: DatasetColumns, categories, max_samples) -> None:
    """Refuse, before any forward pass, a vocabulary none of whose ids is a category of the ground truth's
    `segments_info` (where they can be read without the images: COCO-panoptic folders, Arrow data sets, lists)."""
    if columns.segments_info is None:
        return
    if isinstance(dataset, CocoPanopticFolder):
        lists = [a["segments_info"] for a in dataset.annotations[:max_samples]]
    elif hasattr(dataset, "column_names") and hasattr(dataset, "__len__"):
        n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
        lists = dataset.select(range(n))[columns.segments_info] if n < len(dataset) else dataset[columns.segments_info]
    elif isinstance(dataset, Sequence) and all(isinstance(r, Mapping) for r in dataset[:max_samples]):
        lists = [r.get(columns.segments_info) for r in dataset[:max_samples]]
    else:
        return
    seen = set()
    for segments in lists:
        seen.update(int(s["category_id"]) for s in normalize_segments(segments, "segments_info"))
    ids = {c["id"] for c in categories}
    if seen and not seen & ids:
        raise ValueError(
            f"None of the {len(ids)} vocabulary ids ({sorted(ids)[:5]} ...) is a ground-truth category of the data "
            f"set ({sorted(seen)[:5]} ...): nothing would be evaluated. Give the data set's vocabulary "
            "(--vocabulary NAME|FILE)."
        )


def _check_something_evaluated(scores: dict) -> None:
    """A run whose ground truth held no class of the vocabulary is an error, not a table of nan."""
    empty = []
    if "panoptic" in scores and not any(r["TP"] + r["FN"] for r in scores["panoptic"]["per_class"].values()):
        empty.append("no ground-truth segment of the vocabulary's categories (PQ)")
    if "semantic" in scores and all(math.isnan(r["ACC"]) for r in scores["semantic"]["per_class"].values()):
        empty.append("no ground-truth pixel of the vocabulary's classes (mIoU)")
    if empty and any(s["num_images"] for s in scores.values()):
        raise ValueError(
            f"Nothing was evaluated: {'; '.join(empty)}. Check that the vocabulary's ids are the data set's "
            "category ids (--vocabulary NAME|FILE)."
        )


def _build_metrics(tasks, categories, ignore, ignore_index, metric_kwargs) -> dict:
    label_to_category = [c["id"] for c in categories]
    options = {t: dict((metric_kwargs or {}).get(t, {})) for t in TASKS}
    metrics: dict[str, Any] = {}
    if "panoptic" in tasks:
        metrics["panoptic"] = PanopticQuality(categories, label_to_category, ignore, **options["panoptic"])
    if "semantic" in tasks:
        metrics["semantic"] = SemanticSegmentationMetric(
            len(categories), ignore_index=ignore_index, label_names=[c["name"] for c in categories],
            **options["semantic"],
        )
    if "instance" in tasks:
        if not any(c["isthing"] for c in categories):
            raise ValueError("Instance evaluation needs at least one thing category.")
        metrics["instance"] = InstanceSegmentationMetric(categories, label_to_category, **options["instance"])
    return metrics


def _post_process_kwargs(config, categories, post_process_kwargs) -> dict:
    kwargs = {t: dict((post_process_kwargs or {}).get(t, {})) for t in TASKS}
    kwargs["panoptic"].setdefault("threshold", float(getattr(config, "object_mask_threshold", 0.0)))
    kwargs["panoptic"].setdefault("overlap_mask_area_threshold", float(getattr(config, "overlap_threshold", 0.8)))
    kwargs["panoptic"].setdefault("label_ids_to_fuse", [i for i, c in enumerate(categories) if not c["isthing"]])
    kwargs["instance"].setdefault("thing_ids", [i for i, c in enumerate(categories) if c["isthing"]])
    kwargs["instance"].setdefault("return_coco_annotation", True)
    return kwargs


def _merge_processes(metrics: dict, records: dict, accelerator) -> None:
    """Merge the processes' results into `metrics` as one process would have accumulated them: the per-image
    panoptic counts and instance records replayed in data-set order (so that even float sums are bit-identical),
    the semantic confusion matrices (integers) added."""
    from accelerate.utils import gather_object

    for task, metric in metrics.items():
        if task == "semantic":
            states = gather_object([metric.state_dict()])
            metric.reset()
            for state in states:
                metric.merge(state)
            continue
        gathered = sorted(gather_object(records[task]), key=lambda item: item[0])
        metric.reset()
        for _, record in gathered:
            if task == "panoptic":
                metric.add_counts(record)
            else:
                metric.add_record(record)


def evaluate_model(
    model,
    processor,
    dataset,
    task: str | Sequence[str] = "panoptic",
    *,
    categories: Sequence[Mapping] | str | None = None,
    columns: DatasetColumns | Mapping | None = None,
    batch_size: int = 1,
    max_samples: int | None = None,
    ignore_category_ids: Iterable[int] = (),
    ignore_index: int = 255,
    semantic_labels: str = "category_id",
    reduce_labels: bool = False,
    post_process_kwargs: Mapping[str, Mapping] | None = None,
    metric_kwargs: Mapping[str, Mapping] | None = None,
    progress: bool = True,
    device=None,
    accelerator=None,
    class_ensemble: str | None = None,
) -> dict:
    """Run `model` over `dataset` and score its predictions.

    Args:
        model: an `EovSegForPanopticSegmentation` (put in eval mode for the run, its mode restored after).
        processor: an `EovSegProcessor` (its image processor prepares the images and post-processes the outputs,
            its tokenizer encodes the vocabulary once).
        dataset: a `datasets.Dataset` / `IterableDataset`, a [`CocoPanopticFolder`] / [`SemanticLabelFolder`] (see
            `load_eval_dataset`), or any sequence or iterable of row dicts.
        task: `"panoptic"`, `"semantic"`, `"instance"`, `"all"` or a list of them; all are computed from the same
            forward passes.
        categories: `[{"id", "name", "isthing"}]`, a path to a JSON file of them (a COCO panoptic JSON with
            `categories` works), a built-in vocabulary name (`"ade20k_150"`, with its dataset ids), or a list of
            names from the model's vocabulary. Default: the categories stored with the data set (`info.description`
            JSON with a `categories` list, as the synthetic data set has; a COCO-panoptic folder's JSON), else the
            model configuration's vocabulary with ids `0 .. K-1` (a warning says so). A vocabulary none of whose ids
            is a ground-truth category is an error.
        columns: a [`DatasetColumns`] or a dict of its fields.
        batch_size: images per forward pass.
        max_samples: evaluate only the first `max_samples` rows.
        ignore_category_ids: ground-truth categories treated as void / ignored.
        ignore_index: label of ignored pixels in semantic references (255; 65535 in 16-bit label maps).
        semantic_labels: what the values of a semantic label-map column are: `"category_id"` (default) or
            `"index"` (the position in `categories`, as in the label maps detectron2's preparation scripts write).
        reduce_labels: semantic label maps whose 0 is "other" (ADE20K's original annotations): 0 is ignored and
            every other value lowered by one, before the above.
        post_process_kwargs: extra arguments per task for the post-processing, e.g.
            `{"panoptic": {"threshold": 0.8}}`. Panoptic defaults: `threshold=config.object_mask_threshold`,
            `overlap_mask_area_threshold=config.overlap_threshold`, `label_ids_to_fuse` = the stuff classes.
            Instance defaults: `thing_ids` = the thing classes (when evaluating things only).
        metric_kwargs: extra arguments per task for the metric, e.g. `{"panoptic": {"conventions": "clean"},
            "semantic": {"convention": "mmseg"}}`.
        progress: show a tqdm progress bar (on the main process only).
        device: where to run (default: the model's device).
        accelerator: an `accelerate.Accelerator` of several processes: each evaluates its contiguous share of the
            data set and the results are merged so that every process returns exactly the numbers one process
            would give (with `batch_size=1`, or shares that are multiples of it: the batches decide the float
            round-off of batched kernels; images of different processed sizes never share a forward pass).
        class_ensemble: the model's class scoring for the run (`"geometric"` or `"embedding_modulation"`, which
            also encodes the processor's training vocabulary); default: the model configuration's.

    Returns:
        For one task, its metrics (see `PanopticQuality.compute`, `SemanticSegmentationMetric.compute`,
        `InstanceSegmentationMetric.compute`); for several, `{task: metrics}`. Scores in percent.
    """
    tasks = _checked_tasks(task, batch_size, semantic_labels)
    categories, ignore = _evaluation_categories(categories, model, dataset, ignore_category_ids)
    columns, need_panoptic, unresolved = _evaluation_columns(columns, dataset, tasks, categories, max_samples)
    metrics = _build_metrics(tasks, categories, ignore, ignore_index, metric_kwargs)
    run = _Run(model, processor, categories, columns, need_panoptic, metrics, device)
    run.unresolved = unresolved  # resolved from the first row's keys instead
    run.semantic_options = (ignore_index, semantic_labels, reduce_labels)
    run.class_ensemble = class_ensemble
    run.post_process = _post_process_kwargs(model.config, categories, post_process_kwargs)
    shard = _Shard.of(accelerator)
    records = run(dataset, batch_size, max_samples, shard, progress and shard.rank == 0)
    scores = _compute_scores(metrics, records, tasks, shard, accelerator)
    return scores[tasks[0]] if len(tasks) == 1 else scores


def _checked_tasks(task, batch_size: int, semantic_labels: str) -> list[str]:
    """The tasks asked for, after checking the arguments a typo could get wrong before any forward pass."""
    tasks = _tasks(task)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"Unknown task {t!r}; choose among {TASKS} or 'all'.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if semantic_labels not in ("category_id", "index"):
        raise ValueError(f"semantic_labels must be 'category_id' or 'index', got {semantic_labels!r}.")
    return tasks


def _evaluation_categories(categories, model, dataset, ignore_category_ids) -> tuple[list[dict], set[int]]:
    """The categories evaluated (see `evaluate_model`) and the ignored category ids, which leave the vocabulary:
    their ground truth is void and the model cannot predict them."""
    if categories is None and not (dataset_categories(dataset) if dataset is not None else None):
        logger.warning(
            "The data set stores no categories: evaluating with the model's own vocabulary (config.vocabulary, "
            "ids 0 .. K-1); give the data set's with --vocabulary NAME|FILE."
        )
    categories = resolve_categories(categories, dataset, model.config)
    ignore = {int(c) for c in ignore_category_ids}
    unknown = sorted(ignore - {c["id"] for c in categories})
    if unknown:  # a typo would otherwise ignore nothing, silently
        raise ValueError(f"ignore_category_ids {unknown} are not category ids of the vocabulary evaluated "
                         f"(ids {min(c['id'] for c in categories)}..{max(c['id'] for c in categories)}).")
    categories = [c for c in categories if c["id"] not in ignore]
    if not categories:
        raise ValueError("Every category is ignored: nothing to evaluate.")
    return categories, ignore


def _evaluation_columns(columns, dataset, tasks, categories, max_samples):
    """The data set's columns, resolved now when it names them (else from its first row: `unresolved`), whether
    panoptic references are needed, and a check that the vocabulary meets the panoptic ground truth."""
    if columns is None:
        columns = DatasetColumns(semantic="semantic" if isinstance(dataset, SemanticLabelFolder) else None)
    elif isinstance(columns, Mapping):
        columns = DatasetColumns(**columns)
    need_panoptic = any(t != "semantic" for t in tasks) or columns.semantic is None
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None:
        columns = columns.resolve(column_names, need_panoptic)
    if "panoptic" in tasks or "instance" in tasks:
        _check_vocabulary_meets_ground_truth(dataset, columns, categories, max_samples)
    return columns, need_panoptic, column_names is None


def _compute_scores(metrics, records, tasks, shard, accelerator) -> dict:
    """Every task's scores, the processes' results merged first, with an error when no image was scored."""
    if shard.size > 1:
        _merge_processes(metrics, records, accelerator)
    scores = {t: metrics[t].compute() for t in tasks}
    _check_something_evaluated(scores)
    return scores


class _Run:
    """One pass of the model over (a share of) a data set, feeding the metrics; keeps the per-image panoptic
    counts and instance records, by row index, for merging several processes."""

    def __init__(self, model, processor, categories, columns, need_panoptic, metrics, device):
        self.model, self.processor, self.categories = model, processor, categories
        self.columns, self.need_panoptic, self.metrics = columns, need_panoptic, metrics
        self.category_to_label = {c["id"]: i for i, c in enumerate(categories)}
        self.image_processor = getattr(processor, "image_processor", processor)
        self.device = device if device is not None else next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def __call__(self, dataset, batch_size, max_samples, shard: _Shard, progress: bool) -> dict:
        import torch

        records = {t: [] for t in self.metrics if t != "semantic"}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                text_inputs = self._text_inputs()
                bar = progress_bar(
                    total=_num_rows(dataset, max_samples, shard), desc=f"Evaluating ({', '.join(self.metrics)})",
                    unit="img", enabled=progress,
                )
                for indices, rows in _iterate_batches(dataset, batch_size, max_samples, shard):
                    self._batch(indices, rows, text_inputs, records)
                    bar.update(len(rows))
                bar.close()
        finally:
            self.model.train(was_training)
        return records

    class_ensemble: str | None = None  # the model's class scoring for the run (default: its configuration's)

    def _text_inputs(self) -> dict:
        vocabulary = self.processor.encode_vocabulary([c["name"] for c in self.categories], return_tensors="pt")
        text_inputs = {
            "text_embeddings": self.model.get_text_embeddings(vocabulary["input_ids"].to(self.device)),
            "synonym_counts": vocabulary["synonym_counts"].to(self.device),
            "class_seen_mask": vocabulary["class_seen_mask"].to(self.device),
        }
        if self.class_ensemble is not None:
            text_inputs["class_ensemble"] = self.class_ensemble
        if (self.class_ensemble or getattr(self.model.config, "class_ensemble", "geometric")) == "embedding_modulation":
            train = self.processor.encode_train_vocabulary(return_tensors="pt")
            text_inputs.update({key: value.to(self.device) for key, value in train.items()})
        return text_inputs

    def _batch(self, indices, rows, text_inputs, records) -> None:
        if self.unresolved:
            self.columns = self.columns.resolve(list(rows[0].keys()), self.need_panoptic)
            self.unresolved = False
        images = [row[self.columns.image] for row in rows]
        references, sizes = _read_references(rows, indices, self.columns, images)
        # images of one processed size per forward pass: padded to another's size, an image's result would change
        grouping = getattr(self.image_processor, "group_by_processed_size", None)  # another library's: as given
        for group in grouping(sizes) if grouping else [list(range(len(rows)))]:
            self._evaluate([indices[i] for i in group], [rows[i] for i in group], [images[i] for i in group],
                           [references[i] for i in group], [sizes[i] for i in group], text_inputs, records)

    def _evaluate(self, indices, rows, images, references, sizes, text_inputs, records) -> None:
        """Images of one processed size through the model, into the metrics."""
        inputs = self.image_processor(images, return_tensors="pt")
        outputs = self.model(
            pixel_values=inputs["pixel_values"].to(device=self.device, dtype=self.dtype),
            pixel_mask=inputs["pixel_mask"].to(self.device) if "pixel_mask" in inputs else None,
            **text_inputs,
        )
        post = self.image_processor
        if "panoptic" in self.metrics:
            results = post.post_process_panoptic_segmentation(outputs, target_sizes=sizes, **self.post_process["panoptic"])
            for index, result, reference in zip(indices, results, references):
                records["panoptic"].append((index, self.metrics["panoptic"].add(result, reference)))
        if "semantic" in self.metrics:
            results = post.post_process_semantic_segmentation(outputs, target_sizes=sizes, **self.post_process["semantic"])
            ignore_index, semantic_labels, reduce_labels = self.semantic_options
            for result, row in zip(results, rows):
                reference = _semantic_reference(
                    row, self.columns, self.category_to_label, ignore_index, semantic_labels, reduce_labels
                )
                self.metrics["semantic"].add(result, reference)
        if "instance" in self.metrics:
            results = post.post_process_instance_segmentation(outputs, target_sizes=sizes, **self.post_process["instance"])
            for index, result, reference in zip(indices, results, references):
                records["instance"].append((index, self.metrics["instance"].add(result, reference)))


# ---------------------------------------------------------------------------------------------- report


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "  -  "
    return f"{value:5.1f}"


def format_results(results: Mapping, task: str, per_class: bool = False) -> str:
    """A text table of one task's results (the panoptic one laid out as the COCO panoptic API prints it)."""
    lines = []
    if task == "panoptic":
        lines.append(f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s}  {'N':>5s}")
        lines.append("-" * 38)
        for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            lines.append(
                f"{name:10s}| {_fmt(results['PQ' + suffix])}  {_fmt(results['SQ' + suffix])}  "
                f"{_fmt(results['RQ' + suffix])}  {results['N' + suffix]:5d}"
            )
        if per_class:
            lines.append("")
            lines.append(f"{'class':30s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s}  {'TP':>5s} {'FP':>5s} {'FN':>5s}")
            for cid, r in results["per_class"].items():
                lines.append(
                    f"{str(r['name'])[:30]:30s}| {_fmt(r['PQ'])}  {_fmt(r['SQ'])}  {_fmt(r['RQ'])}  "
                    f"{r['TP']:5d} {r['FP']:5d} {r['FN']:5d}"
                )
    elif task == "semantic":
        lines.append(f"{'mIoU':>6s} {'fwIoU':>6s} {'mACC':>6s} {'pACC':>6s}")
        lines.append(" ".join(f"{_fmt(results[k]):>6s}" for k in ("mIoU", "fwIoU", "mACC", "pACC")))
        if per_class:
            lines.append("")
            lines.append(f"{'class':30s}| {'IoU':>5s}  {'ACC':>5s}")
            for r in results["per_class"].values():
                lines.append(f"{str(r['name'])[:30]:30s}| {_fmt(r['IoU'])}  {_fmt(r['ACC'])}")
    elif task == "instance":
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        lines.append(" ".join(f"{k:>6s}" for k in keys))
        lines.append(" ".join(f"{_fmt(results[k]):>6s}" for k in keys))
        if per_class:
            lines.append("")
            lines.append(f"{'class':30s}| {'AP':>5s}")
            for r in results["per_class"].values():
                lines.append(f"{str(r['name'])[:30]:30s}| {_fmt(r['AP'])}")
    else:
        raise ValueError(f"Unknown task {task!r}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line


def _load_model(spec: str, device: str | None):
    from ..auto_registration import load_model_folder
    from ..configuration_eovseg import EovSegConfig
    from ..modeling_eovseg import EovSegForPanopticSegmentation
    from ..processing import EovSegProcessor

    if spec.startswith("random:"):
        import torch

        config = EovSegConfig.from_variant(spec.split(":", 1)[1])
        torch.manual_seed(0)  # the same random weights in every process of a launch, and in every run
        model = EovSegForPanopticSegmentation(config)
        processor = EovSegProcessor.from_config(config)
    else:
        if not os.path.isdir(spec):
            raise FileNotFoundError(f"--model {spec}: not a local directory (nothing is downloaded).")
        model, processor = load_model_folder(spec)
    if device is not None:
        try:
            model.to(device)
        except (RuntimeError, AssertionError, ValueError) as err:  # no such device, or torch built without it
            raise ValueError(f"--device {device}: {str(err).strip().splitlines()[0]}") from None
    return model, processor


def _check_output(path: str | None, overwrite: bool) -> None:
    """Refuse, before any work, an --output that would replace a file without --overwrite."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"--output {path} is a folder; give a file name.")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"--output {path} exists; give a new file name or --overwrite to replace it.")


def _launched_accelerator():
    """An Accelerator when this process is one of several (torchrun / accelerate launch), else None. The CPU-only
    case runs one gloo group, as training does."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    from ..launch import launched_on_cpu_only

    return Accelerator(cpu=launched_on_cpu_only())


def run(argv: Sequence[str] | None = None) -> dict:
    """The command line's work: evaluate, print the tables and write --output (on the main process only)."""
    args = build_parser().parse_args(argv)
    with progress_switch(not args.no_progress):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> dict:
    _check_output(args.output, args.overwrite)
    accelerator = _launched_accelerator()
    model, processor = _load_model(args.model, str(accelerator.device) if accelerator else args.device)
    if args.shortest_edge is not None or args.longest_edge is not None:
        image_processor = getattr(processor, "image_processor", processor)
        size = dict(image_processor.size)
        if args.shortest_edge is not None:
            size["shortest_edge"] = args.shortest_edge
        if args.longest_edge is not None:
            size["longest_edge"] = args.longest_edge
        image_processor.size = size
    dataset = load_eval_dataset(
        args.dataset, args.split, num_synthetic=args.num_synthetic, synthetic_image_size=args.synthetic_image_size,
        panoptic_root=args.panoptic_root,
        image_root=args.image_root, label_root=args.label_root, split_file=args.split_file,
    )
    _check_named_columns(args, dataset)
    folder = isinstance(dataset, SemanticLabelFolder)
    # The command's one rule with training: the data set's stored classes, else --vocabulary (never a guess).
    categories = categories_for_command(args.vocabulary, dataset, model.config, "--vocabulary")
    columns = DatasetColumns(
        image=args.image_column,
        panoptic=args.panoptic_column,
        segments_info=args.segments_info_column,
        semantic="semantic" if folder else args.semantic_column,
    )
    post = {"panoptic": {}}
    if args.threshold is not None:
        post["panoptic"]["threshold"] = args.threshold
    if args.overlap_threshold is not None:
        post["panoptic"]["overlap_mask_area_threshold"] = args.overlap_threshold
    results = evaluate_model(
        model,
        processor,
        dataset,
        args.task,
        categories=categories,
        columns=columns,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        ignore_category_ids=args.ignore_category_ids,
        ignore_index=args.ignore_index,
        semantic_labels=args.label_values or ("index" if folder else "category_id"),
        reduce_labels=args.reduce_labels,
        post_process_kwargs=post,
        metric_kwargs={"panoptic": {"conventions": args.pq_conventions}, "semantic": {"convention": args.miou_convention}},
        progress=not args.no_progress,
        accelerator=accelerator,
    )
    if accelerator is None or accelerator.is_main_process:
        _report(args, results)
    return results


def _check_named_columns(args, dataset) -> None:
    """A column named on the command line must exist: the usual names tried in its place (`DatasetColumns`) are for
    the defaults, never for a name the user typed."""
    names = getattr(dataset, "column_names", None)
    if names is None:
        return
    parser = build_parser()
    for option in ("image_column", "panoptic_column", "segments_info_column"):
        value = getattr(args, option)
        if value != parser.get_default(option) and value not in names:
            raise ValueError(f"--{option} {value!r}: the data set has no such column (its columns: {list(names)}).")


def _report(args, results) -> None:
    by_task = results if args.task == "all" else {args.task: results}
    for task, task_results in by_task.items():
        print(f"\n[{task}] {task_results['num_images']} images")
        print(format_results(task_results, task, per_class=args.per_class))
    if args.output:
        from ..predict import write_atomic

        document = {
            "model": args.model,
            "dataset": args.dataset,
            "split": args.split,
            "task": args.task,
            "units": "percent",
            "results": nan_to_none(_stringify_keys(by_task)),
        }
        text = json.dumps(document, indent=2, allow_nan=False)
        write_atomic(Path(os.path.abspath(args.output)), lambda p: p.write_text(text, encoding="utf-8"))
        print(f"\nResults written to {args.output}")


# `python -m eovseg.evaluation.evaluate` / `eovseg evaluate`: 0 on success, 1 and one line for bad input (missing
# files, a vocabulary that matches nothing, an existing --output, ...), 2 for a usage error.
main = command_main(run, "evaluate")


def _stringify_keys(value):
    if isinstance(value, Mapping):
        return {str(k): _stringify_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify_keys(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate an EOV-Seg model on a data set: panoptic quality, semantic mIoU & co., instance mask AP.

`evaluate_model(model, processor, dataset, task, ...)` is what the training loop calls; the command line is

    python -m eovseg.evaluation.evaluate --model DIR --dataset PATH_OR_synthetic [--split validation]
        [--vocabulary categories.json] [--task panoptic|semantic|instance|all] [--batch_size N] [--output results.json]

The data set is a Hugging Face `datasets.Dataset` (or `IterableDataset`) in the COCO-panoptic layout: an image
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
import inspect
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._inputs import id_map, label_map, nan_to_none, normalize_categories, normalize_segments
from .instance import InstanceSegmentationMetric
from .panoptic import PanopticQuality
from .semantic import SemanticSegmentationMetric


__all__ = ["DatasetColumns", "categories_from_config", "dataset_categories", "evaluate_model", "format_results", "load_eval_dataset", "main"]

TASKS = ("panoptic", "semantic", "instance")

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


def categories_from_config(config) -> list[dict]:
    """Categories of a model configuration's default vocabulary: ids `0 .. K-1`, `isthing` from `is_thing`."""
    vocabulary = list(getattr(config, "vocabulary", None) or [])
    if not vocabulary:
        raise ValueError("The model configuration has no vocabulary: give the categories to evaluate.")
    is_thing = getattr(config, "is_thing", None)
    if is_thing is None or len(is_thing) != len(vocabulary):
        raise ValueError("The model configuration has no is_thing flags matching its vocabulary: give the categories.")
    return [{"id": i, "name": name, "isthing": bool(t)} for i, (name, t) in enumerate(zip(vocabulary, is_thing))]


def dataset_categories(dataset) -> list[dict] | None:
    """Categories stored with a data set (a JSON `"categories"` list in `dataset.info.description`, as the synthetic
    data set stores them), else None."""
    from ..training.synthetic import get_dataset_categories

    return get_dataset_categories(dataset)


def _resolve_categories(categories, model, dataset=None) -> list[dict]:
    if categories is None:
        stored = dataset_categories(dataset) if dataset is not None else None
        return normalize_categories(stored) if stored else categories_from_config(model.config)
    if isinstance(categories, str) and not os.path.exists(categories):
        from ..vocabularies import get_vocabulary

        categories = get_vocabulary(categories).categories()  # a built-in name; else an error listing them
    elif isinstance(categories, (str, os.PathLike)):
        categories = _read_categories_file(categories, model)
    elif isinstance(categories, Sequence) and categories and all(isinstance(c, str) for c in categories):
        categories = _categories_from_names(list(categories), model)
    return normalize_categories(categories)


def _categories_from_names(names: list[str], model) -> list[dict]:
    known = categories_from_config(model.config) if getattr(model.config, "vocabulary", None) else []
    by_name = {c["name"].strip(): c for c in known}
    missing = [n for n in names if n.strip() not in by_name]
    if missing:
        raise ValueError(
            f"The classes {missing[:5]} are not in the model's vocabulary, so whether they are things or stuff is "
            "unknown: give the vocabulary as a list of {'id', 'name', 'isthing'} dicts."
        )
    return [{"id": by_name[n.strip()]["id"], "name": n, "isthing": by_name[n.strip()]["isthing"]} for n in names]


def _read_categories_file(path, model) -> list:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, Mapping) and "categories" in data:
        data = data["categories"]
    if isinstance(data, list) and data and all(isinstance(c, str) for c in data):
        return _categories_from_names(data, model)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of categories (or a COCO json with 'categories').")
    return data


# ---------------------------------------------------------------------------------------------- data


def load_eval_dataset(path: str, split: str | None = None, num_synthetic: int = 8, seed: int = 0):
    """A data set from a local path, or the synthetic one (`"synthetic"`). Never downloads anything:
    a directory made by `save_to_disk` is loaded with `load_from_disk`, other local files/folders with
    `datasets.load_dataset` (parquet, json, arrow, imagefolder, ...)."""
    import datasets

    if path == "synthetic":
        from ..training.synthetic import make_synthetic_panoptic_dataset

        params = inspect.signature(make_synthetic_panoptic_dataset).parameters
        kwargs = {}
        for name in ("num_images", "num_samples", "num_examples", "n", "size", "length"):
            if name in params:
                kwargs[name] = num_synthetic
                break
        if "seed" in params:
            kwargs["seed"] = seed
        if "split" in params and split is not None:
            kwargs["split"] = split
        dataset = make_synthetic_panoptic_dataset(**kwargs)
        return _pick_split(dataset, split)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; give a local data set (nothing is downloaded) or 'synthetic'.")
    if os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(os.path.join(path, "state.json"))
    ):
        return _pick_split(datasets.load_from_disk(path), split)
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        builder = {"jsonl": "json", "parquet": "parquet", "json": "json", "arrow": "arrow", "csv": "csv"}.get(ext)
        if builder is None:
            raise ValueError(f"{path}: unsupported data file type {ext!r}.")
        return datasets.load_dataset(builder, data_files=path, split="train")
    dataset = datasets.load_dataset(path)
    return _pick_split(dataset, split)


def _pick_split(dataset, split):
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is None:
            for candidate in ("validation", "val", "test"):
                if candidate in dataset:
                    return dataset[candidate]
            if len(dataset) == 1:
                return next(iter(dataset.values()))
            raise ValueError(f"Choose a split among {list(dataset)} (--split).")
        if split not in dataset:
            raise KeyError(f"No split {split!r}; splits: {list(dataset)}.")
        return dataset[split]
    return dataset


def _iterate_batches(dataset, batch_size: int, max_samples: int | None):
    """Lists of rows (dicts), `batch_size` at a time."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__") and not isinstance(dataset, Mapping):
        total = len(dataset)
        if max_samples is not None:
            total = min(total, max_samples)
        for start in range(0, total, batch_size):
            stop = min(total, start + batch_size)
            if hasattr(dataset, "column_names"):  # datasets.Dataset: slice, columns of lists
                columns = dataset[start:stop]
                yield [{k: v[i] for k, v in columns.items()} for i in range(stop - start)]
            else:
                yield [dataset[i] for i in range(start, stop)]
        return
    batch = []
    for i, row in enumerate(dataset):
        if max_samples is not None and i >= max_samples:
            break
        batch.append(row)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _num_rows(dataset, max_samples):
    try:
        n = len(dataset)
    except TypeError:
        return max_samples
    return n if max_samples is None else min(n, max_samples)


# ---------------------------------------------------------------------------------------------- runner


def _tasks(task) -> list[str]:
    if isinstance(task, str):
        return list(TASKS) if task == "all" else [task]
    tasks = list(task)
    return tasks


def _semantic_reference(row, columns: DatasetColumns, category_to_label: dict[int, int], ignore_index: int):
    if columns.semantic is not None:
        labels = label_map(row[columns.semantic], "semantic reference")
        out = np.full(labels.shape, ignore_index, dtype=np.int64)
        for category, label in category_to_label.items():
            out[labels == category] = label
        return out
    ids = id_map(row[columns.panoptic], "panoptic reference")
    segments = normalize_segments(row[columns.segments_info], "reference segments_info")
    out = np.full(ids.shape, ignore_index, dtype=np.int64)
    for segment in segments:
        category = int(segment["category_id"])
        if int(segment["id"]) == 0 or category not in category_to_label:
            continue
        out[ids == int(segment["id"])] = category_to_label[category]
    return out


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
    post_process_kwargs: Mapping[str, Mapping] | None = None,
    progress: bool = True,
    device=None,
) -> dict:
    """Run `model` over `dataset` and score its predictions.

    Args:
        model: an `EovSegForPanopticSegmentation` (put in eval mode for the run, its mode restored after).
        processor: an `EovSegProcessor` (its image processor prepares the images and post-processes the outputs,
            its tokenizer encodes the vocabulary once).
        dataset: a `datasets.Dataset` / `IterableDataset` (or any sequence or iterable of row dicts).
        task: `"panoptic"`, `"semantic"`, `"instance"`, `"all"` or a list of them; all are computed from the same
            forward passes.
        categories: `[{"id", "name", "isthing"}]`, a path to a JSON file of them (a COCO panoptic JSON with
            `categories` works), a built-in vocabulary name (`"ade20k_150"`, with its dataset ids), or a list of
            names from the model's vocabulary. Default: the categories stored
            with the data set (`info.description` JSON with a `categories` list, as the synthetic data set has),
            else the model configuration's vocabulary with ids `0 .. K-1`.
        columns: a [`DatasetColumns`] or a dict of its fields.
        batch_size: images per forward pass.
        max_samples: evaluate only the first `max_samples` rows.
        ignore_category_ids: ground-truth categories treated as void / ignored.
        ignore_index: label of ignored pixels in semantic references.
        post_process_kwargs: extra arguments per task for the post-processing, e.g.
            `{"panoptic": {"threshold": 0.8}}`. Panoptic defaults: `threshold=config.object_mask_threshold`,
            `overlap_mask_area_threshold=config.overlap_threshold`, `label_ids_to_fuse` = the stuff classes.
            Instance defaults: `thing_ids` = the thing classes (when evaluating things only).
        progress: show a tqdm progress bar.
        device: where to run (default: the model's device).

    Returns:
        For one task, its metrics (see `PanopticQuality.compute`, `SemanticSegmentationMetric.compute`,
        `InstanceSegmentationMetric.compute`); for several, `{task: metrics}`. Scores in percent.
    """
    import torch
    from tqdm.auto import tqdm

    tasks = _tasks(task)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"Unknown task {t!r}; choose among {TASKS} or 'all'.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    categories = _resolve_categories(categories, model, dataset)
    ignore = {int(c) for c in ignore_category_ids}
    # Ignored categories leave the vocabulary: their ground truth is void and the model cannot predict them.
    categories = [c for c in categories if c["id"] not in ignore]
    if not categories:
        raise ValueError("Every category is ignored: nothing to evaluate.")
    label_to_category = [c["id"] for c in categories]
    category_to_label = {c["id"]: i for i, c in enumerate(categories)}
    stuff_labels = [i for i, c in enumerate(categories) if not c["isthing"]]
    thing_labels = [i for i, c in enumerate(categories) if c["isthing"]]
    if columns is None:
        columns = DatasetColumns()
    elif isinstance(columns, Mapping):
        columns = DatasetColumns(**columns)
    need_panoptic = any(t != "semantic" for t in tasks) or columns.semantic is None
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None:
        columns = columns.resolve(column_names, need_panoptic)
    unresolved = column_names is None  # resolved from the first row's keys instead

    metrics: dict[str, Any] = {}
    if "panoptic" in tasks:
        metrics["panoptic"] = PanopticQuality(categories, label_to_category, ignore)
    if "semantic" in tasks:
        metrics["semantic"] = SemanticSegmentationMetric(
            len(categories), ignore_index=ignore_index, label_names=[c["name"] for c in categories]
        )
    if "instance" in tasks:
        if not thing_labels:
            raise ValueError("Instance evaluation needs at least one thing category.")
        metrics["instance"] = InstanceSegmentationMetric(categories, label_to_category)

    config = model.config
    kwargs = {t: dict((post_process_kwargs or {}).get(t, {})) for t in TASKS}
    kwargs["panoptic"].setdefault("threshold", float(getattr(config, "object_mask_threshold", 0.0)))
    kwargs["panoptic"].setdefault("overlap_mask_area_threshold", float(getattr(config, "overlap_threshold", 0.8)))
    kwargs["panoptic"].setdefault("label_ids_to_fuse", stuff_labels)
    kwargs["instance"].setdefault("thing_ids", thing_labels)
    kwargs["instance"].setdefault("return_coco_annotation", True)

    image_processor = getattr(processor, "image_processor", processor)
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    try:
        with torch.no_grad():
            vocabulary = processor.encode_vocabulary([c["name"] for c in categories], return_tensors="pt")
            text_inputs = {
                "text_embeddings": model.get_text_embeddings(vocabulary["input_ids"].to(device)),
                "synonym_counts": vocabulary["synonym_counts"].to(device),
                "class_seen_mask": vocabulary["class_seen_mask"].to(device),
            }
            total = _num_rows(dataset, max_samples)
            bar = tqdm(total=total, desc=f"Evaluating ({', '.join(tasks)})", unit="img", disable=not progress)
            for rows in _iterate_batches(dataset, batch_size, max_samples):
                if unresolved:
                    columns = columns.resolve(list(rows[0].keys()), need_panoptic)
                    unresolved = False
                images = [row[columns.image] for row in rows]
                references = []
                sizes = []
                for row in rows:
                    reference = None
                    if columns.panoptic is not None:
                        reference = {
                            "segmentation": id_map(row[columns.panoptic], "panoptic reference"),
                            "segments_info": normalize_segments(row[columns.segments_info], "segments_info"),
                        }
                        size = reference["segmentation"].shape
                    else:
                        size = label_map(row[columns.semantic], "semantic reference").shape
                    references.append(reference)
                    sizes.append(tuple(int(s) for s in size))
                inputs = image_processor(images, return_tensors="pt")
                outputs = model(
                    pixel_values=inputs["pixel_values"].to(device=device, dtype=dtype),
                    pixel_mask=inputs["pixel_mask"].to(device) if "pixel_mask" in inputs else None,
                    **text_inputs,
                )
                if "panoptic" in metrics:
                    results = image_processor.post_process_panoptic_segmentation(
                        outputs, target_sizes=sizes, **kwargs["panoptic"]
                    )
                    for result, reference in zip(results, references):
                        metrics["panoptic"].add(result, reference)
                if "semantic" in metrics:
                    results = image_processor.post_process_semantic_segmentation(
                        outputs, target_sizes=sizes, **kwargs["semantic"]
                    )
                    for result, row in zip(results, rows):
                        metrics["semantic"].add(
                            result, _semantic_reference(row, columns, category_to_label, ignore_index)
                        )
                if "instance" in metrics:
                    results = image_processor.post_process_instance_segmentation(
                        outputs, target_sizes=sizes, **kwargs["instance"]
                    )
                    for result, reference in zip(results, references):
                        metrics["instance"].add(result, reference)
                bar.update(len(rows))
            bar.close()
    finally:
        model.train(was_training)

    scores = {t: metrics[t].compute() for t in tasks}
    return scores[tasks[0]] if len(tasks) == 1 else scores


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
    from ..configuration_eovseg import EovSegConfig
    from ..modeling_eovseg import EovSegForPanopticSegmentation
    from ..processing import EovSegProcessor

    if spec.startswith("random:"):
        config = EovSegConfig.from_variant(spec.split(":", 1)[1])
        model = EovSegForPanopticSegmentation(config)
        processor = EovSegProcessor.from_config(config)
    else:
        if not os.path.isdir(spec):
            raise FileNotFoundError(f"--model {spec}: not a local directory (nothing is downloaded).")
        model = EovSegForPanopticSegmentation.from_pretrained(spec)
        try:
            processor = EovSegProcessor.from_pretrained(spec)
        except (OSError, ValueError, TypeError):
            processor = EovSegProcessor.from_config(model.config)
    if device is not None:
        model.to(device)
    return model, processor


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eovseg.evaluation.evaluate",
        description="Evaluate an EOV-Seg model (panoptic PQ, semantic mIoU, instance mask AP; scores in percent).",
    )
    parser.add_argument("--model", required=True, help="model directory (save_pretrained), or random:<variant>")
    parser.add_argument("--dataset", required=True, help="local data set (save_to_disk folder, data files) or 'synthetic'")
    parser.add_argument("--split", default=None, help="split of a DatasetDict (default: validation/val/test)")
    parser.add_argument(
        "--vocabulary",
        default=None,
        help="built-in vocabulary name (ade20k_150, ...) or JSON file of categories [{id, name, isthing}] (or a COCO "
        "panoptic JSON); default: the model's vocabulary",
    )
    parser.add_argument("--task", default="panoptic", choices=[*TASKS, "all"])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--num_synthetic", type=int, default=8, help="images of the synthetic data set")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--panoptic_column", default="label", help="panoptic annotation column (RGB-encoded PNG)")
    parser.add_argument("--segments_info_column", default="segments_info")
    parser.add_argument("--semantic_column", default=None, help="class maps for semantic evaluation (category ids)")
    parser.add_argument("--ignore_category_ids", type=int, nargs="*", default=[])
    parser.add_argument("--threshold", type=float, default=None, help="panoptic: class score threshold")
    parser.add_argument("--overlap_threshold", type=float, default=None, help="panoptic: overlap area threshold")
    parser.add_argument("--shortest_edge", type=int, default=None, help="test resize: shorter side (processor's: 640)")
    parser.add_argument("--longest_edge", type=int, default=None, help="test resize: longer side cap (2560)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default=None, help="write the results here as JSON")
    parser.add_argument("--per_class", action="store_true", help="also print per-class tables")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    model, processor = _load_model(args.model, args.device)
    if args.shortest_edge is not None or args.longest_edge is not None:
        image_processor = getattr(processor, "image_processor", processor)
        size = dict(image_processor.size)
        if args.shortest_edge is not None:
            size["shortest_edge"] = args.shortest_edge
        if args.longest_edge is not None:
            size["longest_edge"] = args.longest_edge
        image_processor.size = size
    dataset = load_eval_dataset(args.dataset, args.split, num_synthetic=args.num_synthetic)
    columns = DatasetColumns(
        image=args.image_column,
        panoptic=args.panoptic_column,
        segments_info=args.segments_info_column,
        semantic=args.semantic_column,
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
        categories=args.vocabulary,
        columns=columns,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        ignore_category_ids=args.ignore_category_ids,
        post_process_kwargs=post,
        progress=not args.no_progress,
    )
    by_task = results if args.task == "all" else {args.task: results}
    for task, task_results in by_task.items():
        print(f"\n[{task}] {task_results['num_images']} images")
        print(format_results(task_results, task, per_class=args.per_class))
    if args.output:
        directory = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(directory, exist_ok=True)
        document = {
            "model": args.model,
            "dataset": args.dataset,
            "split": args.split,
            "task": args.task,
            "units": "percent",
            "results": nan_to_none(_stringify_keys(by_task)),
        }
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2, allow_nan=False)
        print(f"\nResults written to {args.output}")
    return results


def _stringify_keys(value):
    if isinstance(value, Mapping):
        return {str(k): _stringify_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify_keys(v) for v in value]
    return value


if __name__ == "__main__":
    main()
    sys.exit(0)

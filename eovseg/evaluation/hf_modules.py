"""`evaluate.EvaluationModule` wrappers of the streaming metrics, loaded by the scripts under `metrics/`.

`evaluate` normally writes every prediction to an Arrow cache and computes at the end, which for segmentation
maps means the whole data set on disk and then in memory. These modules keep `evaluate`'s calls (`add`,
`add_batch`, `compute(predictions=..., references=..., **kwargs)`) but feed each example straight into the
streaming accumulator, so only per-class sums (or RLE masks, for AP) are kept. Options (categories, num_labels,
...) are given to `evaluate.load(path, **options)` or, when not given there, to `compute(...)` together with the
predictions. Single process only (`num_process=1`).
"""

from __future__ import annotations

import datasets
import evaluate

from .instance import InstanceSegmentationMetric
from .panoptic import PanopticQuality
from .semantic import SemanticSegmentationMetric


_CITATION_PQ = """\
@inproceedings{kirillov2019panoptic,
  title={Panoptic Segmentation},
  author={Kirillov, Alexander and He, Kaiming and Girshick, Ross and Rother, Carsten and Doll{\\'a}r, Piotr},
  booktitle={CVPR},
  year={2019}
}
"""




def _panoptic_reference_features() -> dict:
    """The schema of a COCO-panoptic reference (id map + segments), shared by the panoptic and instance modules."""
    return {
        "segmentation": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
        "segments_info": datasets.Sequence(
            {"id": datasets.Value("int64"), "category_id": datasets.Value("int64"), "iscrowd": datasets.Value("int64")}
        ),
    }

class _StreamingModule(evaluate.Metric):
    """Shared plumbing: options at load time or compute time, examples added straight to the accumulator."""

    _option_names: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in self._option_names}
        unknown = [name for name in kwargs if name not in _EVALUATE_INIT_ARGS]
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown options {unknown}; options are {list(self._option_names)}.")
        super().__init__(*args, **kwargs)
        if self.num_process != 1:
            raise ValueError(f"{type(self).__name__} runs in a single process (num_process=1).")
        self._options = options
        self._accumulator = None

    def _build(self, options: dict):
        raise NotImplementedError

    def _get_accumulator(self, compute_options: dict | None = None):
        if self._accumulator is None:
            options = dict(self._options)
            options.update(compute_options or {})
            self._accumulator = self._build(options)
        elif compute_options:
            raise ValueError(
                "Options were given to compute() after examples were added with add()/add_batch(): give them to "
                "evaluate.load(...) instead."
            )
        return self._accumulator

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one image's prediction and reference to the accumulator."""
        if kwargs:
            raise ValueError(f"Bad inputs for evaluation module: {list(kwargs)}; give prediction= and reference=.")
        self._get_accumulator().add(prediction, reference)

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references to the accumulator."""
        if kwargs:
            raise ValueError(f"Bad inputs for evaluation module: {list(kwargs)}; give predictions= and references=.")
        if predictions is None or references is None:
            raise ValueError("add_batch needs both predictions= and references=.")
        self._get_accumulator().add_batch(predictions, references)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Compute the scores of everything added (plus `predictions`/`references` if given), then reset."""
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in self._option_names}
        if kwargs:
            raise ValueError(f"Unknown arguments {list(kwargs)}; options are {list(self._option_names)}.")
        accumulator = self._get_accumulator(options)
        if predictions is not None or references is not None:
            if predictions is None or references is None:
                raise ValueError("compute needs both predictions= and references=, or neither.")
            accumulator.add_batch(predictions, references)
        try:
            return accumulator.compute()
        finally:
            self._accumulator = None


_EVALUATE_INIT_ARGS = {
    "config_name",
    "keep_in_memory",
    "cache_dir",
    "num_process",
    "process_id",
    "seed",
    "experiment_id",
    "hash",
    "max_concurrent_cache_files",
    "timeout",
}

_PANOPTIC_INPUTS = """
Args:
    predictions: one per image, `{"segmentation": (H, W) id map, "segments_info": [{"id", "label_id" or
        "category_id", ...}]}` (the output of `post_process_panoptic_segmentation`).
    references: one per image, `{"segmentation": (H, W) id map or (H, W, 3) COCO-panoptic RGB map,
        "segments_info": [{"id", "category_id", "iscrowd"}]}`.
    categories: `[{"id", "name", "isthing"}]` (at load time or here).
    label_id_to_category_id: optional dict/list mapping prediction label ids to category ids.
    ignore_category_ids: optional ground-truth categories treated as void.
    conventions: "panopticapi" (default, the COCO panoptic API's numbers) or "clean" (see `PanopticQuality`).
Returns:
    PQ, SQ, RQ, N (all classes), PQ_th, SQ_th, RQ_th, N_th (things), PQ_st, SQ_st, RQ_st, N_st (stuff), in percent;
    per_class; num_images.
"""


class EovSegPanopticQuality(_StreamingModule):
    _option_names = ("categories", "label_id_to_category_id", "ignore_category_ids", "conventions")

    def _info(self):
        return evaluate.MetricInfo(
            description="Panoptic quality (PQ, SQ, RQ; all, things, stuff, per class) as the COCO panoptic API "
            "defines it, accumulated image by image.",
            citation=_CITATION_PQ,
            inputs_description=_PANOPTIC_INPUTS,
            features=datasets.Features(
                {
                    "predictions": {
                        "segmentation": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                        "segments_info": datasets.Sequence(
                            {"id": datasets.Value("int64"), "label_id": datasets.Value("int64")}
                        ),
                    },
                    "references": _panoptic_reference_features(),
                }
            ),
        )

    def _build(self, options):
        if options.get("categories") is None:
            raise ValueError("panoptic_quality needs categories=[{'id', 'name', 'isthing'}, ...] (at load or compute).")
        return PanopticQuality(
            options["categories"],
            label_id_to_category_id=options.get("label_id_to_category_id"),
            ignore_category_ids=options.get("ignore_category_ids") or (),
            conventions=options.get("conventions") or "panopticapi",
        )


_SEMANTIC_INPUTS = """
Args:
    predictions: one (H, W) map of class labels per image.
    references: one (H, W) map of class labels per image (`ignore_index` pixels are skipped).
    num_labels: number of classes (at load time or here).
    ignore_index: reference label to skip (255).
    reduce_labels: make label 0 ignored and shift the others down by one.
    label_names: optional class names.
    convention: "detectron2" (default: predicted-only classes left out of mIoU) or "mmseg" (they count as IoU 0).
Returns:
    mIoU, fwIoU, mACC, pACC (percent), per_class {label: {name, IoU, ACC}}, num_images.
"""


class EovSegMeanIoU(_StreamingModule):
    _option_names = ("num_labels", "ignore_index", "reduce_labels", "label_names", "convention")

    def _info(self):
        return evaluate.MetricInfo(
            description="Semantic segmentation mIoU, frequency-weighted IoU, mean class accuracy and pixel accuracy "
            "from a streaming confusion matrix.",
            citation="",
            inputs_description=_SEMANTIC_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _build(self, options):
        if options.get("num_labels") is None:
            raise ValueError("mean_iou needs num_labels (at load or compute).")
        return SemanticSegmentationMetric(
            options["num_labels"],
            ignore_index=options.get("ignore_index", 255) if options.get("ignore_index") is not None else 255,
            reduce_labels=bool(options.get("reduce_labels", False)),
            label_names=options.get("label_names"),
            convention=options.get("convention") or "detectron2",
        )


_INSTANCE_INPUTS = """
Args:
    predictions: one per image, `{"segmentation": (N, H, W) bool masks, a list of N COCO RLEs or a (H, W) id map,
        "segments_info": [{"id", "label_id" or "category_id", "score"}]}` (`post_process_instance_segmentation`).
    references: one per image, panoptic style `{"segmentation", "segments_info": [{"id", "category_id", "iscrowd"}]}`.
    categories: `[{"id", "name", "isthing"}]` (at load time or here).
    label_id_to_category_id, things_only (True), max_detections (100).
Returns:
    AP, AP50, AP75, APs, APm, APl (percent), per_class {category_id: {name, AP}}, num_images, num_detections.
"""


class EovSegMaskAP(_StreamingModule):
    _option_names = ("categories", "label_id_to_category_id", "things_only", "max_detections")

    def _info(self):
        return evaluate.MetricInfo(
            description="COCO mask AP (pycocotools COCOeval, segm) of instance segmentation.",
            citation="",
            inputs_description=_INSTANCE_INPUTS,
            features=datasets.Features(
                {
                    "predictions": {
                        "segmentation": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                        "segments_info": datasets.Sequence(
                            {
                                "id": datasets.Value("int64"),
                                "label_id": datasets.Value("int64"),
                                "score": datasets.Value("float32"),
                            }
                        ),
                    },
                    "references": _panoptic_reference_features(),
                }
            ),
        )

    def _build(self, options):
        if options.get("categories") is None:
            raise ValueError("mask_ap needs categories=[{'id', 'name', 'isthing'}, ...] (at load or compute).")
        kwargs = {}
        if options.get("things_only") is not None:
            kwargs["things_only"] = bool(options["things_only"])
        if options.get("max_detections") is not None:
            kwargs["max_detections"] = int(options["max_detections"])
        return InstanceSegmentationMetric(
            options["categories"], label_id_to_category_id=options.get("label_id_to_category_id"), **kwargs
        )

"""Instance segmentation mask AP with pycocotools' `COCOeval` (`iouType="segm"`).

Masks are run-length encoded (COCO RLE) as they arrive; `compute()` builds the COCO ground truth and the
detections from the RLEs and runs `COCOeval`. `AP` is the mean over IoU thresholds 0.50:0.05:0.95, `AP50`
and `AP75` at one threshold, `APs`/`APm`/`APl` by object area (< 32^2, 32^2..96^2, > 96^2 pixels); up to
`max_detections` detections per image (100) count, as COCO does. Scores are **in percent**; a score COCOeval
cannot define (-1) is nan. Ground-truth crowd segments become `iscrowd` annotations (detections on them are
neither true nor false positives, by COCOeval's rules).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..data_sources import normalize_categories
from ..inputs import as_int, decode_panoptic_ids, normalize_segments, segmentation_map_array
from ._inputs import StreamingMetric, LabelMapping, as_bool_flag, get_segments_info


__all__ = ["InstanceSegmentationMetric", "mask_ap"]


def _encode(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _masks_and_segments(example: Any, where: str) -> tuple[list, list[Mapping], tuple[int, int] | None]:
    """(list of RLEs or bool masks, segments_info, (H, W)) of an instance prediction or reference.

    The segmentation may be a `(N, H, W)` stack of binary masks or a list of N COCO RLE dicts (the i-th mask
    belonging to `segments_info[i]`), or a `(H, W)` map of ids (`segments_info[i]["id"]` naming the pixels of
    segment i; other values are background). A `(H, W, 3)` array is read as a COCO-panoptic RGB encoding.
    """
    if isinstance(example, Mapping) and "segmentation" not in example and "masks" in example:
        segmentation, segments = example["masks"], normalize_segments(example.get("segments_info"), where)
    else:
        segmentation, segments = get_segments_info(example, where)
    if isinstance(segmentation, (list, tuple)) and (
        len(segmentation) == 0 or isinstance(segmentation[0], Mapping)
    ):
        rles = []
        size = None
        for i, rle in enumerate(segmentation):
            if "counts" not in rle or "size" not in rle:
                raise ValueError(f"{where}: segmentation[{i}] is not a COCO RLE dict with 'size' and 'counts'.")
            counts = rle["counts"]
            rle = {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}
            if isinstance(counts, str):
                rle["counts"] = counts.encode("ascii")
            elif isinstance(counts, list):
                from pycocotools import mask as mask_utils

                rle = mask_utils.frPyObjects(rle, rle["size"][0], rle["size"][1])
            rles.append(rle)
            size = tuple(rle["size"])
        if len(rles) != len(segments):
            raise ValueError(f"{where}: {len(rles)} RLE masks for {len(segments)} segments_info entries.")
        return rles, segments, size
    array = segmentation_map_array(segmentation, f"{where} segmentation", panoptic=True)
    if array.ndim == 3 and array.shape[-1] not in (3, 4) or (array.ndim == 3 and array.dtype == bool):
        if array.shape[0] != len(segments):
            raise ValueError(f"{where}: {array.shape[0]} masks for {len(segments)} segments_info entries.")
        return [m.astype(bool) for m in array], segments, tuple(array.shape[1:])
    ids = decode_panoptic_ids(array, f"{where} segmentation")
    masks = []
    for i, segment in enumerate(segments):
        seg_id = as_int(segment.get("id"), f"{where} segments_info[{i}] id")
        masks.append(ids == seg_id)
    return masks, segments, tuple(ids.shape)


class InstanceSegmentationMetric(StreamingMetric):
    """Streaming COCO mask AP: `add(prediction, reference)` per image (masks kept as RLE), `compute()` at the end.

    Args:
        categories: COCO-style `[{"id", "name", "isthing"}]` (see `PanopticQuality`).
        label_id_to_category_id: maps a prediction's `label_id` to a category id (dict or list; None = identity).
        things_only: evaluate the thing categories only (default True, as instance segmentation is evaluated on
            COCO); predictions and references of the other categories are dropped.
        max_detections: detections per image that count (highest scores first), COCO's 100 by default.

    Inputs of `add`:
        prediction: `{"segmentation": ..., "segments_info": [{"label_id" or "category_id", "score", ...}]}` with the
            segmentation a `(N, H, W)` bool stack or a list of N COCO RLEs (as
            `post_process_instance_segmentation(..., return_binary_maps=True)` or `return_coco_annotation=True`
            give), or a `(H, W)` id map (the default output; overlapping instances then lose their hidden pixels).
        reference: panoptic style: `{"segmentation": id map or RGB-encoded map, "segments_info": [{"id",
            "category_id", "iscrowd"}]}` (or a mask stack / RLE list aligned with `segments_info`).
    """

    def __init__(
        self,
        categories: Sequence[Mapping] | Mapping,
        label_id_to_category_id: Mapping[int, int] | Sequence[int] | None = None,
        things_only: bool = True,
        max_detections: int = 100,
    ):
        all_categories = normalize_categories(categories)
        self.categories = [c for c in all_categories if c["isthing"] or not things_only]
        if not self.categories:
            raise ValueError("No category to evaluate (things_only=True and no thing category).")
        self._ids = {c["id"] for c in self.categories}
        self._mapping = LabelMapping(label_id_to_category_id)
        self.things_only = things_only
        self.max_detections = int(max_detections)
        self.reset()

    def reset(self) -> None:
        self._images: list[dict] = []
        self._gt: list[dict] = []
        self._dt: list[dict] = []

    @property
    def num_images(self) -> int:
        return len(self._images)

    def add(self, prediction: Any, reference: Any) -> dict:
        """Accumulate one image. Returns its record (image size, ground-truth annotations, detections) for
        `add_record`."""
        from pycocotools import mask as mask_utils

        gt_masks, gt_segments, gt_size = _masks_and_segments(reference, "reference")
        dt_masks, dt_segments, dt_size = _masks_and_segments(prediction, "prediction")
        if gt_size is None:
            raise ValueError("reference: cannot tell the image size from an empty list of RLEs.")
        if dt_size is not None and tuple(dt_size) != tuple(gt_size):
            raise ValueError(
                f"The prediction is {dt_size[0]}x{dt_size[1]} but the reference is {gt_size[0]}x{gt_size[1]}: "
                "post-process the prediction at the reference's size (target_sizes)."
            )
        annotations = []
        for i, (mask, segment) in enumerate(zip(gt_masks, gt_segments)):
            where = f"reference segments_info[{i}]"
            category = self._mapping.category_of(segment, where)
            if category not in self._ids:
                continue
            rle = mask if isinstance(mask, Mapping) else _encode(mask)
            area = float(mask_utils.area(rle))
            if area == 0:
                continue
            annotations.append(
                {
                    "category_id": category,
                    "segmentation": rle,
                    "area": area,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": int(as_bool_flag(segment.get("iscrowd", 0))),
                }
            )

        detections = []
        for i, (mask, segment) in enumerate(zip(dt_masks, dt_segments)):
            where = f"prediction segments_info[{i}]"
            category = self._mapping.category_of(segment, where)
            if category not in self._ids:
                continue
            if "score" not in segment:
                raise KeyError(f"{where}: instance predictions need a 'score'.")
            score = segment["score"]
            score = float(score.item() if hasattr(score, "item") else score)
            rle = mask if isinstance(mask, Mapping) else _encode(mask)
            detections.append((score, category, rle))
        detections.sort(key=lambda d: -d[0])
        record = {
            "height": int(gt_size[0]),
            "width": int(gt_size[1]),
            "annotations": annotations,
            "detections": [
                {
                    "category_id": category,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                    "score": score,
                }
                for score, category, rle in detections[: self.max_detections]
            ],
        }
        self.add_record(record)
        return record

    def add_record(self, record: Mapping) -> None:
        """Accumulate one image's record as `add` returned it (to replay, in order, images evaluated elsewhere)."""
        image_id = len(self._images) + 1
        self._images.append({"id": image_id, "height": record["height"], "width": record["width"]})
        for annotation in record["annotations"]:
            self._gt.append({**annotation, "id": len(self._gt) + 1, "image_id": image_id})
        for detection in record["detections"]:
            self._dt.append({**detection, "id": len(self._dt) + 1, "image_id": image_id})

    def compute(self) -> dict:
        """`AP`, `AP50`, `AP75`, `APs`, `APm`, `APl` (percent), `per_class` `{category_id: {"name", "AP"}}`,
        `num_images`, `num_detections`."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
        results: dict[str, Any] = {}
        if not self._images:
            results.update({n: float("nan") for n in names})
            results["per_class"] = {c["id"]: {"name": c["name"], "AP": float("nan")} for c in self.categories}
            results["num_images"] = 0
            results["num_detections"] = 0
            return results
        categories = [{"id": c["id"], "name": c["name"]} for c in self.categories]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = {"images": list(self._images), "annotations": list(self._gt), "categories": categories}
            coco_gt.createIndex()
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(self._images), "annotations": list(self._dt), "categories": categories}
            coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
            evaluator.params.maxDets = [1, 10, self.max_detections]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = evaluator.stats
        for i, name in enumerate(names):
            results[name] = float(100 * stats[i]) if stats[i] >= 0 else float("nan")
        precision = evaluator.eval["precision"]  # (iou thresholds, recall, categories, areas, max dets)
        per_class = {}
        cat_ids = [int(c) for c in evaluator.params.catIds]
        by_id = {c["id"]: c for c in self.categories}
        for k, cat_id in enumerate(cat_ids):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[cat_id] = {"name": by_id[cat_id]["name"], "AP": float(100 * p.mean()) if p.size else float("nan")}
        results["per_class"] = per_class
        results["num_images"] = len(self._images)
        results["num_detections"] = len(self._dt)
        return results


def mask_ap(
    predictions: Sequence,
    references: Sequence,
    categories: Sequence[Mapping] | Mapping,
    label_id_to_category_id: Mapping[int, int] | Sequence[int] | None = None,
    things_only: bool = True,
    max_detections: int = 100,
) -> dict:
    """COCO mask AP of lists of predictions and references (see `InstanceSegmentationMetric`)."""
    metric = InstanceSegmentationMetric(categories, label_id_to_category_id, things_only, max_detections)
    metric.add_batch(predictions, references)
    return metric.compute()

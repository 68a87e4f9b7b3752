"""Panoptic quality (PQ, SQ, RQ), computed image by image and accumulated per class.

Definition (that of the COCO panoptic API's `pq_compute`, Kirillov et al. 2019):

- *Void* pixels of the ground truth are those of id 0, of ids no segment of `segments_info` describes, and of
  segments whose category is not in `categories` or is listed in `ignore_category_ids`.
- A predicted segment and a ground-truth segment of the same category *match* when their IoU is strictly above
  0.5, where the union leaves out the predicted pixels that fall on void:
  `IoU = |P & G| / (|P| + |G| - |P & G| - |P & void|)`. Matches are unique, so no assignment step is needed.
- Crowd ground-truth segments (`iscrowd` = 1) are never matched and are no false negatives. A predicted segment
  that matched nothing is a false positive unless more than half of its area lies on void or on the crowd
  regions of its own category (`(|P & void| + |P & crowd_c|) / |P| > 0.5`); then it is ignored.
- Segments of zero area (listed but absent from the map) count for nothing.
- Per class: `PQ = sum IoU / (TP + FP/2 + FN/2)`, `SQ = sum IoU / TP` (0 when TP = 0),
  `RQ = TP / (TP + FP/2 + FN/2)`, with the sums over the whole data set. The overall, things and stuff scores
  are the plain means over the classes of the group with `TP + FP + FN > 0`; `N` is the number of such classes.

Scores are reported **in percent** (a perfect prediction has PQ = 100), as the COCO panoptic API prints them
and as detectron2 reports them. Where the COCO panoptic API differs, it is only where it fails or is silent:

- a class with no TP, FP or FN has PQ/SQ/RQ `nan` here (the API reports 0.0 but leaves it out of the mean,
  as we do); a group without any such class has `nan` (the API raises ZeroDivisionError);
- all crowd segments of a category in an image are pooled (the API keeps the last one only; the COCO format
  allows one crowd segment per category and image, where both agree);
- ids of the ground-truth map missing from `segments_info`, and segments of unknown or ignored categories, are
  void here (the API assumes every id is described and every category known);
- ids of the predicted map missing from `segments_info` mean "no segment" (the API raises on them); areas come
  from the maps, never from an `area` field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._inputs import StreamingMetric, LabelMapping, as_bool_flag, as_int, get_segments_info, id_map, normalize_categories


__all__ = ["PanopticQuality", "panoptic_quality"]


def _compact(ids: np.ndarray, valid_ids: np.ndarray) -> np.ndarray:
    """Index of each pixel's id in the sorted `valid_ids`, plus one; 0 for ids not in `valid_ids`."""
    if valid_ids.size == 0:
        return np.zeros(ids.shape, dtype=np.int64)
    position = np.searchsorted(valid_ids, ids)
    position = np.minimum(position, valid_ids.size - 1)
    hit = valid_ids[position] == ids
    return np.where(hit, position + 1, 0).astype(np.int64, copy=False)


class PanopticQuality(StreamingMetric):
    """Streaming panoptic quality: `add(prediction, reference)` image by image, `compute()` at the end.

    Only per-class sums (TP, FP, FN, sum of matched IoUs) are kept, so memory does not grow with the data set.

    Args:
        categories: the classes, COCO panoptic style: a list of `{"id": int, "name": str, "isthing": 0/1}` (or a dict
            `{id: {...}}`; `is_thing` is accepted for `isthing`). The averages run over these classes only.
        label_id_to_category_id: for segments that give a `label_id` (the model's class index, as our
            `post_process_panoptic_segmentation` returns) rather than a `category_id`: a dict or a list indexed by
            label id; None means label id = category id.
        ignore_category_ids: ground-truth categories whose pixels are void.

    Inputs of `add` (one image each):
        prediction: `{"segmentation": (H, W) segment-id map, "segments_info": [{"id", "label_id" or "category_id",
            ...}]}`, e.g. one element of `EovSegImageProcessor.post_process_panoptic_segmentation(...)` as is. Pixels
            whose id is not in `segments_info` (0 or -1 there) belong to no segment.
        reference: `{"segmentation": ..., "segments_info": [{"id", "category_id", "iscrowd"}]}`; the map may be a
            (H, W) id map or the (H, W, 3) RGB encoding of COCO panoptic PNGs (`id = R + 256 G + 256^2 B`), as a
            NumPy array, a torch tensor, a PIL image or a file path. The keys `panoptic_seg`/`annotation`/`label`
            are accepted for the map, and a `(segmentation, segments_info)` pair for the dict.
    """

    def __init__(
        self,
        categories: Sequence[Mapping] | Mapping,
        label_id_to_category_id: Mapping[int, int] | Sequence[int] | None = None,
        ignore_category_ids: Iterable[int] = (),
    ):
        self.categories = normalize_categories(categories)
        self._index = {c["id"]: i for i, c in enumerate(self.categories)}
        self._isthing = np.array([c["isthing"] for c in self.categories], dtype=bool)
        self._mapping = LabelMapping(label_id_to_category_id)
        self.ignore_category_ids = {int(c) for c in ignore_category_ids}
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        k = len(self.categories)
        self.iou_sum = np.zeros(k, dtype=np.float64)
        self.tp = np.zeros(k, dtype=np.int64)
        self.fp = np.zeros(k, dtype=np.int64)
        self.fn = np.zeros(k, dtype=np.int64)
        self.num_images = 0

    def state_dict(self) -> dict:
        """The accumulated sums (to merge results computed in several processes with `merge`)."""
        return {
            "category_ids": [c["id"] for c in self.categories],
            "iou_sum": self.iou_sum.tolist(),
            "tp": self.tp.tolist(),
            "fp": self.fp.tolist(),
            "fn": self.fn.tolist(),
            "num_images": self.num_images,
        }

    def merge(self, other: "PanopticQuality | Mapping") -> "PanopticQuality":
        """Add the sums of another accumulator (or of its `state_dict()`) over the same categories."""
        state = other.state_dict() if isinstance(other, PanopticQuality) else other
        if list(state["category_ids"]) != [c["id"] for c in self.categories]:
            raise ValueError("merge: the two accumulators have different categories.")
        self.iou_sum += np.asarray(state["iou_sum"], dtype=np.float64)
        self.tp += np.asarray(state["tp"], dtype=np.int64)
        self.fp += np.asarray(state["fp"], dtype=np.int64)
        self.fn += np.asarray(state["fn"], dtype=np.int64)
        self.num_images += int(state["num_images"])
        return self

    __iadd__ = merge

    # ------------------------------------------------------------------ accumulation

    def _listed_segments(self, segments: list, side: str):
        """(id, category id, entry, where) of each entry of a `segments_info` list, refusing an id listed twice."""
        seen = set()
        for j, segment in enumerate(segments):
            where = f"{side} segments_info[{j}]"
            seg_id = as_int(segment.get("id"), f"{where} id")
            if seg_id in seen:
                raise ValueError(f"{where}: the segment id {seg_id} appears twice.")
            seen.add(seg_id)
            yield seg_id, self._mapping.category_of(segment, where), segment, where

    def add(self, prediction: Any, reference: Any) -> dict:
        """Accumulate one image. Returns the image's own per-class counts `{category_id: {"tp", "fp", "fn",
        "iou_sum"}}` (classes with anything to count only)."""
        pred_map, pred_segments = get_segments_info(prediction, "prediction")
        gt_map, gt_segments = get_segments_info(reference, "reference")
        pred_ids = id_map(pred_map, "prediction segmentation")
        gt_ids = id_map(gt_map, "reference segmentation")
        if pred_ids.shape != gt_ids.shape:
            raise ValueError(
                f"The prediction map is {pred_ids.shape[0]}x{pred_ids.shape[1]} but the reference map is "
                f"{gt_ids.shape[0]}x{gt_ids.shape[1]}: post-process the prediction at the reference's size "
                "(target_sizes)."
            )

        # Ground-truth segments: (id, category index, iscrowd); everything else is void.
        gt_list = sorted(
            (seg_id, self._index[category], as_bool_flag(segment.get("iscrowd", 0)))
            for seg_id, category, segment, _ in self._listed_segments(gt_segments, "reference")
            if seg_id != 0 and category not in self.ignore_category_ids and category in self._index
        )
        pred_list = []
        for seg_id, category, _, where in self._listed_segments(pred_segments, "prediction"):
            if category not in self._index:
                raise ValueError(
                    f"{where}: category {category} is not one of the evaluated categories; give a "
                    "label_id_to_category_id mapping or the full list of categories."
                )
            pred_list.append((seg_id, self._index[category]))
        pred_list.sort()

        num_gt, num_pred = len(gt_list), len(pred_list)
        gt_c = _compact(gt_ids, np.array([s[0] for s in gt_list], dtype=np.int64))
        pred_c = _compact(pred_ids, np.array([s[0] for s in pred_list], dtype=np.int64))
        # Per-segment attributes, index 0 standing for void / no segment.
        gt_cat = np.array([-1] + [s[1] for s in gt_list], dtype=np.int64)
        gt_crowd = np.array([False] + [s[2] for s in gt_list], dtype=bool)
        pred_cat = np.array([-2] + [s[1] for s in pred_list], dtype=np.int64)

        gt_area = np.bincount(gt_c.ravel(), minlength=num_gt + 1)
        pred_area = np.bincount(pred_c.ravel(), minlength=num_pred + 1)
        joint = (gt_c * (num_pred + 1) + pred_c).ravel()
        size = (num_gt + 1) * (num_pred + 1)
        if size <= max(joint.size, 1 << 20):
            counts = np.bincount(joint, minlength=size)
            pairs = np.flatnonzero(counts)
            counts = counts[pairs]
        else:
            pairs, counts = np.unique(joint, return_counts=True)
        gi, pi = np.divmod(pairs, num_pred + 1)

        void_of_pred = np.zeros(num_pred + 1, dtype=np.int64)
        on_void = gi == 0
        void_of_pred[pi[on_void]] = counts[on_void]

        # Matches: same category, ground truth not crowd, IoU > 0.5.
        candidate = (gi > 0) & (pi > 0) & ~gt_crowd[gi] & (gt_cat[gi] == pred_cat[pi])
        cg, cp, inter = gi[candidate], pi[candidate], counts[candidate]
        union = pred_area[cp] + gt_area[cg] - inter - void_of_pred[cp]
        iou = inter / union
        matched = iou > 0.5
        gt_matched = np.zeros(num_gt + 1, dtype=bool)
        pred_matched = np.zeros(num_pred + 1, dtype=bool)
        gt_matched[cg[matched]] = True
        pred_matched[cp[matched]] = True

        k = len(self.categories)
        tp = np.zeros(k, dtype=np.int64)
        fp = np.zeros(k, dtype=np.int64)
        fn = np.zeros(k, dtype=np.int64)
        iou_sum = np.zeros(k, dtype=np.float64)
        np.add.at(tp, gt_cat[cg[matched]], 1)
        np.add.at(iou_sum, gt_cat[cg[matched]], iou[matched])

        # False negatives: unmatched, non-crowd ground truth of non-zero area.
        missed = ~gt_matched & ~gt_crowd & (gt_area > 0)
        missed[0] = False
        np.add.at(fn, gt_cat[missed], 1)

        # False positives: unmatched predictions of non-zero area not mostly on void or on crowd of their class.
        on_crowd = (gi > 0) & (pi > 0) & gt_crowd[gi] & (gt_cat[gi] == pred_cat[pi])
        crowd_of_pred = np.zeros(num_pred + 1, dtype=np.int64)
        np.add.at(crowd_of_pred, pi[on_crowd], counts[on_crowd])
        unmatched = ~pred_matched & (pred_area > 0)
        unmatched[0] = False
        idx = np.flatnonzero(unmatched)
        ignored = (void_of_pred[idx] + crowd_of_pred[idx]) / pred_area[idx] > 0.5
        np.add.at(fp, pred_cat[idx[~ignored]], 1)

        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.iou_sum += iou_sum
        self.num_images += 1
        active = np.flatnonzero(tp + fp + fn)
        return {
            self.categories[i]["id"]: {
                "tp": int(tp[i]),
                "fp": int(fp[i]),
                "fn": int(fn[i]),
                "iou_sum": float(iou_sum[i]),
            }
            for i in active
        }

    # ------------------------------------------------------------------ results

    def compute(self) -> dict:
        """The scores, in percent:

        - `PQ`, `SQ`, `RQ`, `N` over all classes; `PQ_th`, `SQ_th`, `RQ_th`, `N_th` over things; `PQ_st`,
          `SQ_st`, `RQ_st`, `N_st` over stuff (`N`: the number of classes averaged, those with TP + FP + FN > 0;
          a score is nan when its N is 0);
        - `per_class`: `{category_id: {"name", "isthing", "PQ", "SQ", "RQ", "TP", "FP", "FN"}}` for every category
          (scores nan for a class with no TP, FP or FN);
        - `num_images`.
        """
        denominator = self.tp + 0.5 * self.fp + 0.5 * self.fn
        present = (self.tp + self.fp + self.fn) > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            pq = np.where(present, self.iou_sum / np.where(present, denominator, 1.0), np.nan)
            sq = np.where(present, np.where(self.tp > 0, self.iou_sum / np.maximum(self.tp, 1), 0.0), np.nan)
            rq = np.where(present, self.tp / np.where(present, denominator, 1.0), np.nan)

        results: dict[str, Any] = {}
        for suffix, group in (("", np.ones_like(present)), ("_th", self._isthing), ("_st", ~self._isthing)):
            chosen = present & group
            n = int(chosen.sum())
            for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                results[name + suffix] = float(100.0 * values[chosen].sum() / n) if n else float("nan")
            results["N" + suffix] = n
        results["per_class"] = {
            c["id"]: {
                "name": c["name"],
                "isthing": c["isthing"],
                "PQ": float(100.0 * pq[i]),
                "SQ": float(100.0 * sq[i]),
                "RQ": float(100.0 * rq[i]),
                "TP": int(self.tp[i]),
                "FP": int(self.fp[i]),
                "FN": int(self.fn[i]),
            }
            for i, c in enumerate(self.categories)
        }
        results["num_images"] = self.num_images
        return results


def panoptic_quality(
    predictions: Sequence,
    references: Sequence,
    categories: Sequence[Mapping] | Mapping,
    label_id_to_category_id: Mapping[int, int] | Sequence[int] | None = None,
    ignore_category_ids: Iterable[int] = (),
) -> dict:
    """PQ of a list of predictions against a list of references (see `PanopticQuality`)."""
    metric = PanopticQuality(categories, label_id_to_category_id, ignore_category_ids)
    metric.add_batch(predictions, references)
    return metric.compute()

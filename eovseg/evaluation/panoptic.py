"""Panoptic quality (PQ, SQ, RQ), computed image by image and accumulated per class, equal to the COCO panoptic
API's `pq_compute` (Kirillov et al. 2019) on every input it accepts; see [`PanopticQuality`] for its rules.

Scores are reported **in percent** (a perfect prediction has PQ = 100), as the COCO panoptic API prints them and
as detectron2 reports them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..data_sources import normalize_categories
from ..inputs import as_int, decode_panoptic_ids
from ._inputs import StreamingMetric, LabelMapping, get_segments_info


__all__ = ["PanopticQuality", "panoptic_quality"]

CONVENTIONS = ("panopticapi", "clean")


def _compact(ids: np.ndarray, valid_ids: np.ndarray) -> np.ndarray:
    """Index of each pixel's id in the sorted `valid_ids`, plus one; 0 for ids not in `valid_ids`."""
    if valid_ids.size == 0:
        return np.zeros(ids.shape, dtype=np.int64)
    position = np.searchsorted(valid_ids, ids)
    position = np.minimum(position, valid_ids.size - 1)
    hit = valid_ids[position] == ids
    return np.where(hit, position + 1, 0).astype(np.int64, copy=False)


def _json_area(segment: Mapping, where: str) -> float:
    """The `area` of a ground-truth segments_info entry, nan when it has none."""
    area = segment.get("area")
    if area is None:
        return float("nan")
    if hasattr(area, "item"):
        area = area.item()
    if isinstance(area, bool) or not isinstance(area, (int, float)):
        raise TypeError(f"{where} area: expected a number, got {area!r}.")
    return float(area)


class PanopticQuality(StreamingMetric):
    """Streaming panoptic quality: `add(prediction, reference)` image by image, `compute()` at the end.

    Only per-class sums (TP, FP, FN, sum of matched IoUs) are kept, so memory does not grow with the data set, and
    accumulators filled in different processes add up with `merge`.

    **Definition** (the COCO panoptic API's `pq_compute`). A predicted and a ground-truth segment of the same
    category *match* when `IoU = |P & G| / (|P| + area(G) - |P & G| - |P & void|) > 0.5` (matches are then unique);
    a match is a TP, an unmatched non-crowd ground-truth segment a FN, and an unmatched prediction a FP unless
    more than half of it lies on void or on a crowd region of its category (`(|P & void| + |P & crowd_c|) / |P|
    > 0.5`), when it is ignored. Per class, over the whole data set: `PQ = sum IoU / (TP + FP/2 + FN/2)`,
    `SQ = sum IoU / TP` (0 when TP = 0), `RQ = TP / (TP + FP/2 + FN/2)`; the all / things / stuff scores are the
    plain means over the classes of the group with `TP + FP + FN > 0` (`N` of them).

    **Conventions of `pq_compute` reproduced by default** (`conventions="panopticapi"`), with what
    `conventions="clean"` does instead:

    1. *Several crowd regions of one category in an image*: only the one listed **last** in `segments_info`
       excuses predictions (the API keeps one crowd id per category). Clean: all of them are pooled.
    2. *Ground-truth segments listed with no pixel* are false negatives (unless crowd). Clean: they count for
       nothing.
    3. *Ground-truth ids of the map that `segments_info` does not list* (other than 0) are neither segments nor
       void: predicted pixels on them stay in the prediction's area and never excuse it. Clean: they are void.
    4. *Ground-truth segments of a category outside `categories`* are not void either (they are false negatives
       of a class that is never averaged). Clean: they are void.
    5. *`area`* of a ground-truth segment in the IoU's union is its `area` field when it has one (the JSON's
       value, even if it disagrees with the pixels), the pixel count otherwise. Clean: always the pixel count.
    6. *Crowd* means `iscrowd == 1` (2 is not crowd); both conventions.

    **Where the API fails, refuses or is silent** (both conventions):

    - predicted ids of the map not in `segments_info` (0 or -1 in post-processed outputs) belong to no segment,
      and listed predictions without a pixel count for nothing (the API raises on both); a prediction of a
      category outside `categories` is an error, as in the API;
    - an id listed twice in one `segments_info` is an error (the API keeps the last entry silently), and so is a
      ground-truth segment of id 0 (the API counts its pixels as the segment and as void at once, which can
      divide by zero); a prediction may use id 0 as any other id;
    - a ground-truth segment without `iscrowd` is not crowd (the API raises);
    - a class with no TP, FP or FN has PQ/SQ/RQ `nan` (the API reports 0.0 and leaves it out of the means, as
      here); a group without any such class has `nan` (the API raises ZeroDivisionError);
    - an `area` so small that a union is not positive is an error (the API divides by zero).

    `benchmarks/compare_pq_with_panopticapi.py` checks the default against `pq_compute` on random COCO-panoptic
    cases covering each of these.

    Args:
        categories: the classes, COCO panoptic style: a list of `{"id": int, "name": str, "isthing": 0/1}` (or a dict
            `{id: {...}}`; `is_thing` is accepted for `isthing`). The averages run over these classes only.
        label_id_to_category_id: for segments that give a `label_id` (the model's class index, as our
            `post_process_panoptic_segmentation` returns) rather than a `category_id`: a dict or a list indexed by
            label id; None means label id = category id.
        ignore_category_ids: ground-truth categories whose pixels are void (not a `pq_compute` option; empty by
            default).
        conventions: `"panopticapi"` (default: `pq_compute`'s numbers) or `"clean"` (the rules above).

    Inputs of `add` (one image each):
        prediction: `{"segmentation": (H, W) segment-id map, "segments_info": [{"id", "label_id" or "category_id",
            ...}]}`, e.g. one element of `EovSegImageProcessor.post_process_panoptic_segmentation(...)` as is.
        reference: `{"segmentation": ..., "segments_info": [{"id", "category_id", "iscrowd"[, "area"]}]}`; the map
            may be a (H, W) id map or the (H, W, 3) RGB encoding of COCO panoptic PNGs (`id = R + 256 G +
            256^2 B`), as a NumPy array, a torch tensor, a PIL image or a file path. The keys
            `panoptic_seg`/`annotation`/`label` are accepted for the map, and a `(segmentation, segments_info)` pair
            for the dict.
    """

    def __init__(
        self,
        categories: Sequence[Mapping] | Mapping,
        label_id_to_category_id: Mapping[int, int] | Sequence[int] | None = None,
        ignore_category_ids: Iterable[int] = (),
        conventions: str = "panopticapi",
    ):
        if conventions not in CONVENTIONS:
            raise ValueError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}.")
        self.categories = normalize_categories(categories)
        self._index = {c["id"]: i for i, c in enumerate(self.categories)}
        self._isthing = np.array([c["isthing"] for c in self.categories], dtype=bool)
        self._mapping = LabelMapping(label_id_to_category_id)
        self.ignore_category_ids = {int(c) for c in ignore_category_ids}
        self.conventions = conventions
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

    # ------------------------------------------------------------------ reading one image

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

    def _reference_table(self, segments: list) -> tuple[dict, list[int] | None]:
        """The evaluated ground-truth segments as arrays sorted by id (index 0 = no segment), and the void ids
        (None: every pixel of no evaluated segment is void).

        Category index `K` (one past the last) stands for categories outside `categories` (never averaged)."""
        clean = self.conventions == "clean"
        unknown = len(self.categories)
        rows, void_ids = [], [0]
        for position, (seg_id, category, segment, where) in enumerate(self._listed_segments(segments, "reference")):
            if seg_id == 0:
                raise ValueError(f"{where}: id 0 is void in COCO panoptic ground truth and cannot be a segment.")
            if category in self.ignore_category_ids or (clean and category not in self._index):
                void_ids.append(seg_id)
                continue
            crowd = segment.get("iscrowd", 0)
            crowd = (crowd.item() if hasattr(crowd, "item") else crowd) == 1
            area = float("nan") if clean else _json_area(segment, where)
            rows.append((seg_id, self._index.get(category, unknown), crowd, area, position))
        rows.sort()
        if clean:
            void_ids = None  # every pixel that is no evaluated segment
        table = {
            "ids": np.array([r[0] for r in rows], dtype=np.int64),
            "category": np.array([-1] + [r[1] for r in rows], dtype=np.int64),
            "crowd": np.array([False] + [r[2] for r in rows], dtype=bool),
            "json_area": np.array([np.nan] + [r[3] for r in rows], dtype=np.float64),
            "position": np.array([-1] + [r[4] for r in rows], dtype=np.int64),
        }
        return table, void_ids

    def _prediction_table(self, segments: list) -> dict:
        """The listed predicted segments as arrays sorted by id (index 0 = no segment)."""
        rows = []
        for seg_id, category, _, where in self._listed_segments(segments, "prediction"):
            if category not in self._index:
                raise ValueError(
                    f"{where}: category {category} is not one of the evaluated categories; give a "
                    "label_id_to_category_id mapping or the full list of categories."
                )
            rows.append((seg_id, self._index[category]))
        rows.sort()
        return {
            "ids": np.array([r[0] for r in rows], dtype=np.int64),
            "category": np.array([-2] + [r[1] for r in rows], dtype=np.int64),
        }

    # ------------------------------------------------------------------ counting one image

    def _crowd_regions(self, gt: dict) -> np.ndarray:
        """Which ground-truth segments excuse unmatched predictions of their category (convention 1)."""
        if self.conventions == "clean":
            return gt["crowd"]
        chosen = np.zeros(gt["crowd"].shape, dtype=bool)
        last = {}
        for index in np.argsort(gt["position"], kind="stable"):
            if gt["crowd"][index]:
                last[int(gt["category"][index])] = index
        chosen[list(last.values())] = True
        return chosen

    def add(self, prediction: Any, reference: Any) -> dict:
        """Accumulate one image. Returns the image's own per-class counts `{category_id: {"tp", "fp", "fn",
        "iou_sum"}}` (classes with anything to count only)."""
        pred_map, pred_segments = get_segments_info(prediction, "prediction")
        gt_map, gt_segments = get_segments_info(reference, "reference")
        pred_ids = decode_panoptic_ids(pred_map, "prediction segmentation")
        gt_ids = decode_panoptic_ids(gt_map, "reference segmentation")
        if pred_ids.shape != gt_ids.shape:
            raise ValueError(
                f"The prediction map is {pred_ids.shape[0]}x{pred_ids.shape[1]} but the reference map is "
                f"{gt_ids.shape[0]}x{gt_ids.shape[1]}: post-process the prediction at the reference's size "
                "(target_sizes)."
            )
        gt, void_ids = self._reference_table(gt_segments)
        pred = self._prediction_table(pred_segments)
        counts = self._count(_PixelPairs(gt_ids, gt, pred_ids, pred, void_ids), gt, pred)
        tp, fp, fn, iou_sum = (c[: len(self.categories)] for c in counts)
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.iou_sum += iou_sum
        self.num_images += 1
        return {
            self.categories[i]["id"]: {"tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i]), "iou_sum": float(iou_sum[i])}
            for i in np.flatnonzero(tp + fp + fn)
        }

    def add_counts(self, counts: Mapping) -> None:
        """Accumulate one image's counts as `add` returned them (to replay, in order, images evaluated elsewhere:
        the sums are then bit-identical to adding the images here)."""
        for category_id, count in counts.items():
            i = self._index[int(category_id)]
            self.tp[i] += count["tp"]
            self.fp[i] += count["fp"]
            self.fn[i] += count["fn"]
            self.iou_sum[i] += count["iou_sum"]
        self.num_images += 1

    def _count(self, pairs: "_PixelPairs", gt: dict, pred: dict):
        """(TP, FP, FN, IoU sum) per category index of one image, with the bucket `K` of unknown categories."""
        gi, pi, inter = pairs.gi, pairs.pi, pairs.counts
        clean = self.conventions == "clean"
        gt_area = pairs.gt_area.astype(np.float64)
        if not clean:
            gt_area = np.where(np.isnan(gt["json_area"]), gt_area, gt["json_area"])

        # Matches: both listed, same category, ground truth not crowd, IoU > 0.5.
        candidate = (gi > 0) & (pi > 0) & ~gt["crowd"][gi] & (gt["category"][gi] == pred["category"][pi])
        cg, cp, inter = gi[candidate], pi[candidate], inter[candidate]
        union = pairs.pred_area[cp] + gt_area[cg] - inter - pairs.void_of_pred[cp]
        if np.any(union <= 0):
            bad = int(gt["ids"][cg[np.flatnonzero(union <= 0)[0]] - 1])
            raise ValueError(f"reference segment {bad}: its 'area' is too small for the pixels it overlaps.")
        iou = inter / union
        matched = iou > 0.5
        gt_matched = np.zeros(gt["category"].shape, dtype=bool)
        pred_matched = np.zeros(pred["category"].shape, dtype=bool)
        gt_matched[cg[matched]] = True
        pred_matched[cp[matched]] = True

        k = len(self.categories) + 1
        tp = np.bincount(gt["category"][cg[matched]], minlength=k)
        iou_sum = np.zeros(k, dtype=np.float64)
        np.add.at(iou_sum, gt["category"][cg[matched]], iou[matched])

        missed = ~gt_matched & ~gt["crowd"]
        if clean:
            missed &= pairs.gt_area > 0
        missed[0] = False
        fn = np.bincount(gt["category"][missed], minlength=k)

        crowd = self._crowd_regions(gt)
        on_crowd = (gi > 0) & (pi > 0) & crowd[gi] & (gt["category"][gi] == pred["category"][pi])
        crowd_of_pred = np.bincount(pi[on_crowd], weights=pairs.counts[on_crowd], minlength=pred_matched.size)
        unmatched = ~pred_matched & (pairs.pred_area > 0)
        unmatched[0] = False
        idx = np.flatnonzero(unmatched)
        ignored = (pairs.void_of_pred[idx] + crowd_of_pred[idx]) / pairs.pred_area[idx] > 0.5
        fp = np.bincount(pred["category"][idx[~ignored]], minlength=k)
        return tp, fp, fn, iou_sum

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


class _PixelPairs:
    """Pixel counts of one image: of each (ground-truth segment, predicted segment) pair that overlaps (`gi`, `pi`,
    `counts`; index 0 = no listed segment), of each segment (`gt_area`, `pred_area`), and of each prediction on
    void (`void_of_pred`)."""

    def __init__(self, gt_ids: np.ndarray, gt: dict, pred_ids: np.ndarray, pred: dict, void_ids: list[int] | None):
        num_gt, num_pred = gt["ids"].size, pred["ids"].size
        gt_c = _compact(gt_ids, gt["ids"]).ravel()
        pred_c = _compact(pred_ids, pred["ids"]).ravel()
        self.gt_area = np.bincount(gt_c, minlength=num_gt + 1)
        self.pred_area = np.bincount(pred_c, minlength=num_pred + 1)
        if void_ids is None:
            void = gt_c == 0
        else:
            void = np.isin(gt_ids.ravel(), void_ids) if len(void_ids) > 1 else gt_ids.ravel() == 0
        self.void_of_pred = np.bincount(pred_c[void], minlength=num_pred + 1)
        joint = gt_c * (num_pred + 1) + pred_c
        size = (num_gt + 1) * (num_pred + 1)
        if size <= max(joint.size, 1 << 20):
            counts = np.bincount(joint, minlength=size)
            pairs = np.flatnonzero(counts)
            self.counts = counts[pairs]
        else:
            pairs, self.counts = np.unique(joint, return_counts=True)
        self.gi, self.pi = np.divmod(pairs, num_pred + 1)


def panoptic_quality(
    predictions: Sequence,
    references: Sequence,
    categories: Sequence[Mapping] | Mapping,
    label_id_to_category_id: Mapping[int, int] | Sequence[int] | None = None,
    ignore_category_ids: Iterable[int] = (),
    conventions: str = "panopticapi",
) -> dict:
    """PQ of a list of predictions against a list of references (see `PanopticQuality`)."""
    metric = PanopticQuality(categories, label_id_to_category_id, ignore_category_ids, conventions)
    metric.add_batch(predictions, references)
    return metric.compute()

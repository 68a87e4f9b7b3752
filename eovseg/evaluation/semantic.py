"""Semantic segmentation metrics (mIoU, fwIoU, mean class accuracy, pixel accuracy) from a streaming confusion
matrix, as detectron2's `SemSegEvaluator` defines them.

For `K` classes, the `K x (K + 1)` confusion matrix counts, over every pixel whose reference label is not
`ignore_index`, (reference class, predicted class); predictions outside `[0, K)` fall in the extra last column
(they are wrong for every class and belong to none). With `TP_c` the diagonal, `GT_c` the row sums and `PRED_c`
the column sums of the first `K` columns:

- `IoU_c = TP_c / (GT_c + PRED_c - TP_c)`; `mIoU` is its mean over the classes it is defined for, which depends
  on the convention (below); `fwIoU = sum_c GT_c / sum GT * IoU_c` over the same classes;
- `ACC_c = TP_c / GT_c`, defined when `GT_c > 0`; `mACC` is their mean; `pACC = sum TP / sum GT`.

Conventions (`convention=`), which differ only for classes **predicted but absent from the ground truth**:

- `"detectron2"` (default; detectron2's `SemSegEvaluator`, with which the paper's mIoU was computed): IoU is
  defined only for classes with ground-truth pixels (`GT_c > 0`); a class the ground truth never shows is nan and
  left out of mIoU, however often it is predicted;
- `"mmseg"` (mmsegmentation's `IoUMetric` and `evaluate`'s `mean_iou`): IoU is defined when `GT_c + PRED_c > 0`;
  a predicted-only class has IoU 0 and lowers mIoU.

In both, classes absent from both the ground truth and the predictions are nan and left out; reference pixels
equal to `ignore_index` (255) are skipped, predictions on them count for nothing; with `reduce_labels`
(mmseg's `reduce_zero_label`, for ADE20K's original annotations) label 0 becomes `ignore_index` and the others
are lowered by one, so 255 stays ignored.

Scores are **in percent**; an undefined score is nan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..inputs import decode_label_map
from ._inputs import StreamingMetric


__all__ = ["SemanticSegmentationMetric", "mean_iou"]


class SemanticSegmentationMetric(StreamingMetric):
    """Streaming mIoU & co.: `add(prediction, reference)` per image, `compute()` at the end.

    Args:
        num_labels: number of classes `K` (labels `0 .. K-1`).
        ignore_index: reference label of pixels that are not evaluated (default 255).
        reduce_labels: subtract 1 from every reference label and make label 0 `ignore_index` first (for data sets
            whose label 0 is "background/unlabeled", as `evaluate`'s `mean_iou` does).
        label_names: optional class names for `per_class`.
        convention: `"detectron2"` (default) or `"mmseg"`: whether a class predicted but absent from the ground
            truth is left out of mIoU or counts with IoU 0 (see the module's docstring).

    Inputs: `prediction` and `reference` are `(H, W)` maps of class labels (NumPy arrays, torch tensors such as
    the output of `post_process_semantic_segmentation`, PIL images, file paths).
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = 255,
        reduce_labels: bool = False,
        label_names: Sequence[str] | None = None,
        convention: str = "detectron2",
    ):
        if convention not in ("detectron2", "mmseg"):
            raise ValueError(f"convention must be 'detectron2' or 'mmseg', got {convention!r}.")
        self.convention = convention
        if int(num_labels) < 1:
            raise ValueError(f"num_labels must be positive, got {num_labels}.")
        self.num_labels = int(num_labels)
        self.ignore_index = int(ignore_index)
        self.reduce_labels = bool(reduce_labels)
        if label_names is not None and len(label_names) != self.num_labels:
            raise ValueError(f"label_names has {len(label_names)} names for {self.num_labels} labels.")
        self.label_names = list(label_names) if label_names is not None else None
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_labels, self.num_labels + 1), dtype=np.int64)
        self.num_images = 0

    def state_dict(self) -> dict:
        return {"confusion": self.confusion.tolist(), "num_images": self.num_images}

    def merge(self, other: "SemanticSegmentationMetric | Mapping") -> "SemanticSegmentationMetric":
        state = other.state_dict() if isinstance(other, SemanticSegmentationMetric) else other
        confusion = np.asarray(state["confusion"], dtype=np.int64)
        if confusion.shape != self.confusion.shape:
            raise ValueError("merge: the confusion matrices have different shapes.")
        self.confusion += confusion
        self.num_images += int(state["num_images"])
        return self

    __iadd__ = merge

    def add(self, prediction: Any, reference: Any) -> None:
        pred = decode_label_map(prediction, "prediction")
        gt = decode_label_map(reference, "reference")
        if pred.shape != gt.shape:
            raise ValueError(
                f"The prediction is {pred.shape[0]}x{pred.shape[1]} but the reference is {gt.shape[0]}x{gt.shape[1]}: "
                "post-process the prediction at the reference's size (target_sizes)."
            )
        k = self.num_labels
        if self.reduce_labels:
            gt = np.where(gt == 0, self.ignore_index, gt - 1)
            gt = np.where(gt == self.ignore_index - 1, self.ignore_index, gt)
        valid = gt != self.ignore_index
        gt = gt[valid]
        pred = pred[valid]
        bad = (gt < 0) | (gt >= k)
        if bad.any():
            raise ValueError(
                f"The reference holds labels outside [0, {k}) other than ignore_index={self.ignore_index} "
                f"(e.g. {int(gt[bad][0])})."
            )
        pred = np.where((pred < 0) | (pred >= k), k, pred)
        self.confusion += np.bincount(gt * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)
        self.num_images += 1

    def compute(self) -> dict:
        """`mIoU`, `fwIoU`, `mACC`, `pACC` (percent), `per_class` `{label: {"name", "IoU", "ACC"}}` (nan where
        undefined) and `num_images`."""
        k = self.num_labels
        tp = np.diag(self.confusion[:, :k]).astype(np.float64)
        pos_gt = self.confusion.sum(1).astype(np.float64)
        pos_pred = self.confusion[:, :k].sum(0).astype(np.float64)
        union = pos_gt + pos_pred - tp
        acc_valid = pos_gt > 0
        iou_valid = acc_valid if self.convention == "detectron2" else (pos_gt + pos_pred) > 0
        iou = np.full(k, np.nan)
        acc = np.full(k, np.nan)
        iou[iou_valid] = tp[iou_valid] / union[iou_valid]
        acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
        total = pos_gt.sum()
        results = {
            "mIoU": float(100 * iou[iou_valid].mean()) if iou_valid.any() else float("nan"),
            "fwIoU": float(100 * (iou[iou_valid] * pos_gt[iou_valid] / total).sum()) if total > 0 else float("nan"),
            "mACC": float(100 * acc[acc_valid].mean()) if acc_valid.any() else float("nan"),
            "pACC": float(100 * tp.sum() / total) if total > 0 else float("nan"),
        }
        names = self.label_names or [str(i) for i in range(k)]
        results["per_class"] = {
            i: {"name": names[i], "IoU": float(100 * iou[i]), "ACC": float(100 * acc[i])} for i in range(k)
        }
        results["num_images"] = self.num_images
        return results


def mean_iou(
    predictions: Sequence,
    references: Sequence,
    num_labels: int,
    ignore_index: int = 255,
    reduce_labels: bool = False,
    label_names: Sequence[str] | None = None,
    convention: str = "detectron2",
) -> dict:
    """mIoU & co. of lists of label maps (see `SemanticSegmentationMetric`)."""
    metric = SemanticSegmentationMetric(num_labels, ignore_index, reduce_labels, label_names, convention)
    metric.add_batch(predictions, references)
    return metric.compute()

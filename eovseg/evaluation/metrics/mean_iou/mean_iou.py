"""`evaluate` module of eovseg's mean_iou: `evaluate.load("<this folder or file>", ...)` (no network needed).

The computation lives in the installed `eovseg` package (`eovseg.evaluation`); see `EovSegMeanIoU` there.
"""

from eovseg.evaluation.hf_modules import EovSegMeanIoU


__all__ = ["EovSegMeanIoU"]

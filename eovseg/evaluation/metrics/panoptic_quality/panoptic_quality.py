"""`evaluate` module of eovseg's panoptic_quality: `evaluate.load("<this folder or file>", ...)` (no network needed).

The computation lives in the installed `eovseg` package (`eovseg.evaluation`); see `EovSegPanopticQuality` there.
"""

from eovseg.evaluation.hf_modules import EovSegPanopticQuality


__all__ = ["EovSegPanopticQuality"]

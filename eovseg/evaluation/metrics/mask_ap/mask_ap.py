"""`evaluate` module of eovseg's mask_ap: `evaluate.load("<this folder or file>", ...)` (no network needed).

The computation lives in the installed `eovseg` package (`eovseg.evaluation`); see `EovSegMaskAP` there.
"""

from eovseg.evaluation.hf_modules import EovSegMaskAP


__all__ = ["EovSegMaskAP"]

"""eovseg: EOV-Seg open-vocabulary panoptic segmentation as a Hugging Face Transformers model.

Importing the package registers the model with the Transformers Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageSegmentation`, `AutoModelForUniversalSegmentation`, `AutoImageProcessor`, `AutoProcessor`) and the
`open-vocabulary-segmentation` pipeline: at once when transformers is already imported, else as soon as it is (see
`eovseg.auto_registration.register_when_transformers_loads`), so that `import eovseg` alone, and the `eovseg`
command's `--help`, import neither torch nor transformers. The classes below are imported on first use.
"""

from __future__ import annotations

import importlib

from .auto_registration import register_when_transformers_loads

__version__ = "0.1.0"

# name -> the module that defines it, imported on first use (PEP 562)
_LAZY_ATTRIBUTES = {
    "EovSegConfig": ".configuration_eovseg",
    "EovSegForPanopticSegmentation": ".modeling_eovseg",
    "EovSegOutput": ".modeling_eovseg",
    "EovSegPreTrainedModel": ".modeling_eovseg",
    "EovSegImageProcessor": ".processing",
    "EovSegImageProcessorPil": ".processing",
    "EovSegProcessor": ".processing",
}

__all__ = sorted(_LAZY_ATTRIBUTES)


def __getattr__(name: str):
    if name not in _LAZY_ATTRIBUTES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_ATTRIBUTES[name], __name__), name)
    # The class's module imported transformers: register now, whatever loaded the modules (the import watcher swaps
    # only file loaders), so using one of these classes always finds the Auto classes and pipelines ready.
    register_when_transformers_loads()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_ATTRIBUTES})


register_when_transformers_loads()

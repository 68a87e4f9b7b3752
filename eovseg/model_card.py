"""The model card (`README.md`) of every model folder eovseg saves: the Hub's metadata header, what the folder holds,
how it was made and the figures the run measured.

One writer for all save paths (`save_pretrained` of the model, the training command, the conversion). A README.md
that eovseg did not write (it lacks `CARD_MARKER`) is never replaced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

# Marks a card as written by eovseg: only such a README.md may be written again.
CARD_MARKER = "<!-- model card written by eovseg; a README.md without this line is never replaced -->"
CARD_TAGS = ["eovseg", "open-vocabulary", "panoptic-segmentation", "image-segmentation"]
CARD_LICENSE = "apache-2.0"


def model_card(
    config,
    num_params: int,
    made_by: Sequence[str] = (),
    vocabulary_source: str | None = None,
    figures: Mapping[str, object] | None = None,
    datasets: Sequence[str] | None = None,
    base_model: str | None = None,
) -> str:
    """The card of a folder holding a model of `config` with `num_params` parameters. `made_by`: lines saying how
    the weights were made (a conversion, a training run); `vocabulary_source`: where the default vocabulary came
    from (a built-in name, a file); `figures`: what that run measured (name -> value), listed
    as measured; `datasets` / `base_model`: Hub ids for the metadata, when known."""
    from huggingface_hub import ModelCardData

    metadata = ModelCardData(
        license=CARD_LICENSE, library_name="transformers", pipeline_tag="image-segmentation", tags=list(CARD_TAGS),
        datasets=list(datasets) if datasets else None, base_model=base_model,
    ).to_yaml()
    vocabulary = list(config.vocabulary or [])
    source = f": `{vocabulary_source}`" if vocabulary_source else ""
    lines = [
        f"- Variant: `{config.variant}`: CNN CLIP `{config.clip_model_name}` ({config.clip_pretrained}), "
        f"spatial-awareness extractor: first block of `{config.vit_model_name}` ({config.vit_pretrained}).",
        f"- Parameters in this folder: {num_params / 1e6:.1f}M (all tensors, including the frozen CLIP text tower "
        "used to encode new vocabularies).",
        f"- Default vocabulary{source} ({len(vocabulary)} classes): {_preview(vocabulary)}; its text embeddings are "
        "stored "
        "with the weights, so `pipeline(\"image-segmentation\", model=<this folder>)` needs no class list and no text "
        "pass. Other classes are given at call time (`candidate_labels=[...]` of the open-vocabulary pipeline, "
        "`processor(images=..., text=...)`), or stored as the default with "
        "`eovseg.vocabularies.set_default_vocabulary` and `save_pretrained`.",
        f"- Training vocabulary ({len(config.train_vocabulary)} classes): a test class sharing a synonym with it is "
        f"*seen* and gets the ensemble weight alpha ({config.geometric_ensemble_alpha}), other classes beta "
        f"({config.geometric_ensemble_beta}).",
        *made_by,
    ]
    measured = "\n".join(f"| {name} | {_figure(value)} |" for name, value in (figures or {}).items())
    results = f"\n## Measured\n\n| figure | value |\n|---|---|\n{measured}\n" if measured else ""
    return f"""---
{metadata}
---
{CARD_MARKER}

# EOV-Seg ({config.variant})

EOV-Seg (Niu et al., *EOV-Seg: Efficient Open-Vocabulary Panoptic Segmentation*, AAAI 2025) as a Transformers model
of the `eovseg` package.

{chr(10).join(lines)}
{results}
## Use

```python
import eovseg  # registers the Auto classes (or pass trust_remote_code=True where eovseg is not installed)
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="<this folder>")   # default vocabulary
segments = segmenter("street.jpg", subtask="panoptic", threshold=0.0, overlap_mask_area_threshold=0.8)

ov = pipeline("open-vocabulary-segmentation", model="<this folder>", trust_remote_code=True)
segments = ov("street.jpg", candidate_labels=["car", "road, street", "sky"])
```
"""


def _preview(names: Sequence[str], count: int = 8) -> str:
    shown = ", ".join(f"`{name}`" for name in names[:count])
    return shown + (", ..." if len(names) > count else "") if names else "none"


def _figure(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def is_eovseg_card(path: str | Path) -> bool:
    """Whether `path` is a model card eovseg wrote (so it may be written again)."""
    path = Path(path)
    try:
        return CARD_MARKER in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def write_model_card(folder: str | Path, config, num_params: int, replace: bool = True, **card) -> bool:
    """Write `README.md` (see [`model_card`] for `card`) into `folder`, unless a README.md eovseg did not write is
    there (or, with `replace=False`, any README.md). Returns whether it was written."""
    path = Path(folder) / "README.md"
    if path.exists() and (not replace or not is_eovseg_card(path)):
        return False
    path.write_text(model_card(config, num_params, **card), encoding="utf-8")
    return True

"""Convert an original EOV-Seg checkpoint (detectron2 `model_final.pth`) into a Transformers model folder.

    python -m eovseg.conversion_scripts.convert_original_checkpoint \\
        --checkpoint_path model_final.pth --variant r50 --output_dir eovseg-r50 \\
        --vocabulary ade20k_150_with_prompt_eng.txt --stuff_ids 0 1 2 ... \\
        --train_vocabulary coco_panoptic_with_prompt_eng.txt [--push_to_hub user/eovseg-r50]

The folder gets `config.json`, `model.safetensors` (with the default vocabulary's text embeddings, so inference needs
no text pass), the processor and tokenizer files, a model card, and the code files for `trust_remote_code`.
Nothing is written to `--output_dir` unless the whole conversion succeeds.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from ..auto_registration import push_model_folder, save_model_folder
from ..configuration_eovseg import PUBLISHED_VARIANTS, VARIANTS, EovSegConfig
from ..vocabulary import VocabularyError, display_name, validate_vocabulary
from .key_mapping import convert_original_state_dict


class ConversionError(Exception):
    """A conversion problem, reported as one line."""


# --------------------------------------------------------------------------------------------------- vocabulary files


def read_vocabulary_file(path: str | Path) -> tuple[list[str], list[bool] | None]:
    """Read a vocabulary: a JSON file (`{"classes": [...], "is_thing": [...]}` or a plain list), or a text file with
    one class entry per line, optionally prefixed by `id:` as in the original's `*_with_prompt_eng.txt` files."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"vocabulary file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConversionError(f"vocabulary file {str(path)!r} is not valid JSON ({err})") from None
        classes = data["classes"] if isinstance(data, dict) else data
        is_thing = data.get("is_thing") if isinstance(data, dict) else None
    else:
        classes, is_thing = [], None
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            head, sep, rest = line.partition(":")
            classes.append(rest if sep and head.strip().isdigit() else line)
    try:
        classes = validate_vocabulary(classes, f"vocabulary in {path.name}")
    except VocabularyError as err:
        raise ConversionError(str(err)) from None
    if is_thing is not None and len(is_thing) != len(classes):
        raise ConversionError(f"{path.name}: is_thing has {len(is_thing)} flags for {len(classes)} classes")
    return classes, is_thing


# --------------------------------------------------------------------------------------------------- checkpoints


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"cannot read {str(path)!r} as a PyTorch checkpoint: {first_line}") from None
    if isinstance(checkpoint, dict) and "model" in checkpoint and isinstance(checkpoint["model"], dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ConversionError(f"{str(path)!r} holds no state dict (expected {{'model': state_dict}} or a state dict)")
    return checkpoint


def detect_variant(original: dict[str, torch.Tensor]) -> str | None:
    """The preset whose CNN CLIP matches the checkpoint (by the text projection and first conv shapes), if any."""
    projection = original.get("cnn_backbone.clip_model.text_projection")
    if projection is None:
        return None
    for name, preset in VARIANTS.items():
        clip_cfg = preset["clip_model_config"]
        if projection.shape != (clip_cfg["text_cfg"]["width"], clip_cfg["embed_dim"]):
            continue
        is_convnext = "timm_model_name" in clip_cfg["vision_cfg"]
        if is_convnext != any(k.startswith("cnn_backbone.clip_model.visual.trunk.") for k in original):
            continue
        if not is_convnext:
            conv = original.get("cnn_backbone.clip_model.visual.conv1.weight")
            if conv is None or conv.shape[0] != clip_cfg["vision_cfg"]["width"] // 2:
                continue
        return name
    return None


def convert(original: dict[str, torch.Tensor], config: EovSegConfig):
    """Load an original state dict into a new model of `config`; returns (model, dropped keys)."""
    from ..modeling_eovseg import EovSegForPanopticSegmentation

    detected = detect_variant(original)
    if detected is not None and detected != config.variant:
        raise ConversionError(f"this checkpoint is the {detected!r} variant, not {config.variant!r}: pass --variant {detected}")
    converted, dropped, unexpected = convert_original_state_dict(original)
    if unexpected:
        raise ConversionError(f"{len(unexpected)} unexpected key(s) in the checkpoint, e.g. {unexpected[0]!r}")
    model = EovSegForPanopticSegmentation(config)
    expected = {k: v for k, v in model.state_dict().items() if k != "default_text_embeddings"}
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ConversionError(f"{len(missing)} key(s) missing from the checkpoint, e.g. {missing[0]!r} "
                              f"(truncated file, or not an EOV-Seg {config.variant} checkpoint?)")
    for key, value in converted.items():
        if value.shape != expected[key].shape:
            raise ConversionError(f"{key}: checkpoint tensor has shape {tuple(value.shape)}, the {config.variant} "
                                  f"model expects {tuple(expected[key].shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in converted.items()}, strict=False)
    return model.eval(), dropped


# --------------------------------------------------------------------------------------------------- model card


def model_card(config: EovSegConfig, num_params: int, checkpoint_name: str, vocabulary_source: str) -> str:
    # The authors' model-zoo table (ADE20K open-vocabulary panoptic, trained on COCO panoptic; RTX 3090 FPS).
    reported = {
        "r50": "PQ 15.1, SQ 57.0, RQ 18.9, AP 7.2, mIoU 21.9, 23.8 FPS, 71M parameters (EOV-Seg (S))",
        "r50x4": "PQ 18.7, SQ 63.5, RQ 23.2, AP 8.5, mIoU 25.5, 18.4 FPS, 127M parameters (EOV-Seg (M))",
        "convnext_l": "PQ 24.5, SQ 70.2, RQ 30.1, AP 13.7, mIoU 32.1, 11.6 FPS, 225M parameters (EOV-Seg (L))",
    }.get(config.variant, "none (not a published variant)")
    num_classes = len(config.vocabulary or [])
    return f"""---
library_name: transformers
pipeline_tag: image-segmentation
tags: [eovseg, open-vocabulary, panoptic-segmentation]
---

# EOV-Seg ({config.variant})

EOV-Seg (Niu et al., *EOV-Seg: Efficient Open-Vocabulary Panoptic Segmentation*, AAAI 2025), converted to a
Transformers model with the `eovseg` package.

- Variant: `{config.variant}`: CNN CLIP `{config.clip_model_name}` ({config.clip_pretrained}), spatial-awareness
  extractor: first block of `{config.vit_model_name}` ({config.vit_pretrained}).
- Parameters in this folder: {num_params / 1e6:.1f}M (all tensors, including the frozen CLIP text tower used to encode
  new vocabularies).
- Default vocabulary: {num_classes} classes from `{vocabulary_source}`; their text embeddings are stored with the
  weights, so inference with the default vocabulary needs no text pass. Any other class list can be given at call
  time.
- Converted from the authors' checkpoint `{checkpoint_name}` with
  `python -m eovseg.conversion_scripts.convert_original_checkpoint`; every original key was mapped or listed as
  dropped (ViT blocks after the first and the ViT model's text tower and head are not used by EOV-Seg).
- Reported by the authors on ADE20K (their figures, not measured here): {reported}.

## Use

```python
import eovseg  # registers the Auto classes
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="<this folder>")
segments = segmenter("street.jpg", subtask="panoptic")
```
"""


# --------------------------------------------------------------------------------------------------- main


def build_config(args) -> EovSegConfig:
    overrides = {}
    if args.vocabulary:
        classes, is_thing = read_vocabulary_file(args.vocabulary)
        if args.stuff_ids is not None:
            bad = [i for i in args.stuff_ids if not 0 <= i < len(classes)]
            if bad:
                raise ConversionError(f"--stuff_ids {bad[0]} is out of range for {len(classes)} classes")
            is_thing = [i not in set(args.stuff_ids) for i in range(len(classes))]
        overrides["vocabulary"] = classes
        overrides["is_thing"] = is_thing
    if args.train_vocabulary:
        overrides["train_vocabulary"] = read_vocabulary_file(args.train_vocabulary)[0]
    try:
        return EovSegConfig.from_variant(args.variant, **overrides)
    except ValueError as err:
        raise ConversionError(str(err)) from None


def run_conversion(args) -> Path:
    from ..processing import EovSegProcessor

    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        raise ConversionError(f"output folder {str(output_dir)!r} exists and is not empty (use --overwrite)")
    config = build_config(args)
    original = load_original_state_dict(args.checkpoint_path)
    model, dropped = convert(original, config)
    processor = EovSegProcessor.from_config(config)
    if config.vocabulary:
        text = processor.encode_vocabulary(config.vocabulary, return_tensors="pt")
        model.set_default_vocabulary_embeddings(text["input_ids"])
    num_params = sum(p.numel() for p in model.parameters())
    print(f"converted {len(original) - len(dropped)} tensors; dropped {len(dropped)} the model does not use"
          + (f" (e.g. {dropped[0]})" if dropped else ""))
    print(f"parameters: {num_params / 1e6:.1f}M")

    if config.vocabulary:
        sanity_run(model, processor)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        save_model_folder(model, processor, staging)
        (staging / "README.md").write_text(
            model_card(config, num_params, Path(args.checkpoint_path).name, str(args.vocabulary or "none"))
        )
        (staging / "dropped_keys.txt").write_text("\n".join(dropped) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {output_dir}")
    if args.push_to_hub:
        print(f"uploaded: {push_model_folder(output_dir, args.push_to_hub, 'Upload converted EOV-Seg checkpoint')}")
    return output_dir


@torch.no_grad()
def sanity_run(model, processor) -> None:
    from PIL import Image

    from ..demo import BUNDLED_IMAGE

    image = Image.open(BUNDLED_IMAGE).convert("RGB")
    inputs = processor(images=image, return_tensors="pt")
    outputs = model(**inputs)
    stuff = {i for i, thing in enumerate(model.config.is_thing) if not thing}
    result = processor.post_process_panoptic_segmentation(outputs, label_ids_to_fuse=stuff,
                                                          target_sizes=[(image.height, image.width)])[0]
    labels = [display_name(model.config.vocabulary[s["label_id"]]) for s in result["segments_info"]]
    if not torch.isfinite(outputs.class_queries_logits).all():
        raise ConversionError("sanity run on the bundled photo gave non-finite class logits")
    print(f"sanity run on {BUNDLED_IMAGE.name}: {len(labels)} segments: {', '.join(labels[:10])}"
          + (" ..." if len(labels) > 10 else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", required=True, help="the original model_final.pth")
    parser.add_argument("--variant", required=True, choices=list(PUBLISHED_VARIANTS) + ["tiny", "tiny_convnext"])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--vocabulary", default=None,
                        help="default vocabulary: a .json ({classes, is_thing}) or .txt (one 'id:name,synonym' per line)")
    parser.add_argument("--stuff_ids", type=int, nargs="*", default=None, help="indices of stuff classes of --vocabulary")
    parser.add_argument("--train_vocabulary", default=None,
                        help="training vocabulary file (e.g. the original's coco_panoptic_with_prompt_eng.txt) for the "
                             "seen/unseen ensemble weights")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_conversion(args)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert an original EOV-Seg checkpoint (detectron2 `model_final.pth`) into a Transformers model folder.

    eovseg convert --checkpoint_path model_final.pth --variant r50 --output_dir eovseg-r50 \\
        [--vocabulary NAME|FILE] [--train_vocabulary NAME|FILE] [--push_to_hub user/eovseg-r50]

The training vocabulary defaults to the built-in `coco_panoptic` (that of every released checkpoint, so the seen /
unseen ensemble weights are the original's), and so does the default vocabulary. The folder gets `config.json`,
`model.safetensors` (with the default vocabulary's text embeddings, so inference needs no class list and no text
pass), the processor and tokenizer files, a model card, and the code files for `trust_remote_code`. Nothing
is written to `--output_dir` unless the whole conversion succeeds.
"""

from __future__ import annotations

import json
import pickle
import sys
import zipfile
from pathlib import Path

import torch

from ..auto_registration import check_push_access, push_model_folder, save_model_folder_atomically
from ..command_line import CommandError, command_main, progress_switch
from ..configuration_eovseg import PRESETS, EovSegConfig
from ..model_card import model_card
from ..parsers import DEFAULT_TRAIN_VOCABULARY, DEFAULT_VOCABULARY  # noqa: F401  (the conversion's defaults)
from ..parsers import convert_parser as build_parser
from ..vocabularies import Vocabulary, load_vocabulary
from ..vocabulary import VocabularyError, display_name
from .key_mapping import convert_original_state_dict


class ConversionError(CommandError):
    """A conversion problem, reported as one line."""


# --------------------------------------------------------------------------------------------------- vocabularies


def read_vocabulary(spec: str, what: str) -> Vocabulary:
    """A built-in vocabulary name or a vocabulary file (see `eovseg.vocabularies.read_vocabulary_file`)."""
    try:
        return load_vocabulary(spec)
    except VocabularyError as err:
        raise ConversionError(f"{what}: {err}") from None


# --------------------------------------------------------------------------------------------------- checkpoints


def damaged_member(path: Path) -> zipfile.ZipInfo | None:
    """The first member of a checkpoint in torch's zip format whose bytes do not match their stored CRC-32 (torch's
    reader does not check them), else None. The legacy format has no checksums."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            return archive.getinfo(bad) if bad is not None else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # zlib errors are caught as BadZipFile
        raise ConversionError(f"cannot read {str(path)!r}: a damaged archive ({err})") from None


def _tensor_of(member: zipfile.ZipInfo, state_dict: dict[str, torch.Tensor]) -> str | None:
    """The key of the tensor stored in `member`: the one whose bytes have the member's size but not its CRC."""
    import zlib

    for key, value in state_dict.items():
        storage = value.untyped_storage()
        if storage.nbytes() != member.file_size:
            continue
        data = torch.empty(0, dtype=torch.uint8).set_(storage).numpy().tobytes()
        if zlib.crc32(data) != member.CRC:
            return key
    return None


def check_finite(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Every floating-point tensor of the checkpoint must be finite (a corrupted one often is not)."""
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ConversionError(f"{str(path)!r}: the tensor {key!r} holds {bad} NaN or infinite value(s); the "
                                  "checkpoint is damaged")


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The original state dict of a checkpoint file, refused in one line naming the file (and the tensor) when it is
    not one, is damaged (a CRC-32 mismatch in torch's zip format) or holds a non-finite value."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {str(path)!r} does not exist")
    damaged = damaged_member(path)
    try:
        checkpoint = _read_checkpoint(path)
    except ConversionError:
        if damaged is not None:
            raise _damaged(path, damaged, None) from None
        raise
    if damaged is not None:
        raise _damaged(path, damaged, _tensor_of(damaged, checkpoint))
    check_finite(checkpoint, path)
    return checkpoint


def _damaged(path: Path, member: zipfile.ZipInfo, key: str | None) -> ConversionError:
    tensor = f" (tensor {key!r})" if key else ""
    return ConversionError(f"{str(path)!r} is damaged: the bytes of {member.filename!r}{tensor} do not match their "
                           "stored checksum; download or copy the checkpoint again")


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises `weights_only=False`, i.e. running arbitrary code from the file: never pass it on.
        raise ConversionError(f"cannot read {str(path)!r}: it is not a PyTorch checkpoint (or holds more than "
                              "tensors, which is refused)") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, IndexError) as err:
        # a text or random file makes torch's legacy reader fail anywhere (KeyError, IndexError, ...)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"cannot read {str(path)!r}: it is not a PyTorch checkpoint ({first_line})") from None
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
    for name, preset in PRESETS.items():
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


def conversion_card_lines(config: EovSegConfig, checkpoint_name: str, train_source: str) -> list[str]:
    """The model card's lines on how a converted folder was made (see `eovseg.model_card`)."""
    # The authors' model-zoo table (ADE20K open-vocabulary panoptic, trained on COCO panoptic; RTX 3090 FPS).
    reported = {
        "r50": "PQ 15.1, SQ 57.0, RQ 18.9, AP 7.2, mIoU 21.9, 23.8 FPS, 71M parameters (EOV-Seg (S))",
        "r50x4": "PQ 18.7, SQ 63.5, RQ 23.2, AP 8.5, mIoU 25.5, 18.4 FPS, 127M parameters (EOV-Seg (M))",
        "convnext_l": "PQ 24.5, SQ 70.2, RQ 30.1, AP 13.7, mIoU 32.1, 11.6 FPS, 225M parameters (EOV-Seg (L))",
    }.get(config.variant, "none (not a published variant)")
    return [
        f"- Training vocabulary from `{train_source}` (that of the released checkpoints, so the seen / unseen "
        "ensemble weights are the original's); another default vocabulary: convert again with "
        "`--vocabulary NAME|FILE`.",
        f"- Converted from the authors' checkpoint `{checkpoint_name}` with `eovseg convert`; every original key was "
        "mapped or listed as dropped (ViT blocks after the first and the ViT model's text tower and head are not used "
        "by EOV-Seg).",
        f"- Reported by the authors on ADE20K (their figures, not measured here): {reported}.",
    ]



# --------------------------------------------------------------------------------------------------- main


def build_config(args) -> EovSegConfig:
    vocabulary = read_vocabulary(args.vocabulary, "--vocabulary")
    is_thing = list(vocabulary.is_thing)
    if args.stuff_ids is not None:
        bad = [i for i in args.stuff_ids if not 0 <= i < len(vocabulary)]
        if bad:
            raise ConversionError(f"--stuff_ids {bad[0]} is out of range for {len(vocabulary)} classes")
        is_thing = [i not in set(args.stuff_ids) for i in range(len(vocabulary))]
    train_vocabulary = read_vocabulary(args.train_vocabulary, "--train_vocabulary").class_names
    try:
        return EovSegConfig.from_variant(
            args.variant, vocabulary=vocabulary.class_names, is_thing=is_thing, train_vocabulary=train_vocabulary
        )
    except ValueError as err:
        raise ConversionError(str(err)) from None


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output path the conversion must not write into."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"--output_dir {str(output_dir)!r} is a file, not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"output folder {str(output_dir)!r} exists and is not empty (--overwrite replaces the "
                              "conversion's own files in it and leaves every other file alone)")


def run_conversion(args) -> Path:
    from ..processing import EovSegProcessor

    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, args.overwrite)
    if args.push_to_hub:
        check_push_access(args.push_to_hub)
    config = build_config(args)
    original = load_original_state_dict(args.checkpoint_path)
    model, dropped = convert(original, config)
    processor = EovSegProcessor.from_config(config)
    text = processor.encode_vocabulary(config.vocabulary, return_tensors="pt")
    model.set_default_vocabulary(config.vocabulary, config.is_thing, text["input_ids"])
    num_params = sum(p.numel() for p in model.parameters())
    print(f"converted {len(original) - len(dropped)} tensors; dropped {len(dropped)} the model does not use"
          + (f" (e.g. {dropped[0]})" if dropped else ""))
    print(f"parameters: {num_params / 1e6:.1f}M")

    sanity_run(model, processor)

    # Staged in a hidden folder inside the output folder, then only the staged files are moved in: nothing else
    # there is touched, and the checkpoint is never replaced.
    made_by = conversion_card_lines(config, Path(args.checkpoint_path).name, str(args.train_vocabulary))
    card = model_card(config, num_params, vocabulary_source=str(args.vocabulary), made_by=made_by)
    try:
        names = save_model_folder_atomically(
            model, processor, output_dir, {"README.md": card, "dropped_keys.txt": "\n".join(dropped) + "\n"},
            checkpoint=Path(args.checkpoint_path),
        )
    except ValueError as err:
        raise ConversionError(str(err)) from None
    except OSError as err:  # a full disk: the staged files are gone, the folder is as it was
        raise ConversionError(f"could not write the model into {str(output_dir)!r} ({err}); nothing there was "
                              "replaced") from None
    others = len([p for p in output_dir.iterdir() if p.name not in set(names)])
    print(f"wrote {len(names)} files to {output_dir}" + (f" (left its {others} other entries alone)" if others else ""))
    if args.push_to_hub:
        url = push_model_folder(output_dir, args.push_to_hub, "Upload converted EOV-Seg checkpoint",
                                allow_patterns=names if others else None)  # never the user's own files
        print(f"uploaded: {url}")
    return output_dir


@torch.no_grad()
def sanity_run(model, processor) -> None:
    from PIL import Image

    from ..loading import BUNDLED_IMAGE

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


def _convert_command(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with progress_switch(not args.no_progress):
        run_conversion(args)


main = command_main(_convert_command, "convert")


if __name__ == "__main__":
    sys.exit(main())

"""Run EOV-Seg on one image and write a panoptic overlay PNG and a JSON of segments.

    python -m eovseg.demo                                  # tiny random model on the bundled photo
    python -m eovseg.demo --model converted_dir --image street.jpg --classes "car" "road, street" "sky"

Without `--model`, the tiny preset with random weights is used: it runs the whole pipeline end to end, but its
segments are random. Convert an original checkpoint (see README) and pass its folder with `--model` for real output.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

BUNDLED_IMAGE = Path(__file__).with_name("assets") / "coffee.jpg"


def segment_colors(num: int) -> np.ndarray:
    """Well-separated RGB colours for `num` segments (golden-ratio hue steps)."""
    colors = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95) for i in range(num)]
    return (np.array(colors).reshape(-1, 3) * 255).astype(np.uint8)


def overlay(image: Image.Image, segmentation: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Blend a colour per segment id (0 = no segment, left as is) over the image."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    ids = np.unique(segmentation)
    ids = ids[ids > 0]
    colors = segment_colors(len(ids))
    out = base.copy()
    for color, seg_id in zip(colors, ids):
        region = segmentation == seg_id
        out[region] = (1 - alpha) * base[region] + alpha * color
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


DEMO_MARK = "eovseg demo"  # in the files the demo writes: only those are replaced by a later run


def written_by_demo(path: Path) -> bool:
    """Whether `path` is an overlay PNG or a segments JSON written by this demo."""
    try:
        if path.suffix == ".png":
            with Image.open(path) as image:
                return image.info.get("Software") == DEMO_MARK
        return json.loads(path.read_text(encoding="utf-8")).get("written_by") == DEMO_MARK
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(paths: list[Path], overwrite: bool) -> None:
    for path in paths:
        if path.is_dir() or (path.exists() and not overwrite and not written_by_demo(path)):
            raise FileExistsError(
                f"{str(path)!r} exists and was not written by the demo: give another --output_dir (or --overwrite "
                "to replace that file)."
            )


def load_model_and_processor(model_path: str | None, seed: int = 0):
    from . import EovSegConfig, EovSegForPanopticSegmentation
    from .processing import EovSegProcessor

    if model_path is None:
        torch.manual_seed(seed)
        config = EovSegConfig.from_variant("tiny")
        model = EovSegForPanopticSegmentation(config)
        processor = EovSegProcessor.from_config(config)
        return model.eval(), processor, True
    path = Path(model_path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_path!r} is not a folder with a config.json (a converted model).")
    model = EovSegForPanopticSegmentation.from_pretrained(path)
    processor = EovSegProcessor.from_pretrained(path)
    return model.eval(), processor, False


def run(image_path: Path, model_path: str | None, classes: list[str] | None, stuff: list[str] | None,
        output_dir: Path, seed: int = 0, overwrite: bool = False) -> dict:
    from .vocabulary import display_name, validate_vocabulary

    if not image_path.is_file():
        raise FileNotFoundError(f"image {str(image_path)!r} does not exist.")
    try:
        image = Image.open(image_path)
        image.load()
    except Exception as err:  # PIL raises several types for unreadable files
        raise ValueError(f"cannot read {str(image_path)!r} as an image ({err}).") from None
    image = image.convert("RGB")
    model, processor, is_random = load_model_and_processor(model_path, seed)
    config = model.config
    if classes:
        vocabulary = validate_vocabulary(classes, "--classes vocabulary")
        stuff_names = set(stuff or [])
        is_thing = [name not in stuff_names and display_name(name) not in stuff_names for name in vocabulary]
    else:
        if not config.vocabulary:
            raise ValueError("this model has no default vocabulary; give --classes.")
        vocabulary, is_thing = list(config.vocabulary), list(config.is_thing)

    inputs = processor(images=image, text=vocabulary, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    stuff_ids = {i for i, thing in enumerate(is_thing) if not thing}
    result = processor.post_process_panoptic_segmentation(
        outputs, label_ids_to_fuse=stuff_ids, target_sizes=[(image.height, image.width)]
    )[0]
    segmentation = result["segmentation"].cpu().numpy()

    stem = image_path.stem
    overlay_path = output_dir / f"{stem}_panoptic.png"
    json_path = output_dir / f"{stem}_segments.json"
    check_replaceable([overlay_path, json_path], overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", DEMO_MARK)
    overlay(image, segmentation).save(overlay_path, pnginfo=info)
    segments = []
    for info in result["segments_info"]:
        label_id = int(info["label_id"])
        segments.append({
            "id": int(info["id"]),
            "label_id": label_id,
            "label": display_name(vocabulary[label_id]),
            "isthing": bool(is_thing[label_id]),
            "score": round(float(info["score"]), 4),
            "area": int((segmentation == info["id"]).sum()),
        })
    report = {
        "written_by": DEMO_MARK,
        "image": str(image_path),
        "model": model_path or "tiny preset, random weights",
        "random_weights": is_random,
        "image_size": [image.height, image.width],
        "vocabulary": vocabulary,
        "segments": segments,
    }
    json_path.write_text(json.dumps(report, indent=2))
    return {"overlay": str(overlay_path), "json": str(json_path), **report}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eovseg demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a converted model folder; default: tiny preset, random weights")
    parser.add_argument("--image", type=Path, default=BUNDLED_IMAGE, help="input image (default: the bundled photo)")
    parser.add_argument("--classes", nargs="+", default=None,
                        help='vocabulary: class entries of comma-separated synonyms, e.g. "cup, mug" "table"')
    parser.add_argument("--stuff", nargs="+", default=None, help="which of --classes are stuff (merged, not instances)")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tiny model")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace IMAGE_panoptic.png / IMAGE_segments.json in --output_dir even when another "
                             "program wrote them (the demo's own earlier outputs are always replaced)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args.image, args.model, args.classes, args.stuff, args.output_dir, args.seed, args.overwrite)
    if report["random_weights"]:
        print("NOTE: no --model given: the tiny preset with RANDOM weights was used, so the segments are random. "
              "Convert an original checkpoint and pass --model DIR for real segmentation.")
    print(f"{len(report['segments'])} segments on {report['image']} ({report['image_size'][0]}x{report['image_size'][1]})")
    for seg in report["segments"]:
        print(f"  #{seg['id']:<3} {seg['label']:<20} {'thing' if seg['isthing'] else 'stuff'}  score {seg['score']:.3f}  "
              f"area {seg['area']}")
    print(f"wrote {report['overlay']} and {report['json']}")
    return 0


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main, prog="python -m eovseg.demo"))

"""Run EOV-Seg on one image and write a panoptic overlay PNG and a JSON of segments.

    python -m eovseg.demo                                  # the bundled toy model on the bundled synthetic scene
    python -m eovseg.demo --model eovseg-r50 --image street.jpg --vocabulary ade20k_150
    python -m eovseg.demo --model eovseg-r50 --classes "car" "road, street" "sky" --stuff "road" "sky"

Without `--model`, the bundled demo model is used: the tiny preset in a toy world (coloured circles, squares and
triangles over sky or wall and grass, water, road or sand; `docs/toy_world.md`), with CLIP towers pretrained on the
toy world's captions and panoptic training on 14 of its 18 classes; it also names the 4 it never saw in panoptic
training (red triangle, yellow circle, purple square, sand; see its model card, `eovseg/assets/demo_model/README.md`).
It is a toy: it knows those 18 classes and nothing else. For real segmentation convert an authors' checkpoint (README, "Converting the authors' checkpoints") and pass its folder with
`--model`; `--image` picks another picture.
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

from .command_line import command_main, non_empty_text

_ASSETS = Path(__file__).with_name("assets")
# A real photograph, for models converted from the authors' checkpoints (and the conversion's sanity run).
BUNDLED_IMAGE = _ASSETS / "coffee.jpg"

TOY_MODEL_NOTE = (
    "NOTE: this is the bundled TOY model of a synthetic toy world (red, yellow, purple and white circles, squares and "
    "triangles; sky, wall, grass, water, road, sand). Its CLIP was pretrained on all 18 classes, its segmenter on 14: "
    "red triangle, yellow circle, purple square and sand it never saw in panoptic training, and names through CLIP. "
    "It knows nothing else. For real segmentation, convert an authors' checkpoint (see the README) and pass "
    "--model DIR; pass --image PATH for another picture."
)


def default_model_path() -> Path:
    """The bundled demo model: a folder written by `save_pretrained` (tiny preset trained in the toy world)."""
    return _ASSETS / "demo_model"


def default_image_path() -> Path:
    """The bundled toy-world scene (256 px, with a class unseen in panoptic training) that the demo model segments."""
    return _ASSETS / "shapes_scene.png"


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


class ModelOutputError(ValueError):
    """The model gave NaN or infinite logits (broken weights, or an overflow): reported, never "0 segments"."""


def check_finite_outputs(outputs) -> None:
    """Refuse NaN or infinite class or mask logits: post-processing them finds no segment, or one class everywhere,
    and says nothing. The demo, `eovseg predict` and the web page check every forward pass with this."""
    for name in ("class_queries_logits", "masks_queries_logits"):
        logits = getattr(outputs, name, None)
        if logits is not None and not bool(torch.isfinite(logits).all()):
            raise ModelOutputError(f"the model's {name} hold NaN or infinite values: its weights are broken (or "
                                   "overflow in this precision), so no segmentation can be trusted.")


def has_stored_vocabulary(model) -> bool:
    """Whether the model holds the text embeddings of its default vocabulary (else that vocabulary is encoded)."""
    stored = getattr(model, "default_text_embeddings", None)
    return stored is not None and bool(stored.abs().sum() > 0)


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


def load_model_and_processor(model_path: str | Path | None):
    """The model and processor of a `save_pretrained` folder (default: the bundled demo model), through the one
    model-folder loader (its errors name the file and the problem)."""
    from .auto_registration import load_model_folder

    path = Path(model_path) if model_path is not None else default_model_path()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {str(path)!r} is not a folder with a config.json (a converted model).")
    model, processor = load_model_folder(path)
    return model.eval(), processor


def read_image(image_path: Path) -> Image.Image:
    from .inputs import read_image_file

    return read_image_file(image_path)  # 16-bit and float images scaled, not saturated


def choose_vocabulary(config, vocabulary: str | None, classes: list[str] | None, stuff: list[str] | None):
    """Class entries and thing flags: `--vocabulary NAME|FILE`, else `--classes` (things unless in `--stuff`), else
    the model's default vocabulary."""
    from .vocabularies import load_vocabulary

    if vocabulary and classes:
        raise ValueError("give either --vocabulary or --classes, not both.")
    if stuff and not classes:
        raise ValueError("--stuff names some of --classes: give --classes too.")
    if vocabulary or classes:
        chosen = load_vocabulary(vocabulary or classes, stuff=None if vocabulary else stuff)
        return list(chosen.class_names), list(chosen.is_thing)
    if not config.vocabulary:
        raise ValueError("this model has no default vocabulary; give --vocabulary or --classes.")
    return list(config.vocabulary), list(config.is_thing)


def segment(model, processor, image: Image.Image, vocabulary: list[str] | None, is_thing: list[bool]) -> dict:
    """Panoptic segmentation of `image` (the original's settings); `vocabulary=None` runs the model's stored default
    vocabulary with no text pass. Returns the post-processing result (`segmentation`, `segments_info`)."""
    inputs = processor(images=image, text=vocabulary, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    check_finite_outputs(outputs)
    stuff_ids = {i for i, thing in enumerate(is_thing) if not thing}
    return processor.post_process_panoptic_segmentation(
        outputs, label_ids_to_fuse=stuff_ids, target_sizes=[(image.height, image.width)]
    )[0]


def run(image_path: Path | None, model_path: str | None, classes: list[str] | None, stuff: list[str] | None,
        output_dir: Path, vocabulary: str | None = None, overwrite: bool = False) -> dict:
    from .vocabulary import display_name

    is_toy = model_path is None
    if image_path is None:
        image_path = default_image_path() if is_toy else BUNDLED_IMAGE
    overlay_path = output_dir / f"{image_path.stem}_panoptic.png"
    json_path = output_dir / f"{image_path.stem}_segments.json"
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {str(output_dir)!r} is a file, not a folder.")
    check_replaceable([overlay_path, json_path], overwrite)
    image = read_image(image_path)
    model, processor = load_model_and_processor(model_path)
    names, is_thing = choose_vocabulary(model.config, vocabulary, classes, stuff)
    uses_default = names == list(model.config.vocabulary or []) and has_stored_vocabulary(model)
    result = segment(model, processor, image, None if uses_default else names, is_thing)
    segmentation = result["segmentation"].cpu().numpy()

    output_dir.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", DEMO_MARK)
    overlay(image, segmentation).save(overlay_path, pnginfo=info)
    segments = [
        {
            "id": int(info["id"]),
            "label_id": int(info["label_id"]),
            "label": display_name(names[int(info["label_id"])]),
            "isthing": bool(is_thing[int(info["label_id"])]),
            "score": round(float(info["score"]), 4),
            "area": int((segmentation == info["id"]).sum()),
        }
        for info in result["segments_info"]
    ]
    report = {
        "written_by": DEMO_MARK,
        "image": str(image_path),
        "model": str(model_path) if model_path else f"bundled toy model ({default_model_path()})",
        "toy_model": is_toy,
        "image_size": [image.height, image.width],
        "vocabulary": names,
        "segments": segments,
    }
    json_path.write_text(json.dumps(report, indent=2))
    return {"overlay": str(overlay_path), "json": str(json_path), **report}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eovseg demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="a converted model folder; default: the bundled toy model (toy world)")
    parser.add_argument("--image", type=Path, default=None,
                        help="input image (default: the bundled synthetic scene, or the bundled photo with --model)")
    parser.add_argument("--vocabulary", type=non_empty_text, default=None, metavar="NAME|FILE",
                        help="a built-in vocabulary (ade20k_150, coco_panoptic, ...) or a vocabulary file")
    parser.add_argument("--classes", nargs="+", type=non_empty_text, default=None,
                        help='vocabulary: class entries of comma-separated synonyms, e.g. "cup, mug" "table"')
    parser.add_argument("--stuff", nargs="+", type=non_empty_text, default=None, help="which of --classes are stuff (merged, not instances)")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--overwrite", action="store_true",
                        help="replace IMAGE_panoptic.png / IMAGE_segments.json in --output_dir even when another "
                             "program wrote them (the demo's own earlier outputs are always replaced)")
    return parser


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args.image, args.model, args.classes, args.stuff, args.output_dir, args.vocabulary, args.overwrite)
    if report["toy_model"]:
        print(TOY_MODEL_NOTE)
    print(f"{len(report['segments'])} segments on {report['image']} ({report['image_size'][0]}x{report['image_size'][1]})")
    for seg in report["segments"]:
        print(f"  #{seg['id']:<3} {seg['label']:<20} {'thing' if seg['isthing'] else 'stuff'}  score {seg['score']:.3f}  "
              f"area {seg['area']}")
    print(f"wrote {report['overlay']} and {report['json']}")
    return 0


main = command_main(_main, "demo")


if __name__ == "__main__":
    sys.exit(main())

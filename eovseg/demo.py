"""Run EOV-Seg on one image and write one PNG (the input, its labelled overlay and a legend side by side) and a JSON
of segments.

    eovseg demo                                  # the bundled toy model on the bundled synthetic scene
    eovseg demo --model eovseg-r50 --image street.jpg --vocabulary ade20k_150
    eovseg demo --model eovseg-r50 --classes "car" "road, street" "sky" --stuff "road" "sky"

Without `--model`, the bundled demo model is used: the tiny preset in a toy world (coloured circles, squares and
triangles over sky or wall and grass, water, road or sand; docs/toy_world.md), with CLIP towers pretrained on the
toy world's captions and panoptic training on 14 of its 18 classes; it also names the 4 it never saw in panoptic
training (red triangle, yellow circle, purple square, sand; see its model card, `eovseg/assets/demo_model/README.md`).
It is a toy: it knows those 18 classes and nothing else. For real segmentation convert an authors' checkpoint
(`eovseg convert`, see docs/conversion.md) and pass its folder with
`--model`; `--image` picks another picture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, PngImagePlugin

from .command_line import add_progress_option, command_main, command_parser, progress_switch
from .loading import (  # noqa: F401  (default_model_path, default_image_path, BUNDLED_IMAGE: the demo's public names)
    BUNDLED_IMAGE,
    add_model_option,
    add_vocabulary_options,
    check_finite_outputs,
    check_vocabulary_options,
    default_image_path,
    default_model_path,
    has_stored_vocabulary,
    load_model,
    read_image,
    resolve_vocabulary,
)

TOY_MODEL_NOTE = (
    "NOTE: this is the bundled TOY model of a synthetic toy world (red, yellow, purple and white circles, squares and "
    "triangles; sky, wall, grass, water, road, sand). Its CLIP was pretrained on all 18 classes, its segmenter on 14: "
    "red triangle, yellow circle, purple square and sand it never saw in panoptic training, and names through CLIP. "
    "It knows nothing else. For real segmentation, convert an authors' checkpoint (eovseg convert, see "
    "docs/conversion.md) and pass --model DIR; pass --image FILE for another picture."
)


DEMO_MARK = "eovseg demo"  # in the files the demo writes: only those are replaced by a later run


def written_by_demo(path: Path) -> bool:
    """Whether `path` is a picture PNG or a segments JSON written by this demo."""
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


def segment(model, processor, image: Image.Image, vocabulary: list[str] | None, is_thing: list[bool]) -> dict:
    """Panoptic segmentation of `image` (the original's settings); `vocabulary=None` runs the model's stored default
    vocabulary with no text pass. Returns the post-processing result (`segmentation`, `segments_info`)."""
    import torch

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
    from .visualization import draw_side_by_side
    from .vocabulary import display_name

    is_toy = model_path is None
    if image_path is None:
        image_path = default_image_path() if is_toy else BUNDLED_IMAGE
    overlay_path = output_dir / f"{image_path.stem}_panoptic.png"
    json_path = output_dir / f"{image_path.stem}_segments.json"
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {str(output_dir)!r} is a file, not a folder.")
    check_replaceable([overlay_path, json_path], overwrite)
    check_vocabulary_options(classes, stuff, vocabulary)
    image = read_image(image_path)
    model, processor = load_model(model_path)
    names, is_thing, _, colors = resolve_vocabulary(model.config, classes, stuff, vocabulary)
    uses_default = names == list(model.config.vocabulary or []) and has_stored_vocabulary(model)
    result = segment(model, processor, image, None if uses_default else names, is_thing)
    segmentation = result["segmentation"].cpu().numpy()

    output_dir.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", DEMO_MARK)
    picture, panels = draw_side_by_side(image, segmentation, result["segments_info"], names, colors=colors)
    picture.save(overlay_path, pnginfo=info)
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
        "picture_panels": panels,  # (left, top, right, bottom) of the input, the overlay and the legend in the PNG
    }
    json_path.write_text(json.dumps(report, indent=2))
    return {"overlay": str(overlay_path), "json": str(json_path), **report}


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("demo", __doc__)
    add_model_option(parser)
    parser.add_argument("--image", type=Path, default=None, metavar="FILE",
                        help="input image (default: the bundled synthetic scene, or the bundled photo with --model)")
    add_vocabulary_options(parser)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"), metavar="DIR",
                        help="where IMAGE_panoptic.png (the input, its labelled overlay and the legend side by side) "
                             "and IMAGE_segments.json go (created if needed)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace IMAGE_panoptic.png / IMAGE_segments.json in --output_dir even when another "
                             "program wrote them (the demo's own earlier outputs are always replaced)")
    add_progress_option(parser)
    return parser


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with progress_switch(not args.no_progress):
        report = run(args.image, args.model, args.classes, args.stuff, args.output_dir, args.vocabulary, args.overwrite)
    if report["toy_model"]:
        print(TOY_MODEL_NOTE)
    print(f"{len(report['segments'])} segments on {report['image']} ({report['image_size'][0]}x{report['image_size'][1]})")
    for seg in report["segments"]:
        print(f"  #{seg['id']:<3} {seg['label']:<20} {'thing' if seg['isthing'] else 'stuff'}  score {seg['score']:.3f}  "
              f"area {seg['area']}")
    print(f"wrote {report['overlay']} (the input, its labelled overlay and the legend side by side) and {report['json']}")
    return 0


main = command_main(_main, "demo")


if __name__ == "__main__":
    sys.exit(main())

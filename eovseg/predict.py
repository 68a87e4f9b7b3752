"""Segment many images, folders and videos with one command; write files other tools read.

    eovseg predict photos/ street.jpg clip.mp4 --output_dir out [--model DIR] [--classes "car" "road, street" --stuff "road, street"]
    torchrun --standalone --nproc_per_node 2 -m eovseg.predict photos/ --output_dir out     # split over processes
    accelerate launch -m eovseg.predict photos/ --output_dir out                            # or over GPUs

Folders are searched recursively, in sorted order, for images (`.jpg`, `.png`, ...) and videos (`.mp4`, `.avi`, ...),
leaving out the output folder and any other folder an `eovseg predict` run wrote. Each input gets a unique output
name: an image's path (`photos/a/b.jpg` -> `panoptic/photos/a/b.png`), a video's name (`clip.mp4` ->
`panoptic/clip/000000.png`, ...); a name already taken (`v.mp4` beside the folder `v/` holding `000000.png`) gets
`-2`, `-3`, ..., videos after images, so adding inputs to a resumed run renames nothing already written.
The output folder gets:

- `panoptic.json`: every image and video frame of the run in the COCO panoptic format (`images`, `annotations` with
  `segments_info`, `categories` = the vocabulary, category id = class index), read by panopticapi and by
  `eovseg.evaluation.PanopticQuality`; the PNGs it names are in `panoptic/` (`id = R + 256 G + 256^2 B`);
- `overlay/`: each image with its segments tinted, outlined and labelled; for a video, the overlaid video (`.mp4`);
- `videos/NAME.json` per video: the frames' segments and times;
- with `--instances`, `instances.json`: instance masks as COCO RLE in the COCO results format (pycocotools' loadRes).

An input that cannot be read is skipped with one line and listed at the end; the run goes on. The arguments, the
inputs, the model and the vocabulary are checked before anything is written; a model that gives NaN or infinite
outputs stops the run, and a new run that stops removes what it wrote. The exit status is 1 when an input was
skipped or the run could not start (one line: `eovseg predict: error: ...`), 0 otherwise. Running
again into the same folder resumes: inputs already written are skipped. The command refuses an output folder that
holds anything but one of its own runs (with the same model and vocabulary), and it never replaces a file it did not
write. Under torchrun / `accelerate launch`, the processes share the inputs and one merged output is written; the
files are the same as one process writes.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .command_line import (
    add_progress_option,
    command_main,
    command_parser,
    output_dir_problem,
    positive_int,
    probability,
    progress_bar,
    progress_switch,
)
from .loading import (  # noqa: F401  (IMAGE_SUFFIXES, load_model, default_model_path: predict's public names)
    IMAGE_SUFFIXES,
    ModelOutputError,
    add_model_option,
    add_vocabulary_options,
    check_model_folder,
    check_vocabulary_options,
    default_model_path,
    load_model,
    resolve_vocabulary,
)
from .loading import read_image as read_image_file
from .predictor import SUBTASKS, PredictError, Predictor  # noqa: F401  (predict's public names)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
STATE_DIR = ".eovseg-predict"
RUN_FILE = "run.json"
OUTPUT_NAMES = {STATE_DIR, "overlay", "panoptic", "videos", "panoptic.json", "instances.json"}
class BadInput(Exception):
    """An input that is skipped (printed as one line, listed at the end)."""


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One input: a file, its kind (`image` / `video`) and its output name (path without suffix)."""

    source: str
    kind: str
    key: str


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


def collect_inputs(paths: Sequence[str], output_dir: Path | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """The inputs in order (a folder's files recursively, sorted) with unique output names, and the arguments that
    are no input (`(path, reason)`). Nothing inside `output_dir`, nor inside any other folder an `eovseg predict`
    run wrote, is an input: a second run into `photos/out` must not segment the first run's overlays."""
    output_dir = output_dir.resolve() if output_dir is not None else None
    found, bad = [], []
    for arg in paths:
        path = Path(arg)
        if output_dir is not None and path.exists() and output_dir in (path.resolve(), *path.resolve().parents):
            bad.append((arg, "inside --output_dir (the command's own files are never inputs)"))
        elif path.is_dir():
            files = [p for p in _folder_files(path, output_dir) if _kind(p)]
            if not files:
                bad.append((arg, "a folder with no image or video files"))
            found += [(p, Path(path.resolve().name or "input") / p.relative_to(path).with_suffix("")) for p in files]
        elif path.is_file():
            if _kind(path) is None:
                bad.append((arg, f"not an image or video file name ({path.suffix or 'no suffix'})"))
            else:
                found.append((path, Path(path.stem)))
        else:
            bad.append((arg, "no such file or folder"))
    keys = _output_keys([(name.as_posix(), _kind(path)) for path, name in found])
    return [Item(str(path), _kind(path), key) for (path, _), key in zip(found, keys)], bad


def _folder_files(folder: Path, output_dir: Path | None) -> list[Path]:
    """The files under `folder`, sorted, leaving out `output_dir` and every folder holding an `eovseg predict` state
    folder (an earlier run's output)."""
    files = []
    for root, dirs, names in os.walk(folder):
        root = Path(root)
        dirs[:] = [d for d in dirs if d != STATE_DIR and not (root / d / STATE_DIR).is_dir()
                   and (output_dir is None or (root / d).resolve() != output_dir)]
        files += [root / name for name in names if (root / name).is_file()]
    return sorted(files)


def _output_keys(names: Sequence[tuple[str, str]]) -> list[str]:
    """A unique output name for each `(name, kind)` of the inputs. An image named K writes `panoptic/K.png`, a video
    named V writes `panoptic/V/000000.png`, ...: a video's name may be neither another input's name nor a folder
    holding an image's (`v.mp4` beside the folder `v/` holding `000000.png`). A name already taken gets `-2`, `-3`,
    ...; images are named first, so they keep the names that mirror their paths and adding a video to a run renames
    nothing already written. Names are compared ignoring case (case-insensitive file systems)."""
    keys: list[str | None] = [None] * len(names)
    used, image_folders = set(), set()
    for kind_now in ("image", "video"):
        for index, (name, kind) in enumerate(names):
            if kind != kind_now:
                continue
            key, n = name, 1
            while key.casefold() in used or (kind == "video" and key.casefold() in image_folders):
                n += 1
                key = f"{name}-{n}"
            used.add(key.casefold())
            if kind == "image":
                image_folders.update(folder.casefold() for folder in _parents(key))
            keys[index] = key
    return keys


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def read_image(path: str) -> Image.Image:
    """An input image (`eovseg.loading.read_image`), or [`BadInput`]: the run goes on without it."""
    try:
        return read_image_file(path)
    except (OSError, ValueError) as err:
        raise BadInput(str(err).rstrip(".")) from None


# ----------------------------------------------------------------------------------------------------------------------
# Output folder
# ----------------------------------------------------------------------------------------------------------------------


def check_output_dir(output_dir: Path, settings: dict) -> bool:
    """Whether the run resumes an earlier one; raises PredictError for a folder this command may not write to."""
    problem = output_dir_problem(output_dir)
    if problem:
        raise PredictError(problem)
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return False
    run_file = output_dir / STATE_DIR / RUN_FILE
    if not run_file.is_file():
        raise PredictError(f"--output_dir {str(output_dir)!r} holds other files; give an empty or new folder "
                           "(or one of an earlier `eovseg predict` run to resume it).")
    try:
        earlier = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PredictError(f"{run_file} cannot be read ({err}); give a new --output_dir.") from None
    if not isinstance(earlier, dict):
        raise PredictError(f"{run_file} is not the run file of an `eovseg predict` run; give a new --output_dir.")
    changed = sorted(k for k in set(settings) | set(earlier) if settings.get(k) != earlier.get(k))
    if changed:
        raise PredictError(f"--output_dir {str(output_dir)!r} holds a run with other settings ({', '.join(changed)}); "
                           "give a new folder to run with these.")
    return True


def write_atomic(path: Path, write) -> None:
    """`write(temporary_path)`, then rename: a file is either complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def write_json(path: Path, data) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=1), encoding="utf-8"))


def _record_path(output_dir: Path, key: str) -> Path:
    return output_dir / STATE_DIR / "records" / (hashlib.sha1(key.encode()).hexdigest() + ".json")


def read_record(output_dir: Path, item: Item) -> dict | None:
    path = _record_path(output_dir, item.key)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # written atomically, so only damaged from outside: segment that input again
    return record if isinstance(record, dict) and record.get("source") == item.source else None


# ----------------------------------------------------------------------------------------------------------------------
# Writing one image / one video
# ----------------------------------------------------------------------------------------------------------------------


class Writer:
    """Writes the files of each input and its record (what the merge step reads)."""

    def __init__(self, output_dir: Path, predictor: Predictor, instances: bool, progress: bool = False):
        self.output_dir, self.predictor, self.instances = output_dir, predictor, instances
        self.progress = progress  # a bar per video, advancing by frame

    def frame_entry(self, image: Image.Image, result: dict, png_name: str, overlay_path: Path | None) -> dict:
        """Write the panoptic PNG (and the overlay PNG); the frame's entry for `panoptic.json`."""
        from .export import panoptic_to_coco
        from .visualization import draw_segments

        png, segments = panoptic_to_coco(result, self.predictor.is_thing)
        write_atomic(self.output_dir / "panoptic" / png_name, lambda p: png.save(p, format="PNG"))
        if overlay_path is not None:
            picture = draw_segments(image, result["segmentation"], result["segments_info"], self.predictor.class_names,
                                    colors=self.predictor.colors)
            write_atomic(overlay_path, lambda p: picture.save(p, format="PNG"))
        entry = {"file_name": png_name, "height": image.height, "width": image.width, "segments_info": segments}
        if self.instances:
            from .export import instances_to_coco

            entry["instances"] = instances_to_coco(result["instances"], image_id=None)
        return entry

    def save_record(self, item: Item, frames: list[dict] | None = None, error: str | None = None, **extra) -> None:
        record = {"source": item.source, "kind": item.kind, "key": item.key, "frames": frames or [], "error": error}
        write_json(_record_path(self.output_dir, item.key), {**record, **extra})

    def images(self, items: Sequence[Item]) -> None:
        """A batch of images: unreadable ones are recorded as errors, the others segmented together."""
        loaded = []
        for item in items:
            try:
                loaded.append((item, read_image(item.source)))
            except BadInput as err:
                self.save_record(item, error=str(err))
        if not loaded:
            return
        results = self.predictor([image for _, image in loaded], instances=self.instances)
        for (item, image), result in zip(loaded, results):
            entry = self.frame_entry(image, result, f"{item.key}.png", self.output_dir / "overlay" / f"{item.key}.png")
            self.save_record(item, frames=[entry])

    def video(self, item: Item, batch_size: int) -> None:
        from .video import VideoOverlayWriter, read_video_frames
        from .visualization import draw_segments

        frames, fps = [], None
        overlay_path = self.output_dir / "overlay" / f"{item.key}.mp4"
        with VideoOverlayWriter(overlay_path) as video_out, progress_bar(
                desc=Path(item.source).name, unit="frame", enabled=self.progress) as bar:
            for fps, batch in read_video_frames(item.source, batch_size):
                for image, result in zip(batch, self.predictor(batch, instances=self.instances)):
                    entry = self.frame_entry(image, result, f"{item.key}/{len(frames):06d}.png", None)
                    video_out.add(draw_segments(image, result["segmentation"], result["segments_info"],
                                                self.predictor.class_names, colors=self.predictor.colors), fps)
                    frames.append(entry)
                bar.update(len(batch))
        if not frames:
            raise BadInput("a video with no frames")
        self._video_json(item, frames, fps)
        self.save_record(item, frames=frames, fps=fps)

    def _video_json(self, item: Item, frames: list[dict], fps: float) -> None:
        names = self.predictor.class_names
        write_json(self.output_dir / "videos" / f"{item.key}.json", {
            "video": item.source, "fps": fps, "overlay": f"overlay/{item.key}.mp4",
            "categories": [{"id": i, "name": n, "isthing": int(t)} for i, (n, t) in enumerate(zip(names, self.predictor.is_thing))],
            "frames": [{"frame": i, "time": round(i / fps, 6), "file_name": f["file_name"],
                        "segments_info": f["segments_info"]} for i, f in enumerate(frames)],
        })


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def work_units(items: Sequence[Item], batch_size: int) -> list[list[Item]]:
    """Batches of consecutive images, and each video alone. Processes take every n-th unit, so a batch holds the
    same images however many processes there are (the Predictor runs a batch's images of each processed size
    together: which images share a pass decides the float round-off of batched kernels)."""
    units, batch = [], []
    for item in items:
        if item.kind == "video":
            units += [batch, [item]] if batch else [[item]]
            batch = []
            continue
        batch.append(item)
        if len(batch) == batch_size:
            units.append(batch)
            batch = []
    return units + [batch] if batch else units


def _is_done(record: dict | None) -> bool:
    return record is not None and not record["error"] and bool(record["frames"])


def run_unit(writer: Writer, unit: list[Item], batch_size: int) -> None:
    """One unit; whatever goes wrong with it is recorded as its inputs' error and the run goes on."""
    try:
        if unit[0].kind == "video":
            writer.video(unit[0], batch_size)
        else:
            writer.images(unit)
    except ModelOutputError:
        raise  # the model's fault, not the input's: every other input would fail the same way
    except Exception as err:  # an input the libraries cannot handle must not end the run
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        for item in unit:
            writer.save_record(item, error=message if isinstance(err, BadInput) else f"{type(err).__name__}: {message}")


def merge(output_dir: Path, items: Sequence[Item], categories: list[dict], instances: bool) -> list[tuple[str, str]]:
    """Write `panoptic.json` (and `instances.json`) from the records of `items`, in input order; the skipped inputs."""
    images, annotations, detections, skipped = [], [], [], []
    for item in items:
        record = read_record(output_dir, item)
        if record is None or record["error"]:
            skipped.append((item.source, record["error"] if record else "not processed"))
            continue
        for index, frame in enumerate(record["frames"]):
            image_id = len(images) + 1
            name = item.source if item.kind == "image" else f"{item.key}/{index:06d}"
            images.append({"id": image_id, "file_name": name, "height": frame["height"], "width": frame["width"]})
            annotations.append({"image_id": image_id, "file_name": frame["file_name"],
                                "segments_info": frame["segments_info"]})
            for detection in frame.get("instances", []):
                detections.append({**detection, "image_id": image_id})
    write_json(output_dir / "panoptic.json", {
        "info": {"description": "eovseg predict", "panoptic_folder": "panoptic"},
        "images": images, "annotations": annotations, "categories": categories,
    })
    if instances:
        write_json(output_dir / "instances.json", detections)
    return skipped


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("predict", __doc__)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders (searched recursively) and videos")
    parser.add_argument("--output_dir", required=True, type=Path, metavar="DIR",
                        help="where the files go (new, empty, or a run to resume)")
    add_model_option(parser)
    add_vocabulary_options(parser)
    parser.add_argument("--batch_size", type=positive_int, default=1, help="images (or video frames) per forward pass")
    parser.add_argument("--threshold", type=probability, default=0.0, help="least class probability of a segment")
    parser.add_argument("--overlap_mask_area_threshold", type=probability, default=0.8,
                        help="least fraction of a mask's area that must stay visible once the segments before it "
                             "are drawn (else it is dropped)")
    parser.add_argument("--mask_threshold", type=probability, default=0.5,
                        help="mask probability above which a pixel belongs to a segment")
    parser.add_argument("--instances", action="store_true", help="also write instance masks (COCO RLE) to instances.json")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where an accelerator is present")
    parser.add_argument("--runtime", choices=("torch", "onnxruntime", "openvino"), default="torch",
                        help="torch, or run an `eovseg export` folder given as --model with ONNX Runtime or OpenVINO "
                             "(on the CPU, one process)")
    add_progress_option(parser)
    return parser


def _settings(args, model_path: str, class_names, is_thing) -> dict:
    return {
        "model": os.path.abspath(model_path), "classes": list(class_names), "is_thing": list(is_thing),
        "threshold": args.threshold, "overlap_mask_area_threshold": args.overlap_mask_area_threshold,
        "mask_threshold": args.mask_threshold, "instances": bool(args.instances),
    }


def prepare(args: argparse.Namespace, accelerator):
    """Every check of the run, before anything is written: the inputs, the model (loaded), the vocabulary (encoded)
    and the output folder. Returns `(items, arguments that are no input, predictor, settings, resuming)`."""
    check_vocabulary_options(args.classes, args.stuff, args.vocabulary)
    items, bad_args = collect_inputs(args.inputs, args.output_dir)
    if not items:
        reasons = "; ".join(f"{path}: {reason}" for path, reason in bad_args)
        raise PredictError(f"nothing to segment ({reasons}).")
    model_path = str(check_model_folder(args.model))
    if args.runtime == "torch":
        model, processor = load_model(model_path, accelerator.device)
        config, make_predictor = model.config, functools.partial(Predictor, model, processor)
    else:
        from .runtime import load

        exported = load(model_path, args.runtime)
        config, make_predictor = exported.config, exported.predictor
    class_names, is_thing, given, colors = resolve_vocabulary(config, args.classes, args.stuff, args.vocabulary)
    predictor = make_predictor(class_names, is_thing, given, "panoptic", args.threshold,
                               args.overlap_mask_area_threshold, args.mask_threshold, colors)
    settings = _settings(args, model_path, class_names, is_thing)
    if args.runtime != "torch":  # (absent for torch: earlier runs' folders resume as before)
        settings["runtime"] = args.runtime
    return items, bad_args, predictor, settings, check_output_dir(args.output_dir, settings)


def predict(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Run the command described by `args`; returns the skipped inputs `(path, reason)`."""
    from accelerate import Accelerator

    from .launch import launched_on_cpu_only

    accelerator = Accelerator(cpu=args.cpu or launched_on_cpu_only())
    items, bad_args, predictor, settings, resuming = prepare(args, accelerator)
    accelerator.wait_for_everyone()  # every process has checked the folder before anything is written to it
    created = [] if resuming else _new_entries(args.output_dir)
    try:
        if accelerator.is_main_process and not resuming:
            write_json(args.output_dir / STATE_DIR / RUN_FILE, settings)
        skipped = _run(args, accelerator, items, bad_args, predictor, resuming)
        if not resuming and len(skipped) >= len(items) + len(bad_args):
            raise PredictError("nothing segmented: every input was skipped (listed above)")
        return skipped
    except (ModelOutputError, PredictError):
        if accelerator.num_processes == 1:  # a new run that cannot go on leaves the folder as it found it
            _remove(created)
        raise


def _new_entries(output_dir: Path) -> list[Path]:
    """What a new run into `output_dir` creates (to remove when it fails): the folder itself or its entries."""
    return [output_dir] if not output_dir.exists() else [output_dir / name for name in OUTPUT_NAMES]


def _remove(paths: Sequence[Path]) -> None:
    import shutil

    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _run(args, accelerator, items, bad_args, predictor, resuming) -> list[tuple[str, str]]:
    pending = [item for item in items if not _is_done(read_record(args.output_dir, item))]
    if resuming:
        accelerator.print(f"resuming {args.output_dir}: {len(items) - len(pending)} of {len(items)} inputs already done")
    accelerator.print(f"{len(pending)} inputs to segment in {accelerator.num_processes} process(es)")
    progress = accelerator.is_local_main_process
    writer = Writer(args.output_dir, predictor, args.instances, progress)
    units = work_units(pending, args.batch_size)[accelerator.process_index :: accelerator.num_processes]
    # one step per input: an image, or a whole video (whose own bar counts its frames)
    with progress_bar(total=sum(len(unit) for unit in units), desc="eovseg predict", unit="input", enabled=progress) as bar:
        for unit in units:
            run_unit(writer, unit, args.batch_size)
            bar.update(len(unit))
    accelerator.wait_for_everyone()
    skipped = list(bad_args)
    if accelerator.is_main_process:
        class_names, is_thing = predictor.class_names, predictor.is_thing
        categories = [{"id": i, "name": n, "isthing": int(t)} for i, (n, t) in enumerate(zip(class_names, is_thing))]
        skipped += merge(args.output_dir, items, categories, args.instances)
        for path, reason in skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return skipped


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with progress_switch(not args.no_progress):
        skipped = predict(args)
    done = "wrote" if not skipped else f"{len(skipped)} input(s) skipped (listed above); wrote"
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{done} {args.output_dir / 'panoptic.json'} and the PNGs in {args.output_dir}")
    return 1 if skipped else 0


# a user error (bad argument, input, model or output folder) is one line and exit status 1, from the console script,
# `python -m eovseg.predict` and a direct call alike
main = command_main(_main, "predict")


if __name__ == "__main__":
    sys.exit(main())

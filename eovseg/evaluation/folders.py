"""Evaluation data read straight from the on-disk layouts data sets are distributed (or prepared) in.

- [`CocoPanopticFolder`]: a COCO-panoptic JSON (`images`, `annotations` with `segments_info`, `categories`), its
  folder of RGB-encoded PNGs and the folder of images, as COCO distributes `panoptic_val2017`, and as the common
  preparation scripts (detectron2's `prepare_ade20k_pan_seg.py`, cityscapesScripts' `createPanopticImgs`) write
  ADE20K-150 panoptic and Cityscapes panoptic.
- [`SemanticLabelFolder`]: a folder of images and a folder of label maps with the same file stems (ADE20K-150
  `images/validation` + `annotations/validation`, detectron2's prepared ADE20K-847 / Pascal Context 59 and 459
  (`.tif` for more than 255 classes), Pascal VOC `JPEGImages` + `SegmentationClass` with an optional
  `ImageSets/Segmentation/val.txt`).

Both are sequences of row dicts that `evaluate_model` reads like a `datasets.Dataset`; images and maps are read
only when a row is accessed. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

__all__ = ["CocoPanopticFolder", "SemanticLabelFolder", "is_coco_panoptic_json"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff")


def _read_image(path: str):
    """An image file read as stored (EXIF orientation not applied), decoded later as the
    image processor decodes every mode and bit depth (`eovseg.inputs.decode_image`: a 16-bit image scaled, not
    saturated)."""
    import PIL.Image

    with PIL.Image.open(path) as image:
        image.load()
        return image


def is_coco_panoptic_json(path) -> bool:
    """Whether `path` is a JSON file of COCO-panoptic annotations (looks at the content, not the name)."""
    if not (os.path.isfile(path) and str(path).lower().endswith(".json")):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError):
        return False
    annotations = document.get("annotations") if isinstance(document, dict) else None
    return isinstance(annotations, list) and (not annotations or "segments_info" in annotations[0])


def _find_folder_holding(file_name: str, start: str, max_depth: int = 3, exclude: str | None = None) -> str | None:
    """The first folder under `start` (breadth first, `max_depth` levels), other than `exclude`, that holds
    `file_name`."""
    level = [start]
    skip = os.path.abspath(exclude) if exclude else None
    for _ in range(max_depth + 1):
        following = []
        for folder in level:
            if os.path.abspath(folder) == skip:
                continue
            if os.path.isfile(os.path.join(folder, file_name)):
                return folder
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            following += [e.path for e in entries if e.is_dir()]
        level = following
    return None


class CocoPanopticFolder(Sequence):
    """Rows `{"image", "label", "segments_info", "file_name", "image_id"}` of a COCO-panoptic folder.

    Args:
        json_file: the annotations, e.g. `panoptic_val2017.json`. Its `categories` are the data set's categories.
        panoptic_root: the PNG folder; default: the JSON's path without `.json` (as `pq_compute` assumes).
        image_root: the image folder; default: the first folder next to the JSON (up to 3 levels below its
            parent, e.g. `val2017/`, `images/validation/`, `leftImg8bit/val/<city>/`) that holds the first image.
            Each image is looked up as `image_root/file_name`, then, for per-city layouts, in the folder of the
            same name below `image_root`'s parent.
    """

    def __init__(self, json_file: str, panoptic_root: str | None = None, image_root: str | None = None):
        with open(json_file, encoding="utf-8") as f:
            document = json.load(f)
        if not is_coco_panoptic_json(json_file):
            raise ValueError(f"{json_file}: not a COCO-panoptic JSON (no 'annotations' with 'segments_info').")
        self.json_file = str(json_file)
        self.categories = document.get("categories") or None
        self.annotations = document["annotations"]
        self._image_names = {image["id"]: image["file_name"] for image in document.get("images", [])}
        self.panoptic_root = str(panoptic_root) if panoptic_root else os.path.splitext(self.json_file)[0]
        if not os.path.isdir(self.panoptic_root):
            raise FileNotFoundError(
                f"{self.panoptic_root}: no folder of panoptic PNGs (give it with --panoptic_root)."
            )
        self.image_root = str(image_root) if image_root else self._guess_image_root()

    def _image_file(self, annotation: dict) -> str:
        name = self._image_names.get(annotation["image_id"])
        if name is None:
            name = os.path.splitext(annotation["file_name"])[0] + ".jpg"
        return name

    def _guess_image_root(self) -> str:
        if not self.annotations:
            return os.path.dirname(self.json_file)
        name = self._image_file(self.annotations[0])
        parent = os.path.dirname(os.path.dirname(os.path.abspath(self.json_file)))
        for start in (os.path.dirname(os.path.abspath(self.json_file)), parent):
            found = _find_folder_holding(name, start, exclude=self.panoptic_root)
            if found is not None:
                return found
        raise FileNotFoundError(
            f"No folder near {self.json_file} holds the image {name}; give the image folder with --image_root."
        )

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        annotation = self.annotations[index]
        image_path = os.path.join(self.image_root, self._image_file(annotation))
        if not os.path.isfile(image_path):
            sibling = _find_folder_holding(self._image_file(annotation), os.path.dirname(self.image_root), 1)
            if sibling is None:
                raise FileNotFoundError(f"{self.json_file} annotation {index}: no image {image_path}.")
            image_path = os.path.join(sibling, self._image_file(annotation))
        rgb = _read_image(image_path)
        return {
            "image": rgb,
            "label": os.path.join(self.panoptic_root, annotation["file_name"]),
            "segments_info": annotation["segments_info"],
            "file_name": image_path,
            "image_id": annotation["image_id"],
        }


class SemanticLabelFolder(Sequence):
    """Rows `{"image", "semantic", "file_name"}` pairing the images and label maps of two folders by file stem.

    Args:
        image_root: folder of images (searched recursively).
        label_root: folder of label maps (`.png`, `.tif`; searched recursively); their values are class labels.
        split_file: optional list of stems, one a line (VOC's `ImageSets/Segmentation/val.txt`); default: every
            label map.
    """

    def __init__(self, image_root: str, label_root: str, split_file: str | None = None):
        for folder, what in ((image_root, "image"), (label_root, "label")):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{folder}: no such {what} folder.")
        labels = self._by_stem(label_root, LABEL_EXTENSIONS)
        images = self._by_stem(image_root, IMAGE_EXTENSIONS)
        if split_file is not None:
            with open(split_file, encoding="utf-8") as f:
                stems = [line.strip() for line in f if line.strip()]
        else:
            stems = sorted(labels)
        missing = [s for s in stems if s not in labels or s not in images]
        if missing:
            side = "label map" if missing[0] not in labels else "image"
            raise FileNotFoundError(
                f"{len(missing)} of {len(stems)} entries have no {side} (first: {missing[0]!r}) in {image_root} / "
                f"{label_root}."
            )
        if not stems:
            raise FileNotFoundError(f"{label_root}: no label maps ({', '.join(LABEL_EXTENSIONS)}).")
        self.pairs = [(images[s], labels[s]) for s in stems]
        self.categories = None

    @staticmethod
    def _by_stem(root: str, extensions: tuple[str, ...]) -> dict[str, str]:
        found = {}
        for folder, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                if ext.lower() in extensions:
                    found.setdefault(stem, os.path.join(folder, name))
        return found

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        image_path, label_path = self.pairs[index]
        rgb = _read_image(image_path)
        return {"image": rgb, "semantic": label_path, "file_name": image_path}

"""A synthetic COCO-panoptic data set: coloured shapes (things) over a sky and a ground (stuff).

Every image has a sky-like vertical gradient above a wavy horizon and a ground-like noisy texture below it (two stuff
segments), then several circles, rectangles and triangles (thing instances, each class with its own base colour,
jittered per instance) that may partly occlude each other. Now and then a small patch is left unlabeled (segment id
0, void) and one instance is flagged `iscrowd`. Everything is drawn from `numpy.random.default_rng([seed, index])`,
so a data set is a pure function of its arguments and image `i` does not depend on how many images are made.

Columns (the COCO panoptic layout, as [`PanopticSegmentationDataset`] and `eovseg.evaluation` read it):

- `image_id` (int), `file_name` (str), `height`, `width` (int);
- `image`: the RGB image (a `datasets.Image`, decoded to PIL);
- `label`: the panoptic annotation, an RGB PNG with `segment id = R + 256 G + 256^2 B` (0: unlabeled);
- `segments_info`: a list of `{"id", "category_id", "iscrowd", "area", "bbox": [x, y, w, h]}`.

The categories, `[{"id", "name", "isthing"}]` with ids `0 .. 4` (the vocabulary indices), are stored as JSON in the
data set's `info.description` (see [`get_dataset_categories`]) and given by [`synthetic_categories`].

`extra_thing_classes` adds thing classes, each a known shape in a colour of its own (e.g. `("circle", (30, 215, 210))`,
a cyan circle), as categories 5, 6, ...: classes that differ from the default ones by colour only, for experiments
where a model must learn a class whose geometry it already segments (OPSNet's Decoupled Supervision benchmark). Without
them the data are those of the five default classes, drawn exactly as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
from transformers.image_transforms import id_to_rgb

__all__ = [
    "SYNTHETIC_CLASS_NAMES",
    "SYNTHETIC_IS_THING",
    "get_dataset_categories",
    "make_synthetic_image_label_dataset",
    "make_synthetic_panoptic_dataset",
    "synthetic_categories",
    "make_toy_world_dataset",
    "toy_world_categories",
    "toy_world_crop",
    "toy_caption",
    "TOY_CLASSES",
    "TOY_SEEN_CLASSES",
    "TOY_UNSEEN_CLASSES",
]

# The kinds of segment drawn, in category-id order: three thing shapes, then two stuff regions.
_KINDS = ("circle", "rectangle", "triangle", "sky", "ground")
SYNTHETIC_CLASS_NAMES = ["circle", "rectangle", "triangle", "sky", "ground"]
SYNTHETIC_IS_THING = [True, True, True, False, False]
# Base colours of the thing classes (RGB), far from each other and from the sky blues and ground greens.
_THING_COLOURS = {"circle": (225, 45, 45), "rectangle": (190, 60, 210), "triangle": (240, 205, 35)}
_METADATA_KEY = "eovseg_synthetic_panoptic"
_STUFF_CATEGORIES = (3, 4)  # sky, ground


def synthetic_categories(class_names: Sequence[str] | None = None, extra_thing_classes: Sequence = ()) -> list[dict]:
    """The categories of the synthetic data set: `[{"id": i, "name": ..., "isthing": ...}]` for i = 0 .. 4
    (circle, rectangle, triangle, sky, ground), then one thing category per extra thing class (ids 5, 6, ...), with
    `class_names` as names when given (default for an extra class: its shape and colour, e.g. `"circle (30, 215, 210)"`)."""
    extras = _check_extra_thing_classes(extra_thing_classes)
    names = _check_class_names(class_names, extras)
    is_thing = SYNTHETIC_IS_THING + [True] * len(extras)
    return [{"id": i, "name": name, "isthing": int(t)} for i, (name, t) in enumerate(zip(names, is_thing))]


def get_dataset_categories(dataset) -> list[dict] | None:
    """Categories stored with a data set made by [`make_synthetic_panoptic_dataset`] (or any data set whose
    `info.description` is a JSON object with a `"categories"` list); None when there are none."""
    description = getattr(getattr(dataset, "info", None), "description", None)
    if not description:
        return None
    try:
        data = json.loads(description)
    except (TypeError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("categories"), list):
        return [dict(c) for c in data["categories"]]
    return None


def _check_class_names(class_names, extras: Sequence[tuple[str, tuple[int, int, int]]] = ()) -> list[str]:
    if class_names is None:
        return list(SYNTHETIC_CLASS_NAMES) + [f"{shape} {colour}" for shape, colour in extras]
    kinds = list(_KINDS) + [f"{shape} {colour}" for shape, colour in extras]
    if isinstance(class_names, str) or len(class_names) != len(kinds):
        raise ValueError(
            f"class_names must name the {len(kinds)} synthetic classes in the order {kinds} (synonyms "
            f"comma-separated), got {class_names!r}."
        )
    return [str(c) for c in class_names]


def _check_extra_thing_classes(extra_thing_classes) -> list[tuple[str, tuple[int, int, int]]]:
    """`[(shape, (r, g, b))]` with a known thing shape and a colour of three integers in 0 .. 255."""
    shapes = [k for k in _KINDS if k in _THING_COLOURS]
    extras = []
    for entry in extra_thing_classes or ():
        try:
            shape, colour = entry
            colour = tuple(int(c) for c in colour)
        except (TypeError, ValueError):
            raise ValueError(f"extra_thing_classes: each entry is (shape, (r, g, b)), got {entry!r}.") from None
        if shape not in shapes or len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
            raise ValueError(
                f"extra_thing_classes: each entry is (shape, (r, g, b)) with a shape in {shapes} and colour values in "
                f"0 .. 255, got {entry!r}."
            )
        extras.append((shape, colour))
    return extras


def _thing_classes(extras) -> list[tuple[str, tuple[int, int, int], int]]:
    """(shape, base colour, category id) of every thing class: the default three (ids 0 .. 2), then the extras (ids
    5, 6, ...)."""
    default = [(k, _THING_COLOURS[k], i) for i, k in enumerate(_KINDS) if k in _THING_COLOURS]
    return default + [(shape, colour, len(_KINDS) + j) for j, (shape, colour) in enumerate(extras)]


# ----------------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid bilinearly upsampled."""
    gh, gw = max(2, height // cell + 2), max(2, width // cell + 2)
    grid = rng.uniform(-1, 1, size=(gh, gw))
    ys = np.linspace(0, gh - 1.001, height)
    xs = np.linspace(0, gw - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _shape_mask(kind: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size_range) -> np.ndarray:
    height, width = yy.shape
    side = min(height, width)
    lo, hi = size_range
    if kind == "circle":
        radius = rng.uniform(lo, hi) * side / 2
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    if kind == "rectangle":
        h, w = rng.uniform(lo, hi) * side, rng.uniform(lo, hi) * side
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        return (np.abs(yy - cy) <= h / 2) & (np.abs(xx - cx) <= w / 2)
    # triangle: three vertices at jittered angles around a centre
    radius = rng.uniform(lo, hi) * side * 0.6
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
    vy, vx = cy + radius * np.sin(angles), cx + radius * np.cos(angles)
    inside_all = []
    for i in range(3):
        j = (i + 1) % 3
        cross = (vx[j] - vx[i]) * (yy - vy[i]) - (vy[j] - vy[i]) * (xx - vx[i])
        inside_all.append(cross)
    c = np.stack(inside_all)
    return (c >= 0).all(0) | (c <= 0).all(0)


def _draw_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    min_instances: int,
    max_instances: int,
    size_range: tuple[float, float],
    max_overlap: float,
    min_area: int,
    crowd_probability: float,
    void_probability: float,
    thing_classes: list,
):
    """One image: (H, W, 3) uint8 RGB, (H, W) int64 segment ids (0 unlabeled), and its segments.

    The steps draw from `rng` in a fixed order (stuff, void patch, things, segment ids): the data set's content
    depends on it.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image, is_sky = _draw_stuff(rng, yy, xx)
    category = np.where(is_sky, *_STUFF_CATEGORIES).astype(np.int64)  # per-pixel category, -1 void
    instance = np.full((height, width), -1, dtype=np.int64)  # per-pixel thing instance index
    if rng.random() < void_probability:
        _draw_void_patch(rng, yy, xx, image, category)
    things = _draw_things(
        rng, yy, xx, image, category, instance, min_instances, max_instances,
        lambda entry, rng, yy, xx: _shape_mask(entry[0], rng, yy, xx, size_range), max_overlap, min_area, thing_classes,
    )
    id_map, segments = _segments(rng, category, instance, things, crowd_probability)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, id_map, segments


def _draw_stuff(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stuff background, sky above a wavy horizon and ground below: the float image and the sky mask."""
    height, width = yy.shape
    horizon = rng.uniform(0.3, 0.65) * height
    wave = rng.uniform(0.02, 0.08) * height * np.sin(xx[0] / width * 2 * np.pi * rng.uniform(0.5, 2.0) + rng.uniform(0, 6.3))
    is_sky = yy < (horizon + wave)[None, :]
    t = np.clip(yy / max(horizon, 1.0), 0, 1)[..., None]
    sky_top = np.array([50, 110, 205]) + rng.uniform(-15, 15, 3)
    sky_bottom = np.array([165, 205, 245]) + rng.uniform(-15, 10, 3)
    sky = sky_top * (1 - t) + sky_bottom * t + 6 * _smooth_noise(rng, height, width, 8)[..., None]
    ground_base = np.array([85, 125, 55]) + rng.uniform(-20, 20, 3)
    ground = (
        ground_base
        + 30 * _smooth_noise(rng, height, width, 6)[..., None] * np.array([0.8, 1.0, 0.5])
        + rng.normal(0, 14, size=(height, width, 1))
    )
    return np.where(is_sky[..., None], sky, ground), is_sky


def _draw_void_patch(rng, yy, xx, image, category) -> None:
    """A dark unlabeled rectangle (category -1), drawn into `image` and `category` in place."""
    height, width = yy.shape
    h, w = rng.uniform(0.08, 0.2) * height, rng.uniform(0.08, 0.2) * width
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    void = (np.abs(yy - cy) <= h / 2) & (np.abs(xx - cx) <= w / 2)
    image[void] = rng.uniform(20, 60) + rng.normal(0, 10, size=(int(void.sum()), 3))
    category[void] = -1


def _draw_things(
    rng, yy, xx, image, category, instance, min_instances, max_instances, shape_mask, max_overlap, min_area,
    thing_classes, jitter: float = 25, shading: float = 6,
) -> list[int]:
    """Thing instances drawn in place over the background, each tried up to 25 times until it fits (see
    [`_thing_fits`]), its colour jittered by up to `jitter` and shaded (normal, `shading`); returns the category id
    of each placed instance (its index is its value in `instance`). `thing_classes`: (shape, base colour, category
    id, ...) of each class, drawn with equal probability; `shape_mask(entry, rng, yy, xx)` draws one entry's mask."""
    things = []
    target = int(rng.integers(min_instances, max_instances + 1))
    for _ in range(target):
        entry = thing_classes[int(rng.integers(len(thing_classes)))]
        _, base_colour, category_id = entry[:3]
        for _attempt in range(25):
            mask = shape_mask(entry, rng, yy, xx)
            area = int(mask.sum())
            if not _thing_fits(mask, area, instance, len(things), max_overlap, min_area):
                continue
            colour = np.array(base_colour) + rng.uniform(-jitter, jitter, 3)
            image[mask] = colour + rng.normal(0, shading, size=(area, 3))
            instance[mask] = len(things)
            category[mask] = category_id
            things.append(category_id)
            break
    return things


def _thing_fits(mask, area: int, instance, num_things: int, max_overlap: float, min_area: int) -> bool:
    """Whether a new shape is large enough, covers at most `max_overlap` of its area with earlier instances, and
    leaves each earlier instance enough of its visible area (`min_area` and `1 - max_overlap` of it)."""
    if area < min_area:
        return False
    covered = instance[mask]
    covered = covered[covered >= 0]
    if covered.size > max_overlap * area:
        return False
    if covered.size:
        lost = np.bincount(covered, minlength=num_things)
        visible = np.bincount(instance[instance >= 0], minlength=num_things)
        if np.any(visible - lost < np.maximum(min_area, (1 - max_overlap) * visible)):
            return False
    return True


def _segments(rng, category, instance, things, crowd_probability, stuff_categories=_STUFF_CATEGORIES):
    """The segment-id map and segments_info: stuff first, then things, with random distinct ids in [1, 2^24) and
    now and then one thing segment flagged `iscrowd` (never with `crowd_probability=None`, which draws nothing
    more from `rng`)."""
    segment_masks, segment_categories = [], []
    for stuff_category in stuff_categories:
        mask = (category == stuff_category) & (instance < 0)
        if mask.any():
            segment_masks.append(mask)
            segment_categories.append(stuff_category)
    for index, kind_index in enumerate(things):
        mask = instance == index
        if mask.any():
            segment_masks.append(mask)
            segment_categories.append(kind_index)
    ids = rng.choice(2**24 - 1, size=len(segment_masks), replace=False) + 1
    id_map = np.zeros(instance.shape, dtype=np.int64)
    segments = []
    thing_segments = [i for i, c in enumerate(segment_categories) if c not in stuff_categories]
    crowd = -1
    if crowd_probability is not None and thing_segments and rng.random() < crowd_probability:
        crowd = int(rng.choice(thing_segments))
    for i, (mask, cat) in enumerate(zip(segment_masks, segment_categories)):
        id_map[mask] = ids[i]
        rows, cols = np.nonzero(mask)
        segments.append(
            {
                "id": int(ids[i]),
                "category_id": int(cat),
                "iscrowd": int(i == crowd),
                "area": int(mask.sum()),
                "bbox": [int(cols.min()), int(rows.min()), int(cols.max() - cols.min() + 1), int(rows.max() - rows.min() + 1)],
            }
        )
    return id_map, segments


def make_synthetic_panoptic_dataset(
    num_images: int = 8,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    *,
    min_instances: int = 2,
    max_instances: int = 5,
    size_range: tuple[float, float] = (0.2, 0.45),
    max_overlap: float = 0.25,
    min_area: int | None = None,
    crowd_probability: float = 0.15,
    void_probability: float = 0.15,
    extra_thing_classes: Sequence = (),
):
    """Make a synthetic COCO-panoptic `datasets.Dataset` (see the module docstring for the content and columns).

    Args:
        num_images: number of rows.
        height, width: image size in pixels (at least 16).
        seed: the data set is a pure function of the seed; image `i` is drawn from `default_rng([seed, i])`.
        class_names: names of the five classes (circle, rectangle, triangle, sky, ground) in that order, e.g. with
            synonyms `"circle, disc"`; they are stored in the categories.
        min_instances, max_instances: number of thing instances attempted per image (each placed only where it
            overlaps already placed ones by at most `max_overlap` of either's area).
        size_range: range of the shapes' size as a fraction of the shorter image side.
        max_overlap: largest fraction of a shape's area, or of an earlier shape's visible area, that may overlap.
        min_area: smallest area in pixels of a placed shape (default 1% of the image).
        crowd_probability: probability that one thing segment of an image is flagged `iscrowd`.
        void_probability: probability that an image has an unlabeled (id 0) patch.
        extra_thing_classes: more thing classes, `[(shape, (r, g, b))]` with a shape among circle, rectangle and
            triangle: categories 5, 6, ... (`class_names` then names them too). Every thing class, default or extra,
            is drawn with equal probability.

    Returns:
        `datasets.Dataset` with columns `image_id`, `file_name`, `height`, `width`, `image`, `label`,
        `segments_info`; its `info.description` holds the categories as JSON.
    """
    import datasets

    _check_synthetic_arguments(num_images, height, width, min_instances, max_instances)
    extras = _check_extra_thing_classes(extra_thing_classes)
    categories = synthetic_categories(class_names, extras)
    thing_classes = _thing_classes(extras)
    if min_area is None:
        min_area = max(4, int(0.01 * height * width))
    rows = {k: [] for k in ("image_id", "file_name", "height", "width", "image", "label", "segments_info")}
    for index in range(num_images):
        rng = np.random.default_rng([seed, index])
        image, id_map, segments = _draw_image(
            rng, height, width, min_instances, max_instances, tuple(size_range), max_overlap, min_area,
            crowd_probability, void_probability, thing_classes,
        )
        _append_row(rows, index, f"synthetic_{seed}_{index:06d}.png", image, id_map, segments)
    features = _panoptic_features()
    description = json.dumps(
        {
            "categories": categories,
            _METADATA_KEY: {
                "num_images": num_images, "height": height, "width": width, "seed": seed,
                "min_instances": min_instances, "max_instances": max_instances,
                **({"extra_thing_classes": extras} if extras else {}),
            },
        }
    )
    return datasets.Dataset.from_dict(rows, features=features, info=datasets.DatasetInfo(description=description, features=features))


def _check_synthetic_arguments(num_images, height, width, min_instances, max_instances) -> None:
    """Reject sizes and counts the drawing cannot honour, before drawing anything."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}.")
    if height < 16 or width < 16:
        raise ValueError(f"Synthetic images must be at least 16x16, got {height}x{width}.")
    if not 0 <= min_instances <= max_instances:
        raise ValueError(f"Need 0 <= min_instances <= max_instances, got {min_instances}, {max_instances}.")


def _append_row(rows: dict, index: int, file_name: str, image: np.ndarray, id_map: np.ndarray, segments) -> None:
    """One image's COCO-panoptic columns appended to `rows` (the label as an RGB-encoded PNG of the segment ids)."""
    import PIL.Image

    rows["image_id"].append(index)
    rows["file_name"].append(file_name)
    rows["height"].append(image.shape[0])
    rows["width"].append(image.shape[1])
    rows["image"].append(PIL.Image.fromarray(image))
    rows["label"].append(PIL.Image.fromarray(id_to_rgb(id_map)))
    rows["segments_info"].append(segments)


def _panoptic_features():
    """The `datasets.Features` of the COCO-panoptic columns."""
    import datasets

    return datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "file_name": datasets.Value("string"),
            "height": datasets.Value("int64"),
            "width": datasets.Value("int64"),
            "image": datasets.Image(),
            "label": datasets.Image(),
            # a list of structs (the `[{...}]` form works with datasets 3 and 4)
            "segments_info": [
                {
                    "id": datasets.Value("int64"),
                    "category_id": datasets.Value("int64"),
                    "iscrowd": datasets.Value("int64"),
                    "area": datasets.Value("int64"),
                    "bbox": datasets.Sequence(datasets.Value("int64"), length=4),
                }
            ],
        }
    )


def make_synthetic_image_label_dataset(
    num_images: int = 8,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    extra_thing_classes: Sequence = (),
):
    """Synthetic image-classification data (multi-label) for OPSNet's Decoupled Supervision: the images of
    [`make_synthetic_panoptic_dataset`] with the same arguments, each with `labels`, the names of the classes that
    have a segment in it (crowd ones included), in category-id order; no masks.

    Returns:
        `datasets.Dataset` with columns `image` and `labels` (a list of class names).
    """
    import datasets

    names = [c["name"] for c in synthetic_categories(class_names, extra_thing_classes)]
    panoptic = make_synthetic_panoptic_dataset(num_images, height, width, seed, names,
                                               extra_thing_classes=extra_thing_classes)
    labels = [
        [names[c] for c in sorted({s["category_id"] for s in segments})] for segments in panoptic["segments_info"]
    ]
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.Sequence(datasets.Value("string"))})
    return datasets.Dataset.from_dict({"image": panoptic["image"], "labels": labels}, features=features)


# ----------------------------------------------------------------------------------------------------------------------
# The toy world: an open vocabulary with seen and unseen classes (issue 22)
# ----------------------------------------------------------------------------------------------------------------------
#
# Stuff: an upper region (sky or wall) above a wavy horizon and a lower one (grass, water, road or sand), each with a
# texture of its own. Things: circles, squares and triangles in red, yellow, purple or white (a class is a colour and a
# shape). The *seen* classes are those of panoptic training (the toy COCO); the *unseen* ones (the toy ADE20K's extra
# classes) are new colour x shape combinations and one new stuff type, sand. Every word of an unseen class name is in
# some seen class name, so a text tower that learnt the words can name the new combinations (as CLIP names ADE20K's
# classes); the toy CLIP pretraining sees every class, as CLIP saw the web.

TOY_COLOURS = {"red": (220, 40, 40), "yellow": (240, 210, 40), "purple": (150, 60, 200), "white": (240, 240, 240)}
TOY_SHAPES = ("circle", "square", "triangle")
TOY_UPPER_STUFF = ("sky", "wall")
TOY_LOWER_STUFF = ("grass", "water", "road", "sand")
TOY_UNSEEN_THINGS = ("red triangle", "yellow circle", "purple square")
TOY_UNSEEN_STUFF = ("sand",)
_TOY_THINGS = tuple(f"{c} {s}" for c in TOY_COLOURS for s in TOY_SHAPES)
# The vocabulary order: seen things, seen stuff, unseen things, unseen stuff (the seen split's categories are then the
# first ids, the same in both splits).
TOY_SEEN_CLASSES = tuple(t for t in _TOY_THINGS if t not in TOY_UNSEEN_THINGS) + tuple(
    s for s in TOY_UPPER_STUFF + TOY_LOWER_STUFF if s not in TOY_UNSEEN_STUFF
)
TOY_UNSEEN_CLASSES = TOY_UNSEEN_THINGS + TOY_UNSEEN_STUFF
TOY_CLASSES = TOY_SEEN_CLASSES + TOY_UNSEEN_CLASSES
TOY_SPLITS = ("seen", "all")


def toy_world_categories(split: str = "all") -> list[dict]:
    """`[{"id", "name", "isthing"}]` of the toy world: the 14 seen classes (ids 0 .. 13) and, for split `"all"`, the 4
    unseen ones (ids 14 .. 17)."""
    names = TOY_SEEN_CLASSES if _check_toy_split(split) == "seen" else TOY_CLASSES
    return [{"id": i, "name": n, "isthing": int(n in _TOY_THINGS)} for i, n in enumerate(names)]


def _check_toy_split(split: str) -> str:
    if split not in TOY_SPLITS:
        raise ValueError(f"split must be one of {TOY_SPLITS}, got {split!r}.")
    return split


def toy_caption(names: Sequence[str]) -> str:
    """The caption of a picture showing the named classes (each once, in the given order)."""
    return "a photo of " + ", ".join(dict.fromkeys(names)) + "."


def _toy_texture(kind: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A float (H, W, 3) image of one stuff type, its look scaled to the image size."""
    height, width = yy.shape
    side = min(height, width)
    noise = _smooth_noise(rng, height, width, max(2, side // 8))[..., None]
    grain = rng.normal(0, 1, size=(height, width, 1))
    jitter = rng.uniform(-12, 12, 3)
    if kind == "sky":
        t = (yy / height)[..., None]
        return np.array([55, 115, 210]) * (1 - t) + np.array([170, 205, 245]) * t + jitter + 5 * noise
    if kind == "wall":  # bricks: mortar lines every eighth of the side, joints shifted every other row
        course = max(3, side // 8)
        row = (yy // course).astype(int)
        joint = ((xx + (row % 2) * course) % (2 * course)) < 1.5
        mortar = ((yy % course) < 1.5) | joint
        brick = np.array([165, 85, 65]) + jitter + 10 * noise + 5 * grain
        return np.where(mortar[..., None], np.array([200, 195, 185]), brick)
    if kind == "grass":
        return np.array([70, 135, 50]) + jitter + 25 * noise * np.array([0.6, 1.0, 0.4]) + 16 * grain
    if kind == "water":  # horizontal ripples
        ripple = np.sin(yy * (2 * np.pi / max(3, side / 10)) + 2 * noise[..., 0])[..., None]
        return np.array([30, 90, 150]) + jitter + 25 * ripple * np.array([0.5, 0.8, 1.0]) + 4 * grain
    if kind == "road":  # dark asphalt with a dashed white line
        base = np.array([75, 75, 80]) + jitter + 6 * noise + 10 * grain
        line_y = rng.uniform(0.3, 0.7) * height
        dash = (np.abs(yy - line_y) < max(1.0, side / 64)) & ((xx % (side / 4)) < side / 8)
        return np.where(dash[..., None], np.array([235, 235, 225]), base)
    if kind == "sand":
        return np.array([215, 185, 125]) + jitter + 12 * noise + 9 * grain
    raise ValueError(f"unknown stuff type {kind!r}")


def _toy_thing_classes(split: str) -> list[tuple[str, tuple[int, int, int], int]]:
    """(drawn shape, colour, category id, whether a square) of the split's thing classes (a square is drawn by its own
    rule, the old data sets' rectangles keep theirs)."""
    ids = {name: i for i, name in enumerate(TOY_CLASSES)}
    names = [t for t in _TOY_THINGS if split == "all" or t not in TOY_UNSEEN_THINGS]
    out = []
    for name in names:
        colour, shape = name.split(" ")
        out.append(("rectangle" if shape == "square" else shape, TOY_COLOURS[colour], ids[name], shape == "square"))
    return out


def _draw_toy_scene(rng: np.random.Generator, size: int, split: str, max_instances: int):
    """One toy-world scene: (image uint8, segment-id map, segments_info, names present)."""
    ids = {name: i for i, name in enumerate(TOY_CLASSES)}
    lower = [s for s in TOY_LOWER_STUFF if split == "all" or s not in TOY_UNSEEN_STUFF]
    upper_kind = TOY_UPPER_STUFF[int(rng.integers(len(TOY_UPPER_STUFF)))]
    lower_kind = lower[int(rng.integers(len(lower)))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    horizon = rng.uniform(0.3, 0.6) * size
    wave = rng.uniform(0.02, 0.08) * size * np.sin(xx[0] / size * 2 * np.pi * rng.uniform(0.5, 2.0) + rng.uniform(0, 6.3))
    is_upper = yy < (horizon + wave)[None, :]
    image = np.where(is_upper[..., None], _toy_texture(upper_kind, rng, yy, xx), _toy_texture(lower_kind, rng, yy, xx))
    category = np.where(is_upper, ids[upper_kind], ids[lower_kind]).astype(np.int64)
    instance = np.full((size, size), -1, dtype=np.int64)
    # 1 .. max_instances attempted, at most 20% overlap
    things = _draw_things(rng, yy, xx, image, category, instance, 1, max_instances, _toy_shape_mask, 0.2,
                          max(4, int(0.012 * size * size)), _toy_thing_classes(split), jitter=20, shading=5)
    stuff = (ids[upper_kind], ids[lower_kind])
    id_map, segments = _segments(rng, category, instance, things, None, stuff)
    names = [TOY_CLASSES[s["category_id"]] for s in segments]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), id_map, segments, names


def _toy_shape_mask(entry, rng, yy, xx) -> np.ndarray:
    kind, square = entry[0], entry[3]
    if not square:
        return _shape_mask(kind, rng, yy, xx, (0.2, 0.42))
    size = yy.shape[0]
    side = rng.uniform(0.18, 0.36) * size
    cy, cx = rng.uniform(0, size), rng.uniform(0, size)
    return (np.abs(yy - cy) <= side / 2) & (np.abs(xx - cx) <= side / 2)


def make_toy_world_dataset(num_images: int = 8, size: int = 128, seed: int = 0, split: str = "all", *,
                           max_instances: int = 5):
    """The toy world's scenes as a COCO-panoptic `datasets.Dataset` (the columns of
    [`make_synthetic_panoptic_dataset`] plus `caption`, naming the classes shown).

    Args:
        num_images: number of rows; image `i` is drawn from `default_rng([seed, i])`.
        size: side of the square images in pixels (at least 16).
        seed: the data set is a pure function of its arguments.
        split: `"seen"`: only the 14 seen classes appear (panoptic training, the toy COCO); `"all"`: all 18 classes
            (the toy ADE20K vocabulary: held-out scenes with unseen classes). The categories stored with the data set
            are those of the split ([`toy_world_categories`]).
        max_instances: most thing instances attempted per image (at least 1).
    """
    import datasets

    _check_toy_split(split)
    _check_synthetic_arguments(num_images, size, size, 1, max_instances)
    rows = {k: [] for k in ("image_id", "file_name", "height", "width", "image", "label", "segments_info", "caption")}
    for index in range(num_images):
        image, id_map, segments, names = _draw_toy_scene(np.random.default_rng([seed, index]), size, split, max_instances)
        _append_row(rows, index, f"toy_{split}_{seed}_{index:06d}.png", image, id_map, segments)
        rows["caption"].append(toy_caption(names))
    features = _panoptic_features()
    features["caption"] = datasets.Value("string")
    description = json.dumps({
        "categories": toy_world_categories(split),
        "eovseg_toy_world": {"num_images": num_images, "size": size, "seed": seed, "split": split},
    })
    return datasets.Dataset.from_dict(rows, features=features, info=datasets.DatasetInfo(description=description, features=features))


def toy_world_crop(name: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A close-up (uint8 (size, size, 3)) of one class of the toy world: a thing centred over a random stuff
    background, or a stuff type filling the picture, for the toy CLIP's single-concept image-caption pairs."""
    if name not in TOY_CLASSES:
        raise ValueError(f"{name!r} is not a toy-world class; they are {list(TOY_CLASSES)}.")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if name not in _TOY_THINGS:
        return np.clip(np.rint(_toy_texture(name, rng, yy, xx)), 0, 255).astype(np.uint8)
    background = (TOY_UPPER_STUFF + TOY_LOWER_STUFF)[int(rng.integers(6))]
    image = _toy_texture(background, rng, yy, xx)
    colour, shape = name.split(" ")
    extent = rng.uniform(0.55, 0.85) * size
    cy, cx = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= (extent / 2) ** 2
    elif shape == "square":
        mask = (np.abs(yy - cy) <= extent / 2) & (np.abs(xx - cx) <= extent / 2)
    else:
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
        vy, vx = cy + extent / 2 * np.sin(angles), cx + extent / 2 * np.cos(angles)
        cross = np.stack([(vx[(i + 1) % 3] - vx[i]) * (yy - vy[i]) - (vy[(i + 1) % 3] - vy[i]) * (xx - vx[i]) for i in range(3)])
        mask = (cross >= 0).all(0) | (cross <= 0).all(0)
    image[mask] = np.array(TOY_COLOURS[colour]) + rng.uniform(-20, 20, 3) + rng.normal(0, 5, size=(int(mask.sum()), 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)

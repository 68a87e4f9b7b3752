"""The one overlay drawing (demo, predict, web page, API): tint, outlines, labels sized to the picture and never
overlapping, the data set's colours for a built-in vocabulary, stable distinct colours for a class list, the legend."""

import colorsys
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eovseg.vocabularies
from eovseg.visualization import (class_colors, draw_segments, draw_side_by_side, label_boxes, label_font_size,
                                  legend_entries)

CLASSES = ["cat, kitty", "dog", "grass"]


def noise_image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 60, (height, width, 3), dtype=np.uint8))


def circles(height, width, centres, radius, background=True):
    """A map of touching discs (ids 2, 3, ...) over a background segment (id 1)."""
    ids = np.full((height, width), 1 if background else 0, dtype=np.int64)
    yy, xx = np.ogrid[:height, :width]
    for k, (cy, cx) in enumerate(centres):
        ids[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = k + 2
    return ids


def test_draw_segments_tints_outlines_and_labels_only_segments():
    image = noise_image(120, 160)
    ids = np.zeros((120, 160), dtype=np.int64)
    ids[8:72, 8:100] = 3
    infos = [{"id": 3, "label_id": 1, "score": 1.0}]
    picture = np.asarray(draw_segments(image, torch.from_numpy(ids), infos, CLASSES))
    original = np.asarray(image).astype(np.float64)
    color = np.array(class_colors(CLASSES)[1])
    assert np.array_equal(picture[ids == 0], original[ids == 0])
    assert np.all(picture[8, 8:100] == 255) and np.all(picture[8:72, 99] == 255)  # the outline
    tinted = np.floor(original[9:71, 9:99] * 0.5 + color * 0.5)
    # Every inner pixel is tinted except the label: a box in the class colour on the segment's middle (~row 40)
    rows, cols = np.nonzero(np.abs(picture[9:71, 9:99] - tinted).max(-1) > 1)
    assert rows.min() + 9 < 40 < rows.max() + 9 and cols.min() + 9 < 54 < cols.max() + 9
    assert rows.max() - rows.min() < 30 and cols.max() - cols.min() < 60
    assert (np.abs(picture[9:71, 9:99] - color).max(-1) == 0).sum() > 50  # the box's fill is the class colour
    unlabeled = np.asarray(draw_segments(image, ids, infos, CLASSES, labels=False)).astype(np.float64)
    assert np.abs(unlabeled[9:71, 9:99] - tinted).max() <= 1


def test_label_font_follows_the_picture_size():
    assert label_font_size(3000, 2000) == 80 and label_font_size(640, 480) == 19
    assert label_font_size(64, 64) == 11


def label_pixels(picture, image, ids, infos, names):
    """Where the labels are: pixels of `picture` that differ from the same drawing without labels."""
    plain = np.asarray(draw_segments(image, ids, infos, names, labels=False), dtype=np.int64)
    return np.abs(np.asarray(picture, dtype=np.int64) - plain).max(-1) > 0


def test_labels_are_sized_to_a_large_photo_and_leave_a_thumbnail_visible():
    names = ["red circle", "green ground"]
    infos = [{"id": 1, "label_id": 1}, {"id": 2, "label_id": 0}]
    ids = circles(2000, 3000, [(1000, 1500)], 500)
    image = noise_image(2000, 3000)
    rows, cols = np.nonzero(label_pixels(draw_segments(image, ids, infos, names), image, ids, infos, names))
    # Two labels, each at least 1/40 of the picture high: readable when the photo is shown 600 pixels wide.
    circle_rows = rows[(np.abs(rows - 1000) < 300) & (np.abs(cols - 1500) < 300)]
    assert circle_rows.max() - circle_rows.min() >= 2000 / 40
    assert ((rows - 1000) ** 2 + (cols - 1500) ** 2 > 500**2).any()  # the ground's label, off the circle
    # A 64x64 thumbnail: labels where they fit, covering at most a quarter of it; a segment too small is left out.
    thumbnail, small, names = noise_image(64, 64), circles(64, 64, [(32, 32)], 6), ["cup", "sky"]
    covered = label_pixels(draw_segments(thumbnail, small, infos, names), thumbnail, small, infos, names)
    assert 0 < covered.mean() <= 0.25 and not covered[26:38, 26:38].all()


def test_instance_labels_do_not_overlap():
    centres = [(300, 100 + 110 * k) for k in range(12)] + [(420, 150 + 110 * k) for k in range(11)]
    ids = circles(600, 1400, centres, 60)
    masks = [(ids == k + 2, (0, 0), "person") for k in range(len(centres))] + [(ids == 1, (0, 0), "road")]
    font = __import__("eovseg.visualization", fromlist=["_font"])._font(label_font_size(1400, 600))
    boxes = label_boxes((1400, 600), masks, font)
    placed = [box for box in boxes if box is not None]
    assert len(placed) >= 12
    for a, b in itertools.combinations(placed, 2):
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    for box, (mask, _, _) in zip(boxes, masks):
        if box is not None:
            assert 0 <= box[0] < box[2] <= 1400 and 0 <= box[1] < box[3] <= 600
            assert mask[(box[1] + box[3]) // 2, (box[0] + box[2]) // 2]  # on its own segment


def test_a_builtin_vocabulary_is_drawn_in_its_data_sets_colours():
    folder = Path(eovseg.vocabularies.__file__).parent
    for name in ("coco_panoptic", "ade20k_150", "cityscapes"):
        classes = json.loads((folder / f"{name}.json").read_text())["classes"]
        names = [c["name"] for c in classes]
        assert class_colors(names) == [tuple(c["color"]) for c in classes]
    coco = json.loads((folder / "coco_panoptic.json").read_text())["classes"]
    names = [c["name"] for c in coco]
    ids = np.zeros((40, 60), dtype=np.int64)
    ids[:, 30:] = 1
    picture = np.asarray(draw_segments(Image.new("RGB", (60, 40)), ids, [{"id": 1, "label_id": 2}], names,
                                       alpha=1.0, labels=False))
    assert tuple(picture[20, 45]) == tuple(coco[2]["color"])  # "car" in COCO's colour
    assert legend_entries([{"id": 1, "label_id": 2}], names)[0][1] == tuple(coco[2]["color"])


def hue_degrees(rgb):
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    return h * 360, s, v


def test_a_class_list_gets_the_colours_its_names_say():
    names = ["blue sky", "green ground", "red circle", "purple rectangle", "yellow triangle", "grey wall",
             "blue car", "sky"]
    colors = dict(zip(names, class_colors(names)))
    for name, (low, high) in {"blue sky": (200, 250), "blue car": (200, 250), "green ground": (90, 150),
                              "purple rectangle": (260, 300), "yellow triangle": (40, 65)}.items():
        hue, saturation, _ = hue_degrees(colors[name])
        assert low <= hue <= high and saturation > 0.3, (name, colors[name])
    hue, saturation, _ = hue_degrees(colors["red circle"])
    assert (hue <= 15 or hue >= 345) and saturation > 0.5
    assert hue_degrees(colors["grey wall"])[1] < 0.1
    assert colors["blue sky"] != colors["blue car"]  # one family, two shades


def test_a_class_list_gets_distinct_colours_stable_across_runs_and_orders():
    names = ["car", "road, street", "sky", "tree", "person", "dog", "cat", "building", "fence", "bicycle", "bus",
             "water", "mountain", "boat", "bird", "horse", "sheep", "cow", "chair", "table"]
    colors = class_colors(names)
    rgb = np.array(colors, dtype=np.float64)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)[np.triu_indices(len(names), 1)]
    assert distances.min() > 25, distances.min()  # no two classes alike
    reordered = dict(zip(names[::-1], class_colors(names[::-1])))
    assert all(reordered[name] == color for name, color in zip(names, colors))
    # Another Python process (another hash seed) gives the same colours.
    code = f"from eovseg.visualization import class_colors; print(class_colors({names!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    assert other.stdout.strip() == str(colors)


def test_legend_lists_each_class_found_once_in_the_drawing_colours():
    infos = [{"id": 1, "label_id": 0}, {"id": 2, "label_id": 1}, {"id": 5, "label_id": 2}, {"id": 7, "label_id": 0}]
    palette = class_colors(CLASSES)
    assert legend_entries(infos, CLASSES) == [("cat", palette[0], 2), ("dog", palette[1], 1), ("grass", palette[2], 1)]
    given = [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert legend_entries(infos, CLASSES, colors=given)[1] == ("dog", (4, 5, 6), 1)
    with pytest.raises(ValueError, match="2 colours for 3 classes"):
        class_colors(CLASSES, given[:2])


def test_side_by_side_holds_the_input_the_overlay_and_the_legend():
    image, ids = noise_image(64, 80), circles(64, 80, [(32, 40)], 15)
    infos = [{"id": 1, "label_id": 2}, {"id": 2, "label_id": 0}]
    sheet, panels = draw_side_by_side(image, ids, infos, CLASSES, min_side=256)
    sheet = np.asarray(sheet)

    def crop(name):
        left, top, right, bottom = panels[name]
        return sheet[top:bottom, left:right]

    assert np.array_equal(crop("input"), np.repeat(np.repeat(np.asarray(image), 4, axis=0), 4, axis=1))
    assert np.array_equal(crop("overlay"), np.asarray(draw_segments(image, ids, infos, CLASSES, min_side=256)))
    assert panels["input"][2] < panels["overlay"][0] and panels["overlay"][2] < panels["legend"][0]
    legend = crop("legend")
    for color in (class_colors(CLASSES)[0], class_colors(CLASSES)[2]):  # a swatch of each class found
        assert (np.abs(legend.astype(int) - color).max(-1) == 0).sum() > 100
    assert not (np.abs(legend.astype(int) - class_colors(CLASSES)[1]).max(-1) == 0).any()  # "dog": not found

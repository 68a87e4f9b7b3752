"""Drawing segmentation results: the one overlay of the demo, `eovseg predict`, the web page and the API.

    picture = draw_segments(image, result["segmentation"], result["segments_info"], class_names)
    legend = legend_entries(result["segments_info"], class_names)     # [(name, (r, g, b), count), ...]
    sheet, panels = draw_side_by_side(image, result["segmentation"], result["segments_info"], class_names)

`segments_info` is what the processor's post-processing returns (`id`, `label_id`, `score`); the map holds segment
ids, with ids that no segment describes (0 or -1) left undrawn. Segments of one class share its colour (so the legend
names a colour once); outlines keep instances of a class apart.

Colours ([`class_colors`]): a built-in vocabulary (its class list as `get_vocabulary` gives it) or a vocabulary with
colours is drawn in its data set's colours. Any other class list gets colours that depend on the class names only:
a name holding a colour word ("blue sky", "red circle", "grey wall") is drawn in that colour's family (classes of one
family in different shades); every other name gets a hue from a hash of its name, moved to the nearest free hue
when a class of the list already holds a close colour. The same list gives the same colours in every run and in any
order.

Labels are sized to the picture (a font of 1/25 of its shorter side, at least 11 px: readable when a 3000x2000
photo is shown scaled to a screen) and never overlap: each is placed inside its segment at the free spot farthest
from the segment's border, larger segments first; a segment too small for its label (under twice the label's area),
or with no free spot, is left unlabelled (the legend names it by colour).
"""

from __future__ import annotations

import colorsys
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .vocabulary import display_name

__all__ = ["class_colors", "draw_legend", "draw_segments", "draw_side_by_side", "enlarge", "legend_entries"]

Color = tuple[int, int, int]

# Colour words and the family each names, with the family's base colour (RGB).
COLOR_FAMILIES: dict[str, Color] = {
    "red": (214, 39, 40), "orange": (245, 130, 32), "yellow": (240, 210, 30), "green": (44, 160, 44),
    "cyan": (23, 190, 207), "blue": (31, 100, 220), "purple": (130, 60, 180), "magenta": (220, 40, 200),
    "pink": (247, 140, 190), "brown": (140, 86, 45), "black": (25, 25, 25), "white": (245, 245, 245),
    "gray": (127, 127, 127),
}
COLOR_WORDS: dict[str, str] = {
    **{family: family for family in COLOR_FAMILIES},
    "scarlet": "red", "crimson": "red", "maroon": "red", "gold": "yellow", "golden": "yellow", "lime": "green",
    "olive": "green", "teal": "cyan", "turquoise": "cyan", "navy": "blue", "azure": "blue", "violet": "purple",
    "lilac": "purple", "lavender": "purple", "fuchsia": "magenta", "grey": "gray", "silver": "gray", "tan": "brown",
    "beige": "brown",
}
# Colours closer than this (CIE76 distance in Lab) are too alike to tell two classes apart in a legend.
MIN_COLOR_DISTANCE = 45.0


def _srgb_to_lab(rgb) -> np.ndarray:
    """CIE Lab (D65) of sRGB colours in 0-255, the space where distances follow what the eye tells apart."""
    c = np.asarray(rgb, dtype=np.float64).reshape(-1, 3) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def color_family(class_name: str) -> str | None:
    """The colour family named in a class entry ("blue sky" -> "blue"), the first colour word found, or None."""
    for word in re.findall(r"[a-z]+", class_name.lower()):
        if word in COLOR_WORDS:
            return COLOR_WORDS[word]
    return None


def _shade(base: Color, index: int) -> Color:
    """The `index`-th shade of a family: its base colour, then darker and lighter ones (only darker ones for a light
    family such as white, only lighter ones for a dark one such as black)."""
    h, lightness, s = colorsys.rgb_to_hls(*(v / 255 for v in base))
    step = 0.15 * ((index + 1) // 2 if 0.3 <= lightness <= 0.7 else index)
    if lightness > 0.7 or (0.3 <= lightness <= 0.7 and index % 2 == 1):
        step = -step
    lightness = min(0.92, max(0.08, lightness + step))
    return tuple(int(round(v * 255)) for v in colorsys.hls_to_rgb(h, lightness, s))


def _name_hue(name: str) -> float:
    """A hue in [0, 1) from the name's bytes (hashlib, not `hash`: the same in every Python process)."""
    return int.from_bytes(hashlib.sha1(name.strip().lower().encode("utf-8")).digest()[:4], "big") / 2**32


def _hue_candidates(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright colours at `count` hues, then darker and paler ones: `(hues, rgb)`."""
    hues, rgb = [], []
    for saturation, value in ((0.75, 0.95), (0.9, 0.65), (0.45, 1.0)):
        for k in range(count):
            hues.append(k / count)
            rgb.append(tuple(int(round(v * 255)) for v in colorsys.hsv_to_rgb(k / count, saturation, value)))
    return np.array(hues), np.array(rgb)


@lru_cache(maxsize=64)
def _colors_of_names(names: tuple[str, ...]) -> tuple[Color, ...]:
    colors: dict[int, Color] = {}
    families = [color_family(name) for name in names]
    # Named colours first (they have no other choice), in name order so that list order changes nothing.
    shades: dict[str, int] = {}
    for i in sorted((i for i, f in enumerate(families) if f), key=lambda i: names[i]):
        colors[i] = _shade(COLOR_FAMILIES[families[i]], shades.get(families[i], 0))
        shades[families[i]] = shades.get(families[i], 0) + 1
    hues, candidates = _hue_candidates(max(48, len(names)))
    lab = _srgb_to_lab(candidates)
    nearest = np.full(len(candidates), np.inf)
    for color in colors.values():
        nearest = np.minimum(nearest, np.linalg.norm(lab - _srgb_to_lab(color), axis=1))
    for i in sorted((i for i, f in enumerate(families) if not f), key=lambda i: display_name(names[i]).lower()):
        gap = np.abs(hues - _name_hue(display_name(names[i])))
        gap = np.minimum(gap, 1 - gap) + np.repeat(np.arange(3), len(hues) // 3)  # prefer bright, then the hue
        free = nearest >= MIN_COLOR_DISTANCE
        pick = int(np.argmin(np.where(free, gap, np.inf))) if free.any() else int(np.argmax(nearest))
        colors[i] = tuple(int(v) for v in candidates[pick])
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[pick], axis=1))
    return tuple(colors[i] for i in range(len(names)))


@lru_cache(maxsize=1)
def _builtin_colors() -> dict[tuple[str, ...], tuple[Color, ...]]:
    from .vocabularies import get_vocabulary, list_vocabularies

    found = {}
    for name in list_vocabularies():
        vocabulary = get_vocabulary(name)
        if vocabulary.colors:
            found[tuple(vocabulary.class_names)] = tuple(tuple(int(v) for v in c) for c in vocabulary.colors)
    return found


def class_colors(class_names: Sequence[str], colors: Sequence[Sequence[int]] | None = None) -> list[Color]:
    """The RGB colour of each class: `colors` when given (a vocabulary's `colors`), a built-in vocabulary's data-set
    colours when `class_names` is its class list, else colours from the names (see the module's docstring)."""
    names = tuple(str(name) for name in class_names)
    if colors is not None:
        if len(colors) != len(names):
            raise ValueError(f"{len(colors)} colours for {len(names)} classes.")
        return [tuple(int(v) for v in c) for c in colors]
    builtin = _builtin_colors().get(names)
    return list(builtin if builtin is not None else _colors_of_names(names))


def _as_numpy_map(segmentation) -> np.ndarray:
    if hasattr(segmentation, "detach"):
        segmentation = segmentation.detach().cpu().numpy()
    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 2:
        raise ValueError(f"segmentation must be a (height, width) map of segment ids, got shape {segmentation.shape}.")
    return segmentation.astype(np.int64, copy=False)


def label_font_size(width: int, height: int) -> int:
    """Pixels of label text on a picture of this size: 1/25 of its shorter side, at least 11 (a 3000x2000 photo
    shown 600 pixels wide still has 16-pixel labels)."""
    return max(11, round(min(width, height) / 25))


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_color(color: Color) -> Color:
    """Black on light colours, white on dark ones (relative luminance)."""
    return (0, 0, 0) if 0.2126 * color[0] + 0.7152 * color[1] + 0.0722 * color[2] > 140 else (255, 255, 255)


def _factor(width: int, height: int, min_side: int) -> int:
    return max(1, min_side // min(width, height))


def enlarge(image: Image.Image, min_side: int) -> Image.Image:
    """The image enlarged by the whole factor `min_side // shorter side` (nearest neighbour: sharp pixels), so that a
    small image's shorter side comes to between half `min_side` and `min_side`; an image whose shorter side is more
    than half `min_side` is returned as it is."""
    factor = _factor(image.width, image.height, min_side)
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor),
                                                  Image.Resampling.NEAREST)


def _enlarged(image: Image.Image, ids: np.ndarray, min_side: int) -> tuple[Image.Image, np.ndarray]:
    factor = _factor(image.width, image.height, min_side)
    if factor == 1:
        return image, ids
    return enlarge(image, min_side), np.repeat(np.repeat(ids, factor, axis=0), factor, axis=1)


def _segment_numbers(ids: np.ndarray, segment_ids: Sequence[int]) -> np.ndarray:
    """The map renumbered: `k + 1` where it holds `segment_ids[k]`, 0 elsewhere (one sorted look-up over the map; a
    pass per segment, or `np.unique`'s sort, takes seconds on a 3000x2000 photo)."""
    keys = np.asarray(segment_ids, dtype=np.int64)
    if not len(keys):
        return np.zeros(ids.shape, dtype=np.int32)
    order = np.argsort(keys, kind="stable")
    position = np.searchsorted(keys[order], ids).clip(max=len(keys) - 1)
    return np.where(keys[order][position] == ids, order[position] + 1, 0).astype(np.int32)


def _outline(ids: np.ndarray, drawn: np.ndarray, width: int) -> np.ndarray:
    """Pixels of drawn segments that touch another segment (or undrawn pixels), `width` pixels thick."""
    edge = np.zeros(ids.shape, dtype=bool)
    rows, cols = ids[1:] != ids[:-1], ids[:, 1:] != ids[:, :-1]
    edge[1:] |= rows
    edge[:-1] |= rows
    edge[:, 1:] |= cols
    edge[:, :-1] |= cols
    if width > 1:
        edge = ndimage.binary_dilation(edge, iterations=width - 1)
    return edge & drawn


def draw_segments(
    image: Image.Image,
    segmentation,
    segments_info: Sequence[Mapping],
    class_names: Sequence[str],
    alpha: float = 0.5,
    labels: bool = True,
    colors: Sequence[Sequence[int]] | None = None,
    min_side: int = 0,
) -> Image.Image:
    """The image with each segment tinted in its class colour, outlined, and (with `labels`) named.

    Args:
        image: the input image (its size is the map's).
        segmentation: `(H, W)` segment ids (NumPy array or torch tensor).
        segments_info: `[{"id", "label_id", ...}]` of the segments to draw.
        class_names: the vocabulary (class entries; the first synonym is written).
        alpha: opacity of the tint.
        labels: write the class name on each segment (where it fits, see the module's docstring).
        colors: one RGB colour per class (default: [`class_colors`] of `class_names`).
        min_side: draw on a copy enlarged by the whole factor `min_side // shorter side` (nearest neighbour, see
            [`enlarge`]), so that the labels of a small image are sharp and leave it visible (the picture is then
            larger than the image); 0 keeps the image's size.
    """
    ids = _as_numpy_map(segmentation)
    if (image.height, image.width) != ids.shape:
        raise ValueError(f"The image is {image.height}x{image.width} but the map is {ids.shape[0]}x{ids.shape[1]}.")
    image, ids = _enlarged(image, ids, min_side)
    palette = class_colors(class_names, colors)
    numbers = _segment_numbers(ids, [int(s["id"]) for s in segments_info])
    tint = np.array([(0, 0, 0, 0)] + [(*palette[int(s["label_id"])], alpha) for s in segments_info],
                    dtype=np.float32)[numbers]
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base + (tint[..., :3] - base) * tint[..., 3:]
    out[_outline(numbers, numbers > 0, max(1, round(min(ids.shape) / 500)))] = 255.0
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if labels:
        found = []
        for k, where in enumerate(ndimage.find_objects(numbers, max_label=len(segments_info))):
            if where is not None:  # a segment with no pixel in the map is not drawn
                label_id = int(segments_info[k]["label_id"])
                found.append((numbers[where] == k + 1, (where[1].start, where[0].start),
                              display_name(class_names[label_id]), palette[label_id]))
        _write_labels(picture, found)
    return picture


def _spots(mask: np.ndarray, step: int, count: int = 600) -> np.ndarray:
    """About `count` `(x, y)` points spread over the mask, farthest from its border first and, among points about as
    far, nearest its centre first; on a map sampled every `step` pixels (a distance transform of a 3000x2000 mask per
    segment would take seconds)."""
    small = mask[::step, ::step]
    ys, xs = np.nonzero(small)
    if not len(ys):
        return np.zeros((0, 2), dtype=np.int64)
    distance = ndimage.distance_transform_edt(np.pad(small, 1))[1:-1, 1:-1][ys, xs]
    off_centre = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2
    order = np.lexsort((off_centre, -np.round(distance)))
    order = order[:: max(1, len(order) // count)]  # every depth, down to the border, gets tried
    return np.stack([xs[order] * step + step // 2, ys[order] * step + step // 2], axis=1)


def _overlaps(box, boxes) -> bool:
    return any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes)


def label_boxes(size: tuple[int, int], labels: Sequence[tuple[np.ndarray, tuple[int, int], str]],
                font) -> list[tuple | None]:
    """Where each `(mask, (left, top) of the mask in the picture, text)` label goes: `(left, top, right, bottom)` of
    its box, or None where it is left out. Larger segments choose first; a box stays inside the picture and off
    every other box."""
    width, height = size
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(2, font.size // 5)
    step = max(1, math.ceil(max(size) / 400))
    areas = [int(mask.sum()) for mask, _, _ in labels]
    placed: list[tuple] = []
    boxes: list[tuple | None] = [None] * len(labels)
    for index in sorted(range(len(labels)), key=lambda i: -areas[i]):
        mask, (left_of_mask, top_of_mask), text = labels[index]
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        if w > width or h > height or areas[index] < 2 * w * h:
            continue
        for x, y in _spots(mask, step):
            x0 = int(min(max(0, left_of_mask + x - w // 2), width - w))
            y0 = int(min(max(0, top_of_mask + y - h // 2), height - h))
            box = (x0, y0, x0 + w, y0 + h)
            if not _overlaps((x0 - pad, y0 - pad, x0 + w + pad, y0 + h + pad), placed):
                placed.append(box)
                boxes[index] = box
                break
    return boxes


def _write_labels(picture: Image.Image, labels: Sequence[tuple[np.ndarray, tuple[int, int], str, Color]]) -> None:
    draw = ImageDraw.Draw(picture)
    font = _font(label_font_size(picture.width, picture.height))
    pad = max(2, font.size // 5)
    boxes = label_boxes(picture.size, [(mask, offset, text) for mask, offset, text, _ in labels], font)
    for box, (_, _, text, color) in zip(boxes, labels):
        if box is not None:
            left, top, _, _ = draw.textbbox((0, 0), text, font=font)
            draw.rectangle(box, fill=color, outline=(0, 0, 0), width=max(1, font.size // 12))
            draw.text((box[0] + pad - left, box[1] + pad - top), text, fill=_text_color(color), font=font)


def legend_entries(segments_info: Sequence[Mapping], class_names: Sequence[str],
                   colors: Sequence[Sequence[int]] | None = None) -> list[tuple[str, Color, int]]:
    """The classes found, in vocabulary order: `(display name, colour, number of segments)`, in the colours
    [`draw_segments`] uses."""
    palette = class_colors(class_names, colors)
    counts: dict[int, int] = {}
    for segment in segments_info:
        counts[int(segment["label_id"])] = counts.get(int(segment["label_id"]), 0) + 1
    return [(display_name(class_names[k]), palette[k], counts[k]) for k in sorted(counts)]


def draw_legend(entries: Sequence[tuple[str, Color, int]], font_size: int = 16) -> Image.Image:
    """The legend as a picture: per row a swatch, the class name and (in brackets) its number of segments."""
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [f"{name} ({count})" for name, _, count in entries] or ["no segments found"]
    pad, row = font_size // 2, round(font_size * 1.6)
    text_width = max(probe.textbbox((0, 0), line, font=font)[2] for line in lines)
    legend = Image.new("RGB", (3 * pad + font_size + text_width + pad, 2 * pad + row * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for k, line in enumerate(lines):
        y = pad + k * row
        if entries:
            draw.rectangle((pad, y, pad + font_size, y + font_size), fill=entries[k][1], outline=(0, 0, 0))
        draw.text((2 * pad + font_size, y), line, fill=(0, 0, 0), font=font)
    return legend


def draw_side_by_side(image: Image.Image, segmentation, segments_info: Sequence[Mapping], class_names: Sequence[str],
                      colors: Sequence[Sequence[int]] | None = None, min_side: int = 512,
                      ) -> tuple[Image.Image, dict[str, tuple[int, int, int, int]]]:
    """The input, its labelled overlay ([`draw_segments`]) and the legend side by side on a white sheet, all
    enlarged as `draw_segments(min_side=...)` enlarges. Returns the sheet and each panel's `(left, top, right,
    bottom)` box (`"input"`, `"overlay"`, `"legend"`)."""
    overlay = draw_segments(image, segmentation, segments_info, class_names, colors=colors, min_side=min_side)
    shown = enlarge(image.convert("RGB"), min_side)
    legend = draw_legend(legend_entries(segments_info, class_names, colors),
                         max(16, label_font_size(overlay.width, overlay.height)))
    gap = max(8, overlay.width // 50)
    sheet = Image.new("RGB", (2 * overlay.width + legend.width + 2 * gap, max(overlay.height, legend.height)),
                      (255, 255, 255))
    right = 2 * overlay.width + gap
    panels = {"input": (0, 0, *shown.size), "overlay": (overlay.width + gap, 0, right, overlay.height),
              "legend": (right + gap, 0, right + gap + legend.width, legend.height)}
    for name, picture in (("input", shown), ("overlay", overlay), ("legend", legend)):
        sheet.paste(picture, panels[name][:2])
    return sheet, panels

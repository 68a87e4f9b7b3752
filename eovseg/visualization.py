"""Drawing segmentation results: a colour per class, segment outlines, and the class name written on each segment.

    picture = draw_segments(image, result["segmentation"], result["segments_info"], class_names)
    legend = legend_entries(result["segments_info"], class_names)     # [(name, (r, g, b), count), ...]

`segments_info` is what the processor's post-processing returns (`id`, `label_id`, `score`); the map holds segment
ids, with ids that no segment describes (0 or -1) left undrawn. Segments of one class share its colour (so the legend
names a colour once); outlines keep instances of a class apart.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .vocabulary import display_name

__all__ = ["class_color", "draw_segments", "legend_entries"]


def class_color(label_id: int) -> tuple[int, int, int]:
    """A bright, stable RGB colour for a class index (golden-ratio hue steps, so neighbours differ)."""
    hue = (int(label_id) * 0.618033988749895 + 0.05) % 1.0
    value = 0.95 if int(label_id) % 2 == 0 else 0.8
    r, g, b = colorsys.hsv_to_rgb(hue, 0.8, value)
    return int(r * 255), int(g * 255), int(b * 255)


def _as_numpy_map(segmentation) -> np.ndarray:
    if hasattr(segmentation, "detach"):
        segmentation = segmentation.detach().cpu().numpy()
    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 2:
        raise ValueError(f"segmentation must be a (height, width) map of segment ids, got shape {segmentation.shape}.")
    return segmentation.astype(np.int64, copy=False)


def _label_anchor(mask: np.ndarray) -> tuple[int, int]:
    """The pixel of a segment farthest from its border (inside the segment even when it is not convex)."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return int(x), int(y)


def _font(image_height: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, min(24, image_height // 25)))


def draw_segments(
    image: Image.Image,
    segmentation,
    segments_info: Sequence[Mapping],
    class_names: Sequence[str],
    alpha: float = 0.5,
    labels: bool = True,
) -> Image.Image:
    """The image with each segment tinted in its class colour, outlined, and (with `labels`) named.

    Args:
        image: the input image (its size is the map's).
        segmentation: `(H, W)` segment ids (NumPy array or torch tensor).
        segments_info: `[{"id", "label_id", ...}]` of the segments to draw.
        class_names: the vocabulary (class entries; the first synonym is written).
        alpha: opacity of the tint.
        labels: write the class name on each segment.
    """
    ids = _as_numpy_map(segmentation)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if base.shape[:2] != ids.shape:
        raise ValueError(f"The image is {base.shape[0]}x{base.shape[1]} but the map is {ids.shape[0]}x{ids.shape[1]}.")
    out = base.copy()
    outline = np.zeros(ids.shape, dtype=bool)
    anchors = []
    for segment in segments_info:
        mask = ids == int(segment["id"])
        if not mask.any():
            continue
        color = np.array(class_color(segment["label_id"]), dtype=np.float32)
        out[mask] = (1 - alpha) * base[mask] + alpha * color
        outline |= mask & ~ndimage.binary_erosion(mask, border_value=1)
        anchors.append((_label_anchor(mask), display_name(class_names[int(segment["label_id"])])))
    out[outline] = 255.0
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if labels and anchors:
        _write_labels(picture, anchors)
    return picture


def _write_labels(picture: Image.Image, anchors) -> None:
    draw = ImageDraw.Draw(picture)
    font = _font(picture.height)
    for (x, y), text in anchors:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left, bottom - top
        # Keep the label box inside the picture.
        x0 = min(max(0, x - w // 2 - 2), max(0, picture.width - w - 4))
        y0 = min(max(0, y - h // 2 - 2), max(0, picture.height - h - 4))
        draw.rectangle((x0, y0, x0 + w + 3, y0 + h + 3), fill=(0, 0, 0))
        draw.text((x0 + 2 - left, y0 + 2 - top), text, fill=(255, 255, 255), font=font)


def legend_entries(segments_info: Sequence[Mapping], class_names: Sequence[str]) -> list[tuple[str, tuple, int]]:
    """The classes found, in vocabulary order: `(display name, colour, number of segments)`."""
    counts: dict[int, int] = {}
    for segment in segments_info:
        counts[int(segment["label_id"])] = counts.get(int(segment["label_id"]), 0) + 1
    return [(display_name(class_names[k]), class_color(k), counts[k]) for k in sorted(counts)]

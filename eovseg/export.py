"""Our results in the formats other tools read: COCO panoptic (PNG + segments), COCO RLE instances, `supervision`.

    from eovseg.export import panoptic_to_coco, instances_to_coco, to_detections

    png, segments = panoptic_to_coco(result, is_thing)          # RGB PNG (id = R + 256 G + 256^2 B) + segments_info
    png.save("0001.png")
    annotations = instances_to_coco(instance_result, image_id=1)  # COCO results: RLE masks, boxes, scores
    detections = to_detections(result, class_names)             # supervision.Detections (pip install supervision)

`result` is one element of the processor's `post_process_panoptic_segmentation` (`segmentation` map of segment
ids, `segments_info` with `id`, `label_id`, `score`); `instance_result` one of `post_process_instance_segmentation`
with `return_coco_annotation=True` (RLEs) or `return_binary_maps=True` (masks). Category ids are the label ids
(the class's index in the vocabulary) unless `category_ids` maps them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image
from transformers.image_transforms import id_to_rgb

from .visualization import _as_numpy_map

__all__ = ["instances_to_coco", "panoptic_to_coco", "to_detections"]


def _category(label_id: int, category_ids: Sequence[int] | Mapping[int, int] | None) -> int:
    return int(label_id) if category_ids is None else int(category_ids[int(label_id)])


def _segment_boxes(ids: np.ndarray, segment_ids: Sequence[int]) -> dict[int, tuple[int, list[int]]]:
    """Area and COCO box `[x, y, w, h]` of each segment id, from the map."""
    found = {}
    for segment_id in segment_ids:
        rows, cols = np.nonzero(ids == segment_id)
        if rows.size == 0:
            found[segment_id] = (0, [0, 0, 0, 0])
            continue
        x0, y0 = int(cols.min()), int(rows.min())
        found[segment_id] = (int(rows.size), [x0, y0, int(cols.max()) - x0 + 1, int(rows.max()) - y0 + 1])
    return found


def panoptic_to_coco(result: Mapping, is_thing: Sequence[bool],
                     category_ids: Sequence[int] | Mapping[int, int] | None = None) -> tuple[Image.Image, list[dict]]:
    """A panoptic result as COCO panoptic: the RGB-encoded PNG and its `segments_info`.

    Each segment gets `id`, `category_id`, `iscrowd` (0), `isthing`, `area` and `bbox` (from the map), and `score`.
    Map pixels whose id no segment describes (0 / -1) become 0 (unlabeled).
    """
    ids = _as_numpy_map(result["segmentation"])
    infos = list(result["segments_info"])
    described = np.array([int(s["id"]) for s in infos], dtype=np.int64)
    ids = np.where(np.isin(ids, described) & (ids > 0), ids, 0)
    boxes = _segment_boxes(ids, described.tolist())
    segments = []
    for info in infos:
        area, bbox = boxes[int(info["id"])]
        segments.append({
            "id": int(info["id"]),
            "category_id": _category(info["label_id"], category_ids),
            "iscrowd": 0,
            "isthing": int(bool(is_thing[int(info["label_id"])])),
            "area": area,
            "bbox": bbox,
            "score": round(float(info["score"]), 6),
        })
    return Image.fromarray(id_to_rgb(ids)), segments


def _bytes_rle(rle: Mapping) -> dict:
    """An RLE as pycocotools takes it (`counts` bytes), from the JSON form (`counts` str) or pycocotools' own."""
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def instances_to_coco(result: Mapping, image_id, category_ids: Sequence[int] | Mapping[int, int] | None = None) -> list[dict]:
    """An instance result as COCO detection results (`pycocotools`' `loadRes` reads them): one
    `{"image_id", "category_id", "segmentation": RLE, "bbox", "area", "score"}` per instance.

    `result["segmentation"]` is a list of RLEs (`return_coco_annotation=True`) or `(N, H, W)` binary masks
    (`return_binary_maps=True`).
    """
    from pycocotools import mask as mask_utils

    masks = result["segmentation"]
    if not isinstance(masks, list):
        masks = np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks).astype(np.uint8)
        if masks.ndim != 3:
            raise ValueError(f"instances_to_coco needs RLEs or (N, H, W) binary masks, got shape {masks.shape}.")
        masks = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
    annotations = []
    for rle, info in zip(masks, result["segments_info"]):
        encoded = _bytes_rle(rle)
        annotations.append({
            "image_id": image_id,
            "category_id": _category(info["label_id"], category_ids),
            "segmentation": {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")},
            "bbox": [round(float(v), 2) for v in mask_utils.toBbox(encoded)],
            "area": int(mask_utils.area(encoded)),
            "score": round(float(info["score"]), 6),
        })
    return annotations


def to_detections(result: Mapping, class_names: Sequence[str] | None = None):
    """A panoptic or instance result as `supervision.Detections` (masks, boxes, `confidence`, `class_id` = label
    id, and `data["class_name"]` when `class_names` is given). Needs `pip install supervision`.

    Panoptic results give one detection per segment; instance results (binary maps or RLEs) one per instance.
    """
    try:
        import supervision as sv
    except ImportError as err:
        raise ImportError("to_detections needs the supervision package: pip install supervision") from err
    from .vocabulary import display_name

    infos = list(result["segments_info"])
    segmentation = result["segmentation"]
    if isinstance(segmentation, list):
        from pycocotools import mask as mask_utils

        masks = np.stack([mask_utils.decode(_bytes_rle(r)) for r in segmentation]).astype(bool) if segmentation \
            else np.zeros((0, 0, 0), dtype=bool)
    else:
        array = np.asarray(segmentation.detach().cpu() if hasattr(segmentation, "detach") else segmentation)
        if array.ndim == 3:
            masks = array.astype(bool)
        else:
            masks = np.stack([array == int(s["id"]) for s in infos]) if infos else np.zeros((0,) + array.shape, bool)
    data = {}
    if class_names is not None:
        data["class_name"] = np.array([display_name(class_names[int(s["label_id"])]) for s in infos], dtype=object)
    return sv.Detections(
        xyxy=sv.mask_to_xyxy(masks).astype(np.float32) if len(masks) else np.zeros((0, 4), np.float32),
        mask=masks if len(masks) else None,
        confidence=np.array([float(s["score"]) for s in infos], dtype=np.float32),
        class_id=np.array([int(s["label_id"]) for s in infos], dtype=np.int64),
        data=data,
    )

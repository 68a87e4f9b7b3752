"""Export helpers (COCO panoptic, COCO RLE, supervision) and labelled overlays, on hand-made results."""

import numpy as np
import pytest
import torch
from PIL import Image

from eovseg.export import instances_to_coco, panoptic_to_coco, to_detections

H, W = 30, 40
CLASSES = ["cat, kitty", "dog", "grass"]


def panoptic_result():
    ids = torch.zeros(H, W, dtype=torch.int32)
    ids[2:10, 3:13] = 1      # a cat: rows 2..9, cols 3..12
    ids[12:20, 20:35] = 2    # a dog: rows 12..19, cols 20..34
    ids[22:, :] = 5          # grass: rows 22..29, every column
    ids[0, 0] = 9            # an id no segment describes
    infos = [{"id": 1, "label_id": 0, "score": 0.91234567, "was_fused": False},
             {"id": 2, "label_id": 1, "score": 0.5, "was_fused": False},
             {"id": 5, "label_id": 2, "score": 0.25, "was_fused": True}]
    return {"segmentation": ids, "segments_info": infos}


def test_panoptic_to_coco_png_and_segments():
    png, segments = panoptic_to_coco(panoptic_result(), is_thing=[True, True, False], category_ids=[10, 20, 30])
    rgb = np.asarray(png, dtype=np.int64)
    decoded = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    expected = panoptic_result()["segmentation"].numpy()
    expected[0, 0] = 0
    assert np.array_equal(decoded, expected)
    assert segments == [
        {"id": 1, "category_id": 10, "iscrowd": 0, "isthing": 1, "area": 80, "bbox": [3, 2, 10, 8], "score": 0.912346},
        {"id": 2, "category_id": 20, "iscrowd": 0, "isthing": 1, "area": 120, "bbox": [20, 12, 15, 8], "score": 0.5},
        {"id": 5, "category_id": 30, "iscrowd": 0, "isthing": 0, "area": 320, "bbox": [0, 22, 40, 8], "score": 0.25},
    ]


def binary_instances():
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, 2:10, 3:13] = True
    masks[1, 5:8, 0:4] = True
    return {"segmentation": masks, "segments_info": [{"id": 0, "label_id": 1, "score": 0.8},
                                                     {"id": 1, "label_id": 0, "score": 0.3}]}


def test_instances_to_coco_rle_round_trips():
    from pycocotools import mask as mask_utils

    from eovseg.processing.image_processing_eovseg import _binary_mask_to_coco_rle

    result = binary_instances()
    from_masks = instances_to_coco(result, image_id=7)
    as_rles = {"segmentation": [_binary_mask_to_coco_rle(m) for m in result["segmentation"]],
               "segments_info": result["segments_info"]}
    assert instances_to_coco(as_rles, image_id=7) == from_masks
    assert [(d["image_id"], d["category_id"], d["score"], d["area"], d["bbox"]) for d in from_masks] == [
        (7, 1, 0.8, 80, [3.0, 2.0, 10.0, 8.0]), (7, 0, 0.3, 12, [0.0, 5.0, 4.0, 3.0])]
    for detection, mask in zip(from_masks, result["segmentation"]):
        rle = {**detection["segmentation"], "counts": detection["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask.numpy())


@pytest.mark.filterwarnings("ignore:OpenCV")
def test_supervision_detections_from_panoptic_and_instance_results():
    detections = to_detections(panoptic_result(), CLASSES)
    assert len(detections) == 3
    assert detections.xyxy.tolist() == [[3, 2, 12, 9], [20, 12, 34, 19], [0, 22, 39, 29]]
    assert detections.class_id.tolist() == [0, 1, 2] and list(detections.data["class_name"]) == ["cat", "dog", "grass"]
    assert np.allclose(detections.confidence, [0.91234567, 0.5, 0.25])
    assert detections.mask.sum(axis=(1, 2)).tolist() == [80, 120, 320]
    instances = to_detections(binary_instances())
    assert instances.xyxy.tolist() == [[3, 2, 12, 9], [0, 5, 3, 7]] and instances.class_id.tolist() == [1, 0]

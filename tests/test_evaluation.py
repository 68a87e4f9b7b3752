"""eovseg.evaluation: panoptic quality (COCO panoptic definition), semantic mIoU & co., instance mask AP, the
`evaluate` modules and the evaluation runner. Scores are in percent."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from eovseg.evaluation import (
    METRIC_PATHS,
    InstanceSegmentationMetric,
    PanopticQuality,
    SemanticSegmentationMetric,
    mask_ap,
    mean_iou,
    panoptic_quality,
)


CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 7, "name": "sky", "isthing": 0},
    {"id": 9, "name": "grass", "isthing": 0},
]


def seg(segmentation, *segments):
    """A panoptic example: segments given as (id, category_id[, iscrowd])."""
    info = [{"id": s[0], "category_id": s[1], "iscrowd": s[2] if len(s) > 2 else 0} for s in segments]
    return {"segmentation": np.asarray(segmentation), "segments_info": info}


def pred(segmentation, *segments):
    """A prediction as post_process_panoptic_segmentation gives it: (id, label_id)."""
    info = [{"id": s[0], "label_id": s[1], "score": 0.9, "was_fused": False} for s in segments]
    return {"segmentation": torch.as_tensor(np.asarray(segmentation), dtype=torch.int32), "segments_info": info}


def id_to_rgb(ids):
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- panoptic quality


def test_perfect_match_is_100_percent():
    gt = seg([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3]], (1, 1), (2, 2), (3, 7))
    result = panoptic_quality([pred(gt["segmentation"], (1, 1), (2, 2), (3, 7))], [gt], CATEGORIES)
    for key in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert result[key] == pytest.approx(100.0)
    assert (result["N"], result["N_th"], result["N_st"]) == (3, 2, 1)
    assert result["per_class"][1] == {
        "name": "person", "isthing": True, "PQ": 100.0, "SQ": 100.0, "RQ": 100.0, "TP": 1, "FP": 0, "FN": 0,
    }
    # Classes that never occur are nan and left out of the means.
    assert math.isnan(result["per_class"][9]["PQ"])
    assert result["num_images"] == 1


def test_iou_of_exactly_one_half_does_not_match():
    gt = seg([[1, 1, 1, 1]], (1, 1))
    half = panoptic_quality([pred([[5, 5, 0, 0]], (5, 1))], [gt], CATEGORIES)
    assert half["per_class"][1]["TP"] == 0 and half["per_class"][1]["FP"] == 1 and half["per_class"][1]["FN"] == 1
    assert half["PQ"] == 0.0 and half["SQ"] == 0.0 and half["RQ"] == 0.0
    # Just above one half (3 / 5 > 0.5) matches.
    gt = seg([[1, 1, 1, 1, 0]], (1, 1))
    gt["segmentation"][0, 4] = 2
    gt["segments_info"].append({"id": 2, "category_id": 2, "iscrowd": 0})
    above = panoptic_quality([pred([[5, 5, 5, 0, 5]], (5, 1))], [gt], CATEGORIES)
    person = above["per_class"][1]
    assert (person["TP"], person["FP"], person["FN"]) == (1, 0, 0)
    assert person["SQ"] == pytest.approx(100 * 3 / 5)
    assert above["per_class"][2]["FN"] == 1


def test_match_needs_the_same_category():
    gt = seg([[1, 1], [1, 1]], (1, 1))
    result = panoptic_quality([pred([[4, 4], [4, 4]], (4, 2))], [gt], CATEGORIES)
    assert result["per_class"][1]["FN"] == 1 and result["per_class"][2]["FP"] == 1
    assert result["PQ"] == 0.0 and result["N"] == 2


def test_prediction_inside_crowd_of_its_class_is_not_a_false_positive():
    # Crowd region (id 9, person) on the right; a person prediction inside it is ignored ...
    gt = seg([[1, 1, 9, 9], [1, 1, 9, 9]], (1, 1), (9, 1, 1))
    inside = panoptic_quality([pred([[3, 3, 4, 4], [3, 3, 4, 4]], (3, 1), (4, 1))], [gt], CATEGORIES)
    person = inside["per_class"][1]
    assert (person["TP"], person["FP"], person["FN"]) == (1, 0, 0)
    assert inside["PQ"] == 100.0
    # ... a crowd segment is never a false negative, even without any prediction on it ...
    alone = panoptic_quality([pred([[3, 3, 0, 0], [3, 3, 0, 0]], (3, 1))], [gt], CATEGORIES)
    assert alone["per_class"][1]["FN"] == 0
    # ... but a car prediction there is a false positive (the crowd is of another class) ...
    other = panoptic_quality([pred([[3, 3, 4, 4], [3, 3, 4, 4]], (3, 1), (4, 2))], [gt], CATEGORIES)
    assert other["per_class"][2]["FP"] == 1
    # ... and so is a person prediction with exactly half of its area in the crowd (> 0.5 is needed).
    gt2 = seg([[1, 1, 9, 9], [1, 1, 9, 9], [2, 2, 2, 2]], (1, 1), (9, 1, 1), (2, 7))
    halfway = panoptic_quality(
        [pred([[3, 3, 0, 4], [3, 3, 0, 4], [5, 5, 4, 4]], (3, 1), (4, 1), (5, 7))], [gt2], CATEGORIES
    )
    assert halfway["per_class"][1]["FP"] == 1


def test_void_pixels_are_removed_from_the_union():
    # Ground truth: person on 4 pixels, void (0) on the other 4. The prediction covers all 8 pixels:
    # IoU = 4 / (8 + 4 - 4 - 4) = 1.
    gt = seg([[1, 1, 0, 0], [1, 1, 0, 0]], (1, 1))
    result = panoptic_quality([pred([[6, 6, 6, 6], [6, 6, 6, 6]], (6, 1))], [gt], CATEGORIES)
    assert result["per_class"][1]["TP"] == 1 and result["PQ"] == pytest.approx(100.0)
    # Unmatched predictions lying mostly on void are not false positives; half on void is not enough.
    gt = seg([[1, 1, 0, 0], [1, 1, 0, 0]], (1, 1))
    mostly_void = panoptic_quality([pred([[0, 0, 6, 6], [0, 6, 6, 6]], (6, 2))], [gt], CATEGORIES)
    assert mostly_void["per_class"][2]["FP"] == 0 and math.isnan(mostly_void["per_class"][2]["PQ"])
    half_void = panoptic_quality([pred([[0, 6, 6, 0], [0, 6, 6, 0]], (6, 2))], [gt], CATEGORIES)
    assert half_void["per_class"][2]["FP"] == 1


def test_ignored_category_is_void():
    # Category 2 is ignored: segment 8's pixels are void, so the person prediction over [1, 1, 8] has
    # IoU = 4 / (6 + 4 - 4 - 2) = 1 and the car is no false negative.
    gt = seg([[1, 1, 8], [1, 1, 8]], (1, 1), (8, 2))
    prediction = pred([[6, 6, 6], [6, 6, 6]], (6, 1))
    ignored = panoptic_quality([prediction], [gt], CATEGORIES, ignore_category_ids=[2])
    assert ignored["per_class"][1]["TP"] == 1 and ignored["PQ"] == pytest.approx(100.0) and ignored["N"] == 1
    # Not ignored: the car is missed and the person's IoU is 4 / 6.
    counted = panoptic_quality([prediction], [gt], CATEGORIES)
    assert counted["per_class"][2]["FN"] == 1
    assert counted["per_class"][1]["SQ"] == pytest.approx(100 * 4 / 6)


def test_quirk_unlisted_ground_truth_ids_are_not_void():
    # Id 5 is on the map but not in segments_info. pq_compute: its pixels stay in the prediction's area, so the
    # person's IoU is 3 / (5 + 3 - 3 - 0) = 0.6; clean: they are void, IoU = 3 / (5 + 3 - 3 - 2) = 1.
    gt = seg([[1, 1, 1, 5, 5]], (1, 1))
    prediction = pred([[6, 6, 6, 6, 6]], (6, 1))
    api = panoptic_quality([prediction], [gt], CATEGORIES)
    clean = panoptic_quality([prediction], [gt], CATEGORIES, conventions="clean")
    assert api["per_class"][1]["TP"] == 1 and api["per_class"][1]["SQ"] == pytest.approx(60.0)
    assert clean["per_class"][1]["TP"] == 1 and clean["per_class"][1]["SQ"] == pytest.approx(100.0)
    # A prediction lying on an unlisted id is a false positive for pq_compute, ignored in clean.
    stray = pred([[6, 6, 6, 7, 7]], (6, 1), (7, 2))
    assert panoptic_quality([stray], [gt], CATEGORIES)["per_class"][2]["FP"] == 1
    assert panoptic_quality([stray], [gt], CATEGORIES, conventions="clean")["per_class"][2]["FP"] == 0


def test_quirk_ground_truth_of_unknown_category_is_not_void():
    # Segment 5 has category 42, not evaluated: same numbers as an unlisted id, and category 42 is reported nowhere.
    gt = seg([[1, 1, 1, 5, 5]], (1, 1), (5, 42))
    prediction = pred([[6, 6, 6, 6, 6]], (6, 1))
    api = panoptic_quality([prediction], [gt], CATEGORIES)
    clean = panoptic_quality([prediction], [gt], CATEGORIES, conventions="clean")
    assert api["per_class"][1]["SQ"] == pytest.approx(60.0) and api["N"] == 1 and 42 not in api["per_class"]
    assert clean["per_class"][1]["SQ"] == pytest.approx(100.0) and clean["N"] == 1


def test_quirk_listed_ground_truth_without_pixels_is_a_false_negative():
    gt = seg([[1, 1], [1, 1]], (1, 1), (2, 2))  # segment 2 (car) is listed but has no pixel
    prediction = pred([[3, 3], [3, 3]], (3, 1), (4, 9))  # prediction 4 is listed without pixels: nothing
    api = panoptic_quality([prediction], [gt], CATEGORIES)
    assert (api["per_class"][2]["TP"], api["per_class"][2]["FN"]) == (0, 1) and api["per_class"][9]["FP"] == 0
    assert api["N"] == 2 and api["PQ"] == pytest.approx((100 + 0) / 2)
    clean = panoptic_quality([prediction], [gt], CATEGORIES, conventions="clean")
    assert clean["per_class"][2]["FN"] == 0 and clean["PQ"] == 100.0 and clean["N"] == 1


def test_quirk_only_the_last_listed_crowd_region_of_a_category_excuses():
    # Crowd regions 10 and 20 of person; the person prediction 5 has 4 of its 5 pixels on crowd 10 and matches
    # nothing; the car (segment 1) is missed.
    ids = [[10, 10, 10, 10, 20, 20, 1, 1]]
    prediction = pred([[5, 5, 5, 5, 0, 0, 0, 5]], (5, 1))
    crowd_10 = (10, 1, 1)
    crowd_20 = (20, 1, 1)
    car = (1, 2)
    empty_crowd = (30, 1, 1)  # listed crowd of person without pixels
    cases = {
        # segments_info order: (FP of person with pq_compute, FP of person in clean)
        (crowd_10, crowd_20, car): (1, 0),  # 20 is kept: 0 / 5 of the prediction on it
        (crowd_20, crowd_10, car): (0, 0),  # 10 is kept: 4 / 5 > 0.5
        (crowd_20, crowd_10, empty_crowd, car): (1, 0),  # the empty one is kept
    }
    for order, (api_fp, clean_fp) in cases.items():
        gt = seg(ids, *order)
        api = panoptic_quality([prediction], [gt], CATEGORIES)["per_class"]
        clean = panoptic_quality([prediction], [gt], CATEGORIES, conventions="clean")["per_class"]
        assert (api[1]["FP"], clean[1]["FP"]) == (api_fp, clean_fp), order
        assert api[1]["FN"] == clean[1]["FN"] == 0 and api[2]["FN"] == clean[2]["FN"] == 1


def test_quirk_ground_truth_area_field_is_used_in_the_union():
    # The person has 4 pixels but the JSON says area 6; the prediction covers 3 of them.
    # pq_compute: IoU = 3 / (3 + 6 - 3) = 0.5, no match; pixels: IoU = 3 / (3 + 4 - 3) = 0.75.
    gt = seg([[1, 1, 1, 1]], (1, 1))
    gt["segments_info"][0]["area"] = 6
    prediction = pred([[5, 5, 5, 0]], (5, 1))
    api = panoptic_quality([prediction], [gt], CATEGORIES)["per_class"][1]
    assert (api["TP"], api["FP"], api["FN"]) == (0, 1, 1)
    clean = panoptic_quality([prediction], [gt], CATEGORIES, conventions="clean")["per_class"][1]
    assert (clean["TP"], clean["SQ"]) == (1, pytest.approx(75.0))
    del gt["segments_info"][0]["area"]
    no_field = panoptic_quality([prediction], [gt], CATEGORIES)["per_class"][1]
    assert (no_field["TP"], no_field["SQ"]) == (1, pytest.approx(75.0))
    # An area too small for the union to be positive is refused (pq_compute divides by zero).
    gt["segments_info"][0]["area"] = 0
    with pytest.raises(ValueError, match="reference segment 1: its 'area' is too small"):
        panoptic_quality([pred([[5, 5, 5, 5]], (5, 1))], [gt], CATEGORIES)


def test_quirk_crowd_means_iscrowd_equal_to_one_and_id_zero():
    gt = seg([[1, 1, 2, 2]], (1, 1), (2, 2, 2))  # iscrowd = 2: an ordinary segment
    result = panoptic_quality([pred([[3, 3, 0, 0]], (3, 1))], [gt], CATEGORIES)
    assert result["per_class"][2]["FN"] == 1
    # A prediction may list id 0 (a segment like any other); the ground truth may not.
    zero = panoptic_quality([pred([[0, 0, 3, 3]], (0, 1), (3, 2))], [gt], CATEGORIES)
    assert zero["per_class"][1]["TP"] == 1 and zero["per_class"][2]["TP"] == 1
    with pytest.raises(ValueError, match="id 0 is void"):
        panoptic_quality([pred([[3, 3, 3, 3]], (3, 1))], [seg([[0, 0, 1, 1]], (0, 1))], CATEGORIES)
    with pytest.raises(ValueError, match="conventions"):
        PanopticQuality(CATEGORIES, conventions="detectron2")


def test_per_class_and_things_stuff_split():
    # person: TP with IoU 0.8 (4 / 5) and one FP; car: nothing; sky: one FN; grass: TP with IoU 1.
    gt = seg(
        [[1, 1, 1, 1, 7], [9, 9, 9, 9, 7]],
        (1, 1), (7, 7), (9, 9),
    )
    prediction = pred(
        [[3, 3, 3, 3, 3], [4, 4, 4, 4, 0]],
        (3, 1), (4, 9), (5, 1),
    )
    prediction["segmentation"][1, 4] = 5  # a one-pixel person on the sky: false positive
    gt["segmentation"][0, 4] = 7
    result = panoptic_quality([prediction], [gt], CATEGORIES)
    person, sky, grass = (result["per_class"][i] for i in (1, 7, 9))
    # person: IoU = 4 / (5 + 4 - 4) = 0.8
    assert (person["TP"], person["FP"], person["FN"]) == (1, 1, 0)
    assert person["SQ"] == pytest.approx(80.0)
    assert person["RQ"] == pytest.approx(100 / 1.5)
    assert person["PQ"] == pytest.approx(80 / 1.5)
    assert (sky["TP"], sky["FP"], sky["FN"]) == (0, 0, 1) and sky["PQ"] == 0.0 and sky["SQ"] == 0.0
    assert grass["PQ"] == pytest.approx(100.0)
    assert math.isnan(result["per_class"][2]["PQ"])
    assert (result["N"], result["N_th"], result["N_st"]) == (3, 1, 2)
    assert result["PQ_th"] == pytest.approx(80 / 1.5)
    assert result["PQ_st"] == pytest.approx(50.0)
    assert result["SQ_st"] == pytest.approx(50.0)
    assert result["PQ"] == pytest.approx((80 / 1.5 + 0 + 100) / 3)
    assert result["SQ"] == pytest.approx((80 + 0 + 100) / 3)
    assert result["RQ"] == pytest.approx((100 / 1.5 + 0 + 100) / 3)


def test_group_without_classes_is_nan():
    gt = seg([[1, 1]], (1, 1))
    result = panoptic_quality([pred([[2, 2]], (2, 1))], [gt], CATEGORIES)
    assert result["PQ_th"] == 100.0 and result["N_st"] == 0 and math.isnan(result["PQ_st"])


def _random_panoptic_pair(rng, height=24, width=32):
    """Random ground truth with void, crowd and stuff, and a noisy prediction of it."""
    cats = [c["id"] for c in CATEGORIES]
    blocks = rng.integers(0, 6, size=(height // 4, width // 4))
    gt_ids = np.kron(blocks, np.ones((4, 4), dtype=np.int64)) * 10
    segments = []
    for b in np.unique(blocks):
        if b == 0:
            continue  # void
        segments.append({"id": int(b) * 10, "category_id": int(rng.choice(cats)), "iscrowd": int(rng.random() < 0.2)})
    noise = rng.random((height, width))
    pred_ids = np.where(noise < 0.15, rng.integers(0, 6, size=(height, width)) * 10, gt_ids)
    pred_ids = np.where(noise > 0.95, 0, pred_ids) + 3
    by_id = {s["id"]: s["category_id"] for s in segments}
    pred_segments = [
        {"id": int(i), "label_id": by_id.get(int(i) - 3, int(rng.choice(cats))) if rng.random() < 0.85 else int(rng.choice(cats))}
        for i in np.unique(pred_ids)
    ]
    return {"segmentation": pred_ids, "segments_info": pred_segments}, {"segmentation": gt_ids, "segments_info": segments}


def _plain_pq_counts(prediction, reference, categories):
    """The definition written out pair by pair (slow), for the random cross-check below."""
    known = {c["id"] for c in categories}
    gt, pr = reference["segmentation"], prediction["segmentation"]
    gt_segments = {s["id"]: s for s in reference["segments_info"] if s["category_id"] in known and s["id"] != 0}
    void = ~np.isin(gt, list(gt_segments))
    pr_segments = {s["id"]: s["label_id"] for s in prediction["segments_info"] if (pr == s["id"]).any()}
    counts = {c: [0.0, 0, 0, 0] for c in known}  # iou, tp, fp, fn
    matched_gt, matched_pr = set(), set()
    for g, s in gt_segments.items():
        gmask = gt == g
        if s["iscrowd"] or not gmask.any():
            continue
        for p, c in pr_segments.items():
            if c != s["category_id"]:
                continue
            pmask = pr == p
            inter = (gmask & pmask).sum()
            union = (gmask | (pmask & ~void)).sum()
            if inter / union > 0.5:
                counts[c][0] += inter / union
                counts[c][1] += 1
                matched_gt.add(g)
                matched_pr.add(p)
    for g, s in gt_segments.items():
        if g not in matched_gt and not s["iscrowd"] and (gt == g).any():
            counts[s["category_id"]][3] += 1
    for p, c in pr_segments.items():
        if p in matched_pr:
            continue
        pmask = pr == p
        crowd = np.isin(gt, [g for g, s in gt_segments.items() if s["iscrowd"] and s["category_id"] == c])
        if (pmask & (void | crowd)).sum() / pmask.sum() > 0.5:
            continue
        counts[c][2] += 1
    return counts


def test_random_cases_agree_with_the_definition_written_out():
    rng = np.random.default_rng(0)
    metric = PanopticQuality(CATEGORIES, conventions="clean")  # the plain definition, without pq_compute's quirks
    totals = {c["id"]: [0.0, 0, 0, 0] for c in CATEGORIES}
    for _ in range(30):
        prediction, reference = _random_panoptic_pair(rng)
        metric.add(prediction, reference)
        for c, v in _plain_pq_counts(prediction, reference, CATEGORIES).items():
            totals[c] = [a + b for a, b in zip(totals[c], v)]
    for i, c in enumerate(CATEGORIES):
        iou, tp, fp, fn = totals[c["id"]]
        assert (metric.tp[i], metric.fp[i], metric.fn[i]) == (tp, fp, fn)
        assert metric.iou_sum[i] == pytest.approx(iou, abs=1e-9)
    assert metric.tp.sum() > 0 and metric.fp.sum() > 0 and metric.fn.sum() > 0


def test_streaming_equals_batch_and_merge():
    rng = np.random.default_rng(1)
    pairs = [_random_panoptic_pair(rng) for _ in range(12)]
    batch = panoptic_quality([p for p, _ in pairs], [r for _, r in pairs], CATEGORIES)
    streaming = PanopticQuality(CATEGORIES)
    for prediction, reference in pairs:
        streaming.add(prediction, reference)
    first, second = PanopticQuality(CATEGORIES), PanopticQuality(CATEGORIES)
    first.add_batch([p for p, _ in pairs[:5]], [r for _, r in pairs[:5]])
    second.add_batch([p for p, _ in pairs[5:]], [r for _, r in pairs[5:]])
    first.merge(second.state_dict())
    for result in (streaming.compute(), first.compute()):
        for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "SQ_th", "RQ_st", "N", "N_th", "N_st", "num_images"):
            assert result[key] == pytest.approx(batch[key], abs=1e-9)
        for cid in batch["per_class"]:
            assert result["per_class"][cid]["TP"] == batch["per_class"][cid]["TP"]
    streaming.reset()
    assert streaming.num_images == 0 and streaming.tp.sum() == 0


def test_input_formats_rgb_png_pil_and_label_mapping(tmp_path):
    ids = np.array([[1000, 1000, 70000], [1000, 0, 70000]])
    path = tmp_path / "gt.png"
    Image.fromarray(id_to_rgb(ids)).save(path)
    segments = [{"id": 1000, "category_id": 1, "iscrowd": 0}, {"id": 70000, "category_id": 7, "iscrowd": 0}]
    prediction = pred([[1, 1, 2], [1, 1, 2]], (1, 0), (2, 2))  # label ids 0 and 2 of the vocabulary
    mapping = [1, 2, 7, 9]  # label id -> category id
    for reference in (
        {"segmentation": str(path), "segments_info": segments},
        {"segmentation": Image.open(path), "segments_info": segments},
        {"panoptic_seg": id_to_rgb(ids), "segments_info": {"id": [1000, 70000], "category_id": [1, 7], "iscrowd": [0, 0]}},
        (torch.as_tensor(ids), segments),
    ):
        result = panoptic_quality([prediction], [reference], CATEGORIES, label_id_to_category_id=mapping)
        assert result["PQ"] == pytest.approx(100.0) and result["N"] == 2


def test_bad_inputs_are_reported():
    gt = seg([[1, 1]], (1, 1))
    with pytest.raises(ValueError, match="target_sizes"):
        panoptic_quality([pred([[1, 1, 1]], (1, 1))], [gt], CATEGORIES)
    with pytest.raises(ValueError, match="not one of the evaluated categories"):
        panoptic_quality([pred([[1, 1]], (1, 5))], [gt], CATEGORIES)
    with pytest.raises(ValueError, match="twice"):
        panoptic_quality([pred([[1, 1]], (1, 1), (1, 2))], [gt], CATEGORIES)
    with pytest.raises(KeyError, match="isthing"):
        PanopticQuality([{"id": 1, "name": "x"}])


def _block_outputs():
    """Model outputs of 5 confident queries, each owning a block of a 32 x 32 image (the masks are at 1/4 of it):
    labels 0 (person), 1 (car), 2 (sky, twice: fused) and 3 (grass)."""
    masks = torch.full((1, 5, 8, 8), -10.0)
    masks[0, 0, :4, :4] = 10.0
    masks[0, 1, :4, 4:] = 10.0
    masks[0, 2, 4:, :2] = 10.0
    masks[0, 3, 4:, 2:4] = 10.0
    masks[0, 4, 4:, 4:] = 10.0
    classes = torch.full((1, 5, 5), -5.0)
    for query, label in enumerate([0, 1, 2, 2, 3]):
        classes[0, query, label] = 5.0
    return SimpleNamespace(class_queries_logits=classes, masks_queries_logits=masks, image_sizes=torch.tensor([[32, 32]]))


def test_accepts_post_processed_outputs_directly():
    from eovseg.processing.image_processing_eovseg import EovSegImageProcessor

    processor = EovSegImageProcessor()
    results = processor.post_process_panoptic_segmentation(
        _block_outputs(), label_ids_to_fuse=[2, 3], target_sizes=[(20, 24)]
    )
    assert len(results[0]["segments_info"]) == 4 and any(s["was_fused"] for s in results[0]["segments_info"])
    # The same prediction as ground truth (label id i = category CATEGORIES[i]) gives PQ 100.
    segmentation = results[0]["segmentation"]
    reference = {
        "segmentation": segmentation.numpy(),
        "segments_info": [
            {"id": s["id"], "category_id": CATEGORIES[s["label_id"]]["id"], "iscrowd": 0} for s in results[0]["segments_info"]
        ],
    }
    result = panoptic_quality(results, [reference], CATEGORIES, label_id_to_category_id=[1, 2, 7, 9])
    assert result["PQ"] == pytest.approx(100.0) and result["N"] == 4
    # Against a ground truth where the car block is void, the car prediction is ignored, not a false positive.
    car = [s["id"] for s in results[0]["segments_info"] if s["label_id"] == 1]
    reference["segmentation"][np.isin(reference["segmentation"], car)] = 0
    reference["segments_info"] = [s for s in reference["segments_info"] if s["id"] not in car]
    result = panoptic_quality(results, [reference], CATEGORIES, label_id_to_category_id=[1, 2, 7, 9])
    assert result["per_class"][2]["FP"] == 0 and result["N"] == 3


# ---------------------------------------------------------------------------------------------- semantic


def _plain_semantic(predictions, references, num_labels, ignore_index, convention):
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    missed = np.zeros(num_labels, dtype=np.int64)  # reference pixels predicted as no valid class
    for p, r in zip(predictions, references):
        for pv, rv in zip(np.asarray(p).ravel(), np.asarray(r).ravel()):
            if rv == ignore_index:
                continue
            if 0 <= pv < num_labels:
                confusion[rv, pv] += 1
            else:
                missed[rv] += 1
    ious, accs, weights = [], [], []
    for c in range(num_labels):
        tp = confusion[c, c]
        gt = confusion[c].sum() + missed[c]
        pr = confusion[:, c].sum()
        if gt > 0 or (convention == "mmseg" and pr > 0):
            ious.append(tp / (gt + pr - tp))
            weights.append(gt)
        if gt > 0:
            accs.append(tp / gt)
    total = confusion.sum() + missed.sum()
    return {
        "mIoU": 100 * np.mean(ious),
        "fwIoU": 100 * np.sum(np.array(ious) * np.array(weights) / total),
        "mACC": 100 * np.mean(accs),
        "pACC": 100 * np.trace(confusion) / total,
    }


def test_miou_matches_a_plain_confusion_matrix():
    rng = np.random.default_rng(0)
    num_labels = 6
    predictions, references = [], []
    for _ in range(5):
        h, w = rng.integers(5, 20, size=2)
        reference = rng.integers(0, num_labels - 1, size=(h, w))  # the last class never in the reference
        reference[rng.random((h, w)) < 0.2] = 255
        prediction = np.where(rng.random((h, w)) < 0.6, reference, rng.integers(-1, num_labels + 1, size=(h, w)))
        prediction[reference == 255] = rng.integers(0, num_labels)
        predictions.append(torch.as_tensor(prediction))
        references.append(reference)
    for convention in ("detectron2", "mmseg"):
        expected = _plain_semantic(predictions, references, num_labels, 255, convention)
        result = mean_iou(predictions, references, num_labels=num_labels, convention=convention)
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, abs=1e-9), (convention, key)
    assert result["mIoU"] < mean_iou(predictions, references, num_labels=num_labels)["mIoU"]  # the last class
    streaming = SemanticSegmentationMetric(num_labels, convention="mmseg")
    for p, r in zip(predictions, references):
        streaming.add(p, r)
    assert streaming.compute()["mIoU"] == pytest.approx(result["mIoU"])
    assert result["num_images"] == 5


def test_miou_perfect_ignore_and_undefined_classes():
    reference = np.array([[0, 0, 1], [255, 1, 1]])
    result = mean_iou([np.array([[0, 0, 1], [2, 1, 1]])], [reference], num_labels=3)
    assert result["mIoU"] == 100.0 and result["pACC"] == 100.0 and result["mACC"] == 100.0
    assert math.isnan(result["per_class"][2]["IoU"]) and math.isnan(result["per_class"][2]["ACC"])
    # reduce_labels: 0 becomes ignored, the other labels move down by one.
    reduced = mean_iou([np.array([[5, 0, 1]])], [np.array([[0, 1, 2]])], num_labels=2, reduce_labels=True)
    assert reduced["mIoU"] == 100.0
    with pytest.raises(ValueError, match="outside"):
        mean_iou([np.zeros((2, 2))], [np.full((2, 2), 7)], num_labels=3)


def test_miou_conventions_differ_only_on_predicted_only_classes():
    # Class 0: 2 reference pixels, 1 predicted right: IoU 1 / 2. Class 1 is predicted once, never in the reference.
    # Class 2 is nowhere. The 255 pixel is skipped, whatever is predicted there.
    reference, prediction = np.array([[0, 0, 255]]), np.array([[0, 1, 2]])
    detectron2 = mean_iou([prediction], [reference], num_labels=3)
    mmseg = mean_iou([prediction], [reference], num_labels=3, convention="mmseg")
    assert detectron2["mIoU"] == pytest.approx(50.0) and math.isnan(detectron2["per_class"][1]["IoU"])
    assert mmseg["mIoU"] == pytest.approx(25.0) and mmseg["per_class"][1]["IoU"] == 0.0
    for result in (detectron2, mmseg):
        assert math.isnan(result["per_class"][2]["IoU"])
        assert result["pACC"] == pytest.approx(50.0) and result["fwIoU"] == pytest.approx(50.0)
    # reduce_labels (mmseg's reduce_zero_label): 0 -> ignored, 255 stays ignored, 1 -> 0.
    reduced = mean_iou([np.array([[1, 0, 1]])], [np.array([[0, 1, 255]])], num_labels=2, reduce_labels=True)
    assert reduced["mIoU"] == pytest.approx(100.0) and reduced["pACC"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------- instance


def _random_instances(rng, height=40, width=48, n_gt=5, n_dt=7):
    gt_info = []
    ids = np.zeros((height, width), dtype=np.int64)
    for k in range(1, n_gt + 1):
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        ids[y : y + rng.integers(4, 16), x : x + rng.integers(4, 16)] = k
    for k in np.unique(ids):
        if k == 0:
            continue
        gt_info.append({"id": int(k), "category_id": int(rng.choice([1, 2, 7])), "iscrowd": int(rng.random() < 0.15)})
    masks, dt_info = [], []
    label_of = {1: 0, 2: 1, 7: 2}
    for j in range(n_dt):
        target = gt_info[rng.integers(0, len(gt_info))] if gt_info and rng.random() < 0.8 else None
        if target is None:
            mask = rng.random((height, width)) < 0.05
            label = int(rng.integers(0, 3))
        else:
            shift = rng.integers(-2, 3, size=2)
            mask = np.roll(ids == target["id"], tuple(shift), axis=(0, 1))
            label = label_of[target["category_id"]] if rng.random() < 0.8 else int(rng.integers(0, 3))
        masks.append(mask)
        dt_info.append({"id": j, "label_id": label, "score": float(rng.random()), "was_fused": False})
    return {"segmentation": np.stack(masks), "segments_info": dt_info}, {"segmentation": ids, "segments_info": gt_info}


def test_mask_ap_matches_cocoeval_called_directly():
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    label_to_category = [1, 2, 7, 9]
    pairs = [_random_instances(rng) for _ in range(6)]
    result = mask_ap([p for p, _ in pairs], [r for _, r in pairs], CATEGORIES, label_id_to_category_id=label_to_category)

    things = [c for c in CATEGORIES if c["isthing"]]
    images, annotations, detections = [], [], []
    for image_id, (prediction, reference) in enumerate(pairs, start=1):
        ids = reference["segmentation"]
        images.append({"id": image_id, "height": ids.shape[0], "width": ids.shape[1]})
        for s in reference["segments_info"]:
            if s["category_id"] not in (1, 2):
                continue
            rle = mask_utils.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": s["category_id"], "segmentation": rle,
                "area": float(mask_utils.area(rle)), "bbox": list(mask_utils.toBbox(rle)), "iscrowd": s["iscrowd"],
            })
        for mask, s in zip(prediction["segmentation"], prediction["segments_info"]):
            category = label_to_category[s["label_id"]]
            if category not in (1, 2):
                continue
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            detections.append({"image_id": image_id, "category_id": category, "segmentation": rle, "score": s["score"]})
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": annotations, "categories": things}
    coco_gt.createIndex()
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    for i, key in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        expected = 100 * evaluator.stats[i]
        if evaluator.stats[i] < 0:
            assert math.isnan(result[key])
        else:
            assert result[key] == pytest.approx(expected, abs=1e-9), key
    assert 0 < result["AP50"] < 100
    assert set(result["per_class"]) == {1, 2}


def test_mask_ap_input_forms_agree():
    """Bool stacks, RLE lists and id maps of the same (non-overlapping) instances score the same."""
    rng = np.random.default_rng(3)
    _, reference = _random_instances(rng)
    ids = reference["segmentation"]
    info = [{"id": s["id"], "label_id": s["category_id"], "score": 0.5 + 0.01 * s["id"]} for s in reference["segments_info"]]
    stack = np.stack([ids == s["id"] for s in info])
    from pycocotools import mask as mask_utils

    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in stack]
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    forms = [
        {"segmentation": torch.as_tensor(stack), "segments_info": info},
        {"segmentation": rles, "segments_info": info},
        {"segmentation": ids, "segments_info": info},
    ]
    scores = [mask_ap([form], [reference], CATEGORIES)["AP"] for form in forms]
    assert scores[0] == pytest.approx(100.0) or math.isnan(scores[0])
    assert scores[0] == pytest.approx(scores[1]) and scores[1] == pytest.approx(scores[2])


def test_mask_ap_streaming_and_no_detections():
    rng = np.random.default_rng(4)
    pairs = [_random_instances(rng) for _ in range(3)]
    metric = InstanceSegmentationMetric(CATEGORIES, label_id_to_category_id=[1, 2, 7, 9])
    for prediction, reference in pairs:
        metric.add(prediction, reference)
    assert metric.compute()["AP"] == pytest.approx(
        mask_ap([p for p, _ in pairs], [r for _, r in pairs], CATEGORIES, label_id_to_category_id=[1, 2, 7, 9])["AP"]
    )
    empty = mask_ap([{"segmentation": [], "segments_info": []}], [pairs[0][1]], CATEGORIES)
    assert empty["num_detections"] == 0 and (empty["AP"] == 0.0 or math.isnan(empty["AP"]))


# ---------------------------------------------------------------------------------------------- evaluate modules


def test_evaluate_load_from_local_paths():
    evaluate = pytest.importorskip("evaluate")
    rng = np.random.default_rng(5)
    pairs = [_random_panoptic_pair(rng) for _ in range(4)]
    expected = panoptic_quality([p for p, _ in pairs], [r for _, r in pairs], CATEGORIES)

    module = evaluate.load(METRIC_PATHS["panoptic_quality"], categories=CATEGORIES)
    for prediction, reference in pairs:
        module.add(prediction=prediction, reference=reference)
    streamed = module.compute()
    assert streamed["PQ"] == pytest.approx(expected["PQ"]) and streamed["N"] == expected["N"]
    # The script file works too, with the options given to compute().
    by_file = evaluate.load(METRIC_PATHS["panoptic_quality"] + "/panoptic_quality.py")
    once = by_file.compute(predictions=[p for p, _ in pairs], references=[r for _, r in pairs], categories=CATEGORIES)
    assert once["PQ"] == pytest.approx(expected["PQ"])

    miou = evaluate.load(METRIC_PATHS["mean_iou"], num_labels=3)
    miou.add_batch(predictions=[np.array([[0, 1], [2, 2]])], references=[np.array([[0, 1], [1, 255]])])
    assert miou.compute()["mIoU"] == pytest.approx(75.0)  # (1 + 1/2) / 2: class 2 is only predicted
    miou = evaluate.load(METRIC_PATHS["mean_iou"], num_labels=3, convention="mmseg")
    miou.add_batch(predictions=[np.array([[0, 1], [2, 2]])], references=[np.array([[0, 1], [1, 255]])])
    assert miou.compute()["mIoU"] == pytest.approx(50.0)  # (1 + 1/2 + 0) / 3

    ap = evaluate.load(METRIC_PATHS["mask_ap"], categories=CATEGORIES)
    prediction, reference = _random_instances(rng)
    assert ap.compute(predictions=[prediction], references=[reference])["AP"] == pytest.approx(
        mask_ap([prediction], [reference], CATEGORIES)["AP"], nan_ok=True
    )
    with pytest.raises(ValueError, match="categories"):
        evaluate.load(METRIC_PATHS["panoptic_quality"]).add(prediction=pairs[0][0], reference=pairs[0][1])


# ---------------------------------------------------------------------------------------------- runner


def _tiny_dataset(num_images=3):
    import datasets

    rng = np.random.default_rng(0)
    rows = {"image": [], "label": [], "segments_info": []}
    for i in range(num_images):
        h, w = 40 + 8 * i, 48
        ids = np.zeros((h, w), np.int64)
        ids[:, : w // 2] = 5
        ids[: h // 2, w // 2 :] = 9
        ids[h // 2 :, w // 2 :] = 300
        rows["image"].append(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
        rows["label"].append(Image.fromarray(id_to_rgb(ids)))
        rows["segments_info"].append(
            [{"id": 5, "category_id": 4, "iscrowd": 0}, {"id": 9, "category_id": 0, "iscrowd": 0},
             {"id": 300, "category_id": 1, "iscrowd": 1}]
        )
    segment = {"id": datasets.Value("int64"), "category_id": datasets.Value("int64"), "iscrowd": datasets.Value("int64")}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image(), "segments_info": [segment]})
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture(scope="module")
def tiny_model():
    from eovseg import EovSegConfig, EovSegForPanopticSegmentation
    from eovseg.processing import EovSegProcessor

    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny")
    model = EovSegForPanopticSegmentation(config)
    processor = EovSegProcessor.from_config(config, size={"shortest_edge": 32, "longest_edge": 64})
    return model, processor


def test_evaluate_model_runs_all_tasks(tiny_model):
    from eovseg.evaluation import evaluate_model, format_results

    model, processor = tiny_model
    model.train()
    results = evaluate_model(model, processor, _tiny_dataset(2), "all", batch_size=2, progress=False)
    assert model.training  # mode restored
    assert set(results) == {"panoptic", "semantic", "instance"}
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "N", "per_class"):
        assert key in results["panoptic"]
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert 0.0 <= results["semantic"][key] <= 100.0
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert key in results["instance"]
    assert all(r["num_images"] == 2 for r in results.values())
    assert "Things" in format_results(results["panoptic"], "panoptic")
    # A plain list of rows works too (columns found from the first row), and ignored categories leave the
    # vocabulary.
    rows = list(_tiny_dataset(3))
    single = evaluate_model(
        model, processor, rows, "semantic", max_samples=1, ignore_category_ids=[7], progress=False
    )
    assert "mIoU" in single and single["num_images"] == 1 and len(single["per_class"]) == 7
    # A semantic data set: class maps (category ids, 255 unlabeled) in the `label` column.
    semantic_rows = [
        {"image": np.zeros((24, 40, 3), np.uint8), "label": np.where(np.arange(40) < 20, 4, 255)[None].repeat(24, 0)}
    ]
    semantic = evaluate_model(
        model, processor, semantic_rows, "semantic", columns={"semantic": "label"}, progress=False
    )
    assert semantic["num_images"] == 1 and not math.isnan(semantic["per_class"][4]["ACC"])


def test_batch_size_does_not_change_the_scores_of_mixed_sizes():
    """Rows of different processed sizes never share a forward pass (padded to another's size, an image's result
    would change): the bundled demo model's scores with `batch_size=4` are those of `batch_size=1` on toy-world
    scenes stretched to three processed sizes."""
    from eovseg import EovSegForPanopticSegmentation, EovSegProcessor
    from eovseg.demo import default_model_path
    from eovseg.evaluation import evaluate_model
    from eovseg.inputs import rgb_to_id
    from eovseg.synthetic import make_toy_world_dataset
    from test_predict import same_json

    model = EovSegForPanopticSegmentation.from_pretrained(default_model_path()).eval()
    processor = EovSegProcessor.from_pretrained(default_model_path())  # shortest edge 128
    rows = []
    for row, (width, height) in zip(make_toy_world_dataset(4, 128, seed=5), [(128, 128), (176, 128), (128, 160),
                                                                              (176, 128)]):
        label = row["label"].resize((width, height), Image.NEAREST)
        ids = rgb_to_id(np.asarray(label))
        segments = [dict(s, area=int((ids == s["id"]).sum())) for s in row["segments_info"]]
        rows.append({"image": row["image"].resize((width, height), Image.BILINEAR), "label": label,
                     "segments_info": [s for s in segments if s["area"]]})
    sizes = [(row["image"].height, row["image"].width) for row in rows]
    assert len(processor.image_processor.group_by_processed_size(sizes)) == 3
    one, four = (evaluate_model(model, processor, rows, "panoptic", batch_size=b, progress=False) for b in (1, 4))

    assert one["PQ"] > 30
    assert same_json(four, one, abs_tol=1e-9, rel_tol=1e-6)


# An "oracle" model that reads the segments off the image colours: with it the runner must score 100, which pins
# its wiring (vocabulary order, label id -> category id, stuff fusion, output sizes, crowd and void handling).
ORACLE_CATEGORIES = [
    {"id": 11, "name": "person", "isthing": 1},
    {"id": 22, "name": "car", "isthing": 1},
    {"id": 33, "name": "sky", "isthing": 0},
    {"id": 44, "name": "grass", "isthing": 0},
]
# colour -> label index (position in ORACLE_CATEGORIES); two sky colours make two queries fused into one segment.
ORACLE_COLOURS = {(200, 0, 0): 0, (210, 0, 0): 0, (0, 200, 0): 1, (0, 0, 200): 2, (0, 0, 230): 2, (0, 120, 0): 3}


class _OracleModel(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.mean = torch.tensor(config.pixel_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(config.pixel_std).view(1, 3, 1, 1)

    def get_text_embeddings(self, input_ids):
        return torch.zeros(input_ids.shape[0] // 14, 4)

    def forward(self, pixel_values, pixel_mask=None, text_embeddings=None, synonym_counts=None, class_seen_mask=None):
        assert len(synonym_counts) == len(ORACLE_CATEGORIES)
        colours = (pixel_values * self.std + self.mean).round()[:, :, 2::4, 2::4]  # one pixel per 4 x 4 cell
        batch, num_queries, num_classes = pixel_values.shape[0], len(ORACLE_COLOURS) + 2, len(ORACLE_CATEGORIES)
        masks = torch.full((batch, num_queries, colours.shape[-2], colours.shape[-1]), -10.0)
        classes = torch.full((batch, num_queries, num_classes + 1), -10.0)
        classes[:, :, num_classes] = 10.0  # unused queries: void
        for q, (colour, label) in enumerate(ORACLE_COLOURS.items()):
            hit = (colours == torch.tensor(colour, dtype=colours.dtype).view(1, 3, 1, 1)).all(1)
            masks[:, q][hit] = 10.0
            classes[:, q, label], classes[:, q, num_classes] = 10.0, -10.0
        rows = pixel_mask.any(2).sum(1)
        cols = pixel_mask.any(1).sum(1)
        return SimpleNamespace(
            class_queries_logits=classes, masks_queries_logits=masks, image_sizes=torch.stack([rows, cols], 1)
        )


def _oracle_rows():
    """Three 32 x 32 images of four 8-pixel horizontal stripes of colour (the masks' bilinear upsampling is then
    exact: no corners); ground truth from the same stripes, with void and a crowd region."""
    layouts = [
        [(200, 0, 0), (0, 0, 200), None, (0, 0, 230)],  # person, sky, void, sky (fused with the first)
        [(0, 200, 0), (210, 0, 0), (0, 120, 0), (200, 0, 0)],  # car, person, grass, person
        [(0, 200, 0), (0, 120, 0), None, (0, 0, 200)],  # car (crowd), grass, void, sky
    ]
    rows = []
    for index, layout in enumerate(layouts):
        image = np.zeros((32, 32, 3), np.uint8)
        ids = np.zeros((32, 32), np.int64)
        segments, next_id, stuff_ids = [], 100, {}
        for r, colour in enumerate(layout):
            if colour is None:
                continue  # void: black, id 0
            image[8 * r : 8 * r + 8] = colour
            category = ORACLE_CATEGORIES[ORACLE_COLOURS[colour]]
            if not category["isthing"] and category["id"] in stuff_ids:
                segment_id = stuff_ids[category["id"]]
            else:
                next_id += 7
                segment_id = next_id
                segments.append({"id": segment_id, "category_id": category["id"], "iscrowd": 0})
                if not category["isthing"]:
                    stuff_ids[category["id"]] = segment_id
            ids[8 * r : 8 * r + 8] = segment_id
        if index == 2:
            segments[0]["iscrowd"] = 1  # the car: a crowd region, its prediction is then neither TP nor FP
        rows.append({"image": Image.fromarray(image), "label": Image.fromarray(id_to_rgb(ids)), "segments_info": segments})
    return rows


def test_evaluate_model_scores_an_oracle_100():
    from eovseg import EovSegConfig
    from eovseg.evaluation import evaluate_model
    from eovseg.processing import EovSegProcessor

    config = EovSegConfig.from_variant("tiny")
    processor = EovSegProcessor.from_config(config, do_resize=False)  # keeps the blocks on the 4 x 4 mask grid
    results = evaluate_model(
        _OracleModel(config), processor, _oracle_rows(), "all", categories=ORACLE_CATEGORIES, batch_size=2,
        progress=False,
    )
    panoptic, semantic, instance = results["panoptic"], results["semantic"], results["instance"]
    assert panoptic["PQ"] == pytest.approx(100.0) and (panoptic["N_th"], panoptic["N_st"]) == (2, 2)
    assert [panoptic["per_class"][c]["TP"] for c in (11, 22, 33, 44)] == [3, 1, 2, 2]  # the sky queries fused
    assert panoptic["per_class"][22]["FP"] == 0 and panoptic["per_class"][22]["FN"] == 0  # a car was a crowd
    assert semantic["mIoU"] == pytest.approx(100.0) and semantic["pACC"] == pytest.approx(100.0)
    assert instance["AP"] == pytest.approx(100.0) and set(instance["per_class"]) == {11, 22}


def test_command_line_writes_json(tmp_path, capsys):
    from eovseg.evaluation.evaluate import main

    from eovseg import EovSegConfig
    from eovseg.data_sources import categories_from_config

    _tiny_dataset(2).save_to_disk(str(tmp_path / "data"))
    # the data set stores no categories: the command asks for them (ids 0 .. K-1 of the tiny preset's vocabulary)
    (tmp_path / "categories.json").write_text(json.dumps(categories_from_config(EovSegConfig.from_variant("tiny"))))
    output = tmp_path / "out" / "results.json"
    assert main([
        "--model", "random:tiny", "--dataset", str(tmp_path / "data"), "--task", "panoptic", "--batch_size", "2", "--shortest_edge", "32", "--longest_edge", "64",
        "--vocabulary", str(tmp_path / "categories.json"), "--output", str(output), "--no_progress",
    ]) == 0
    printed = capsys.readouterr().out
    assert "PQ" in printed and "Things" in printed
    document = json.loads(output.read_text())
    assert document["units"] == "percent"
    assert {"PQ", "SQ", "RQ", "per_class"} <= set(document["results"]["panoptic"])


def test_synthetic_dataset_evaluation(tiny_model):
    synthetic = pytest.importorskip("eovseg.synthetic")
    from eovseg.evaluation import evaluate_model
    from eovseg.evaluation.evaluate import dataset_categories, load_eval_dataset

    model, processor = tiny_model
    dataset = load_eval_dataset("synthetic", num_synthetic=3)
    assert dataset_categories(dataset) == synthetic.synthetic_categories()
    results = evaluate_model(model, processor, dataset, "panoptic", batch_size=2, progress=False)
    assert {"PQ", "SQ", "RQ", "PQ_th", "PQ_st", "per_class"} <= set(results) and results["num_images"] == 3
    # The data set's own categories are the vocabulary (circle, ..., ground), not the model's default one.
    assert [c["name"] for c in results["per_class"].values()] == synthetic.SYNTHETIC_CLASS_NAMES


def _write_coco_panoptic(root, rows, categories):
    """A COCO-panoptic folder as distributed: `val/` images, `panoptic_val/` PNGs, `panoptic_val.json`."""
    (root / "val").mkdir(parents=True)
    (root / "panoptic_val").mkdir()
    images, annotations = [], []
    for i, row in enumerate(rows):
        row["image"].save(root / "val" / f"{i:06d}.png")  # lossless, so that the oracle reads its colours
        row["label"].save(root / "panoptic_val" / f"{i:06d}.png")
        images.append({"id": 40 + i, "file_name": f"{i:06d}.png", "height": 32, "width": 32})
        annotations.append({"image_id": 40 + i, "file_name": f"{i:06d}.png", "segments_info": row["segments_info"]})
    document = {"images": images, "annotations": annotations, "categories": categories}
    (root / "panoptic_val.json").write_text(json.dumps(document))
    return root / "panoptic_val.json"


def test_coco_panoptic_and_label_map_folders_on_disk(tmp_path):
    from eovseg import EovSegConfig
    from eovseg.evaluation import evaluate_model
    from eovseg.evaluation.evaluate import load_eval_dataset
    from eovseg.evaluation.folders import CocoPanopticFolder, SemanticLabelFolder
    from eovseg.processing import EovSegProcessor

    config = EovSegConfig.from_variant("tiny")
    processor = EovSegProcessor.from_config(config, do_resize=False)
    rows = _oracle_rows()
    json_file = _write_coco_panoptic(tmp_path / "coco", rows, ORACLE_CATEGORIES)
    folder = load_eval_dataset(str(json_file))  # PNG folder and image folder found from the JSON
    assert isinstance(folder, CocoPanopticFolder) and len(folder) == 3
    on_disk = evaluate_model(_OracleModel(config), processor, folder, "all", batch_size=2, progress=False)
    in_memory = evaluate_model(
        _OracleModel(config), processor, rows, "all", categories=ORACLE_CATEGORIES, batch_size=2, progress=False
    )
    assert on_disk["panoptic"]["PQ"] == pytest.approx(100.0)  # the categories come from the JSON
    assert json.dumps(on_disk, sort_keys=True) == json.dumps(in_memory, sort_keys=True)

    # Semantic label maps holding vocabulary indices (as detectron2's preparation scripts write them), 255 void.
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i, row in enumerate(rows):
        ids = np.asarray(row["label"]).astype(np.int64) @ np.array([1, 256, 65536])
        by_id = {s["id"]: s["category_id"] for s in row["segments_info"]}
        index = {c["id"]: i for i, c in enumerate(ORACLE_CATEGORIES)}
        labels = np.vectorize(lambda v: index[by_id[v]] if v in by_id else 255)(ids).astype(np.uint8)
        row["image"].save(tmp_path / "images" / f"img{i}.png")
        Image.fromarray(labels).save(tmp_path / "labels" / f"img{i}.png")
    semantic_folder = load_eval_dataset(str(tmp_path / "images"), label_root=str(tmp_path / "labels"))
    assert isinstance(semantic_folder, SemanticLabelFolder) and len(semantic_folder) == 3
    semantic = evaluate_model(
        _OracleModel(config), processor, semantic_folder, "semantic", categories=ORACLE_CATEGORIES,
        semantic_labels="index", progress=False,
    )
    assert semantic["mIoU"] == pytest.approx(100.0) and semantic["num_images"] == 3


def test_two_processes_give_the_numbers_of_one(tmp_path):
    # torchrun on CPU: one gloo group (as training), each process a contiguous half of the data set; the merged
    # results equal one process's exactly, printed and written once.
    import os
    import subprocess
    import sys

    from eovseg import EovSegConfig, EovSegForPanopticSegmentation
    from eovseg.evaluation.evaluate import run
    from eovseg.processing import EovSegProcessor

    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny")
    EovSegForPanopticSegmentation(config).save_pretrained(tmp_path / "model")
    EovSegProcessor.from_config(config, size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--dataset", "synthetic", "--num_synthetic", "5", "--task", "all",
            "--threshold", "0.0", "--no_progress"]
    one = run([*args, "--output", str(tmp_path / "one.json")])
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "eovseg.evaluation.evaluate", *args, "--output", str(tmp_path / "two.json")]
    launched = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("[panoptic] 5 images") == 1 and launched.stdout.count("Results written") == 1
    two = json.loads((tmp_path / "two.json").read_text())["results"]
    assert two == json.loads((tmp_path / "one.json").read_text())["results"]
    assert sum(r["TP"] + r["FP"] for r in one["panoptic"]["per_class"].values()) > 0
    assert one["instance"]["num_detections"] > 0


def test_panopticapi_comparison_refuses_without_a_checkout(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_pq_with_panopticapi.py"
    env = {k: v for k, v in os.environ.items() if k != "PANOPTICAPI_PATH"}
    missing = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode != 0 and "give the path of a panopticapi checkout" in missing.stderr
    wrong = subprocess.run([sys.executable, str(script), "--panopticapi", str(tmp_path)], capture_output=True,
                           text=True, env=env, timeout=120)
    assert wrong.returncode != 0 and "does not hold panopticapi/evaluation.py" in wrong.stderr

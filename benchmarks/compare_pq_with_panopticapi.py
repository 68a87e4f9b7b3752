"""Compare `eovseg.evaluation.PanopticQuality` with the COCO panoptic API's `pq_compute` on random cases.

    python benchmarks/compare_pq_with_panopticapi.py --panopticapi /path/to/panopticapi [--images 600] [--seed 0]

(or set `PANOPTICAPI_PATH`). The path is a checkout of https://github.com/cocodataset/panopticapi (the folder
holding the `panopticapi` package); it is imported from there and never installed or copied into this repository.

The script writes a random COCO-panoptic ground truth and prediction to a temporary folder (RGB-encoded PNGs + JSON,
as pq_compute reads them), runs `pq_compute` on them and `PanopticQuality` on the same files, and compares
all / things / stuff and per-class PQ, SQ, RQ (to 1e-9, in percent) and N. The images cover every case where the
API's conventions could differ from a plain reading of the definition: several crowd regions of one category
(with or without pixels), ground-truth segments listed without pixels, ground-truth ids missing from
segments_info, ground-truth categories missing from the category list, `area` fields that disagree with the
pixels, a listed predicted id 0, `iscrowd` = 2, predictions of categories absent from the ground truth, void, tiny images
(1x1 and up) and images with hundreds of segments. Inputs that `pq_compute` refuses (predicted ids missing from
segments_info, listed predictions without pixels) are checked separately: the API must raise, and ours must equal
the API on the same prediction without the offending ids.

It also prints how many per-class results the `conventions="clean"` rules change, to show the cases are hit.
Exit status 0 when everything agrees. Single-threaded numpy; pq_compute itself uses one process per core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile

import numpy as np
from PIL import Image


CATEGORIES = [{"id": i, "name": f"class{i}", "isthing": int(i % 3 != 0)} for i in (1, 2, 3, 4, 5, 6, 7, 9, 12, 15)]
GT_CATEGORIES = [1, 2, 3, 4, 5, 6, 7, 9]  # 12 and 15 only ever appear in predictions
UNKNOWN_CATEGORY = 40  # in the ground truth, not in the category list


def import_pq_compute(path: str | None):
    path = path or os.environ.get("PANOPTICAPI_PATH")
    if not path:
        sys.exit(
            "compare_pq_with_panopticapi: give the path of a panopticapi checkout (--panopticapi PATH or "
            "PANOPTICAPI_PATH); it is not a dependency of eovseg."
        )
    if not os.path.isfile(os.path.join(path, "panopticapi", "evaluation.py")):
        sys.exit(f"compare_pq_with_panopticapi: {path} does not hold panopticapi/evaluation.py.")
    sys.path.insert(0, os.path.abspath(path))
    from panopticapi.evaluation import pq_compute

    return pq_compute


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- random cases


def _random_regions(rng, height, width, count):
    """A (H, W) map of region indices 0..count-1 from random rectangles painted over each other."""
    regions = np.zeros((height, width), dtype=np.int64)
    for r in range(1, count):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        h = rng.integers(1, max(2, height // 2 + 1))
        w = rng.integers(1, max(2, width // 2 + 1))
        regions[y0 : y0 + h, x0 : x0 + w] = r
    return regions


def random_ground_truth(rng, height, width, many):
    count = int(rng.integers(60, 300)) if many else int(rng.integers(2, 14))
    regions = _random_regions(rng, height, width, count)
    # Large ids exercise all three RGB channels; region 0 stays void (id 0) in most images.
    ids = rng.choice(np.arange(1, 2**24 - 1), size=count, replace=False)
    if rng.random() < 0.7:
        ids[0] = 0
    gt_map = ids[regions]
    crowd_category = int(rng.choice(GT_CATEGORIES))
    segments = []
    for r, seg_id in enumerate(ids):
        area = int((regions == r).sum())
        if seg_id == 0:
            continue  # void, never listed (a listed id 0 is refused: see PanopticQuality)
        if area and rng.random() < 0.08:
            continue  # an id of the map missing from segments_info
        if rng.random() < 0.04:
            category = UNKNOWN_CATEGORY
        elif rng.random() < 0.3:
            category = crowd_category  # several segments (crowd or not) of one category
        else:
            category = int(rng.choice(GT_CATEGORIES))
        crowd = int(rng.random() < 0.3) if category == crowd_category else int(rng.random() < 0.05)
        if rng.random() < 0.02:
            crowd = 2
        json_area = area
        if area and rng.random() < 0.1:
            json_area = max(1, area + int(rng.integers(-area // 2, area + 2)))
        segments.append({"id": int(seg_id), "category_id": category, "iscrowd": crowd, "area": json_area, "bbox": [0, 0, 1, 1]})
    # Listed segments without a pixel, crowd or not.
    for _ in range(int(rng.integers(0, 3))):
        segments.append(
            {"id": int(rng.integers(2**24 - 5000, 2**24 - 1)), "category_id": int(rng.choice(GT_CATEGORIES)),
             "iscrowd": int(rng.random() < 0.4), "area": int(rng.integers(0, 3)), "bbox": [0, 0, 0, 0]}
        )
    by_id = {}
    for s in segments:
        by_id.setdefault(s["id"], s)  # the random extra ids could repeat
    order = list(by_id.values())
    rng.shuffle(order)
    return gt_map, order


def random_prediction(rng, gt_map, gt_segments):
    """A noisy copy of the ground truth: shifted, re-labelled, merged, split and with random blobs."""
    height, width = gt_map.shape
    uniq, inverse = np.unique(gt_map, return_inverse=True)
    inverse = inverse.reshape(gt_map.shape)
    pred_ids = rng.choice(np.arange(1, 2**24 - 1), size=uniq.size, replace=False)
    pred_regions = inverse.copy()
    noise = rng.random(gt_map.shape)
    flip = noise < rng.uniform(0.0, 0.35)
    pred_regions[flip] = rng.integers(0, uniq.size, size=int(flip.sum()))
    if rng.random() < 0.5:
        pred_regions = np.roll(pred_regions, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
    pred_map = pred_ids[pred_regions]
    blobs = _random_regions(rng, height, width, int(rng.integers(1, 5)))
    extra = rng.choice(np.arange(1, 2**24 - 1), size=4, replace=False)
    pred_map = np.where(blobs > 0, extra[np.minimum(blobs, 3)], pred_map)
    if rng.random() < 0.3:
        pred_map[rng.random(gt_map.shape) < 0.1] = 0  # unlabelled prediction pixels
    category_of_gt = {s["id"]: s["category_id"] for s in gt_segments}
    known = [c["id"] for c in CATEGORIES]
    segments = []
    for seg_id in np.unique(pred_map):
        if seg_id == 0:
            if rng.random() < 0.05:
                segments.append({"id": 0, "category_id": int(rng.choice(known))})  # a listed id 0
            continue
        where = np.flatnonzero(pred_ids == seg_id)
        guess = category_of_gt.get(int(uniq[where[0]])) if where.size else None
        if guess not in known or rng.random() < 0.2:
            guess = int(rng.choice(known))
        segments.append({"id": int(seg_id), "category_id": guess})
    rng.shuffle(segments)
    return pred_map, segments


def random_case(rng, index):
    kind = rng.random()
    if kind < 0.08:
        height, width = int(rng.integers(1, 4)), int(rng.integers(1, 4))  # tiny images, 1x1 included
    elif kind < 0.15:
        height, width = int(rng.integers(48, 96)), int(rng.integers(48, 96))
    else:
        height, width = int(rng.integers(4, 40)), int(rng.integers(4, 48))
    gt_map, gt_segments = random_ground_truth(rng, height, width, many=0.08 <= kind < 0.15)
    pred_map, pred_segments = random_prediction(rng, gt_map, gt_segments)
    return gt_map, gt_segments, pred_map, pred_segments


# ---------------------------------------------------------------------------------------------- running both


@contextlib.contextmanager
def quiet_fds():
    """Silence stdout and stderr at the file-descriptor level (pq_compute prints progress, and the tracebacks of
    the errors expected below, from its worker processes)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def write_coco_panoptic(folder, name, cases, side):
    """`folder/name.json` and `folder/name/*.png` from [(map, segments_info)]; returns the JSON path."""
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    annotations = []
    for image_id, (id_map, segments) in enumerate(cases):
        file_name = f"{image_id:06d}.png"
        Image.fromarray(id_to_rgb(id_map)).save(os.path.join(folder, name, file_name))
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})
    document = {"annotations": annotations, "categories": CATEGORIES if side == "gt" else []}
    document["images"] = [{"id": i, "file_name": f"{i:06d}.jpg"} for i in range(len(cases))]
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(document, f)
    return path


def ours(folder, gt_json, pred_json, conventions="panopticapi"):
    from eovseg.evaluation import PanopticQuality

    with open(gt_json) as f:
        gt = json.load(f)
    with open(pred_json) as f:
        pred = {a["image_id"]: a for a in json.load(f)["annotations"]}
    metric = PanopticQuality(gt["categories"], conventions=conventions)
    for annotation in gt["annotations"]:
        p = pred[annotation["image_id"]]
        metric.add(
            {"segmentation": os.path.join(folder, "pred", p["file_name"]), "segments_info": p["segments_info"]},
            {"segmentation": os.path.join(folder, "gt", annotation["file_name"]), "segments_info": annotation["segments_info"]},
        )
    return metric.compute()


def differences(mine, theirs, tolerance=1e-9):
    """[(what, ours, pq_compute's)] where the two disagree (pq_compute's fractions scaled to percent)."""
    found = []
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            a, b = mine[key.upper() + suffix], 100 * theirs[name][key]
            if not abs(a - b) <= tolerance:
                found.append((f"{name} {key}", a, b))
        if mine["N" + suffix] != theirs[name]["n"]:
            found.append((f"{name} n", mine["N" + suffix], theirs[name]["n"]))
    for cat_id, values in theirs["per_class"].items():
        row = mine["per_class"][int(cat_id)]
        counted = row["TP"] + row["FP"] + row["FN"] > 0
        for key in ("pq", "sq", "rq"):
            a, b = row[key.upper()], 100 * values[key]
            if counted and not abs(a - b) <= tolerance or not counted and not (math.isnan(a) and b == 0):
                found.append((f"class {cat_id} {key}", a, b))
    return found


def case_counts(cases):
    """How many images hold each kind of case the comparison is meant to cover."""
    counts = dict.fromkeys(
        ("several crowd regions of one category", "listed ground truth without pixels", "ground-truth ids not listed",
         "ground-truth category not in the list", "area field differs from the pixels", "predicted id 0 listed",
         "iscrowd 2", "void pixels", "tiny image (< 4x4)", "more than 50 segments",
         "predicted category absent from the ground truth"), 0)
    for gt_map, gt_segments, pred_map, pred_segments in cases:
        present = dict(zip(*np.unique(gt_map, return_counts=True)))
        crowd = [s["category_id"] for s in gt_segments if s["iscrowd"] == 1]
        listed = {s["id"] for s in gt_segments}
        gt_categories = {s["category_id"] for s in gt_segments}
        flags = {
            "several crowd regions of one category": len(crowd) > len(set(crowd)),
            "listed ground truth without pixels": any(s["id"] not in present for s in gt_segments),
            "ground-truth ids not listed": any(i != 0 and i not in listed for i in present),
            "ground-truth category not in the list": UNKNOWN_CATEGORY in gt_categories,
            "area field differs from the pixels": any(s["area"] != present.get(s["id"], 0) for s in gt_segments),
            "predicted id 0 listed": any(s["id"] == 0 for s in pred_segments),
            "iscrowd 2": any(s["iscrowd"] == 2 for s in gt_segments),
            "void pixels": 0 in present,
            "tiny image (< 4x4)": max(gt_map.shape) < 4,
            "more than 50 segments": len(gt_segments) > 50,
            "predicted category absent from the ground truth": any(
                s["category_id"] not in gt_categories for s in pred_segments
            ),
        }
        for name, flag in flags.items():
            counts[name] += int(flag)
    return counts


def max_difference(mine, theirs):
    values = [abs(mine[k.upper() + s] - 100 * theirs[n][k]) for n, s in (("All", ""), ("Things", "_th"), ("Stuff", "_st")) for k in ("pq", "sq", "rq")]
    for cat_id, v in theirs["per_class"].items():
        row = mine["per_class"][int(cat_id)]
        if row["TP"] + row["FP"] + row["FN"]:
            values += [abs(row[k.upper()] - 100 * v[k]) for k in ("pq", "sq", "rq")]
    return max(values)


def compare_refused_inputs(pq_compute, rng, count):
    """Predictions the API refuses: it must raise; ours must equal the API once the offending ids are removed."""
    failures = 0
    for i in range(count):
        gt_map, gt_segments, pred_map, pred_segments = random_case(rng, i)
        listed = [s for s in pred_segments if s["id"] != 0]
        if not listed:
            continue
        bad_segments = list(pred_segments)
        if i % 2 == 0:
            dropped = listed[0]["id"]  # on the map, not in segments_info
            bad_segments = [s for s in pred_segments if s["id"] != dropped]
            clean_map = np.where(pred_map == dropped, 0, pred_map)
            clean_segments = bad_segments
        else:
            bad_segments = bad_segments + [{"id": 2**24 - 1, "category_id": CATEGORIES[0]["id"]}]  # no pixel
            clean_map, clean_segments = pred_map, pred_segments
        with tempfile.TemporaryDirectory() as folder:
            gt_json = write_coco_panoptic(folder, "gt", [(gt_map, gt_segments)], "gt")
            pred_json = write_coco_panoptic(folder, "pred", [(pred_map, bad_segments)], "pred")
            try:
                with quiet_fds():
                    pq_compute(gt_json, pred_json)
                raised = False
            except KeyError:
                raised = True
            mine = ours(folder, gt_json, pred_json)
            write_coco_panoptic(folder, "pred", [(clean_map, clean_segments)], "pred")
            try:
                with quiet_fds():
                    theirs = pq_compute(gt_json, pred_json)
            except ZeroDivisionError:
                continue  # a group with no class: nothing to compare
            same = not differences(mine, theirs)
        if not raised or not same:
            failures += 1
            print(f"refused input {i}: pq_compute raised={raised}, ours equal to the cleaned input={same}")
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--panopticapi", default=None, help="panopticapi checkout (or PANOPTICAPI_PATH)")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--refused", type=int, default=20, help="single-image checks of inputs pq_compute refuses")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pq_compute = import_pq_compute(args.panopticapi)
    rng = np.random.default_rng(args.seed)
    cases = [random_case(rng, i) for i in range(args.images)]
    with tempfile.TemporaryDirectory() as folder:
        gt_json = write_coco_panoptic(folder, "gt", [(c[0], c[1]) for c in cases], "gt")
        pred_json = write_coco_panoptic(folder, "pred", [(c[2], c[3]) for c in cases], "pred")
        with quiet_fds():
            theirs = pq_compute(gt_json, pred_json)
        mine = ours(folder, gt_json, pred_json)
        clean = ours(folder, gt_json, pred_json, conventions="clean")
    found = differences(mine, theirs)
    changed_by_clean = {w.split(" ")[1] for w, _, _ in differences(clean, theirs) if w.startswith("class")}
    segments = sum(len(c[1]) + len(c[3]) for c in cases)
    print(f"{args.images} images, {segments} listed segments (seed {args.seed})")
    print(f"pq_compute: PQ {100 * theirs['All']['pq']:.6f}  SQ {100 * theirs['All']['sq']:.6f}  RQ {100 * theirs['All']['rq']:.6f}")
    print(f"eovseg    : PQ {mine['PQ']:.6f}  SQ {mine['SQ']:.6f}  RQ {mine['RQ']:.6f}")
    print(f"largest difference over all/things/stuff and per-class PQ/SQ/RQ (percent): {max_difference(mine, theirs):.3g}")
    print("images per case: " + ", ".join(f"{k} {v}" for k, v in case_counts(cases).items()))
    tp, fp, fn = (sum(r[k] for r in mine["per_class"].values()) for k in ("TP", "FP", "FN"))
    print(f"TP {tp}, FP {fp}, FN {fn}")
    print(f"classes whose numbers the 'clean' conventions change: {len(changed_by_clean)} of {len(CATEGORIES)}")
    for what, a, b in found:
        print(f"  DIFFERENT {what}: eovseg {a!r}  pq_compute {b!r}")
    refused = compare_refused_inputs(pq_compute, rng, args.refused)
    print(f"inputs pq_compute refuses: {args.refused} checked, {refused} failures")
    ok = not found and not refused
    print("AGREE" if ok else "DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

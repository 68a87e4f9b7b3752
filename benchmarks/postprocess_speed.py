"""Speed of EovSegImageProcessor.post_process_panoptic_segmentation against a plain re-statement of the
original EOV-Seg panoptic post-processing (upsample all masks, crop, resize, then one Python iteration per
query), on the same random-but-realistic model outputs.

    python benchmarks/postprocess_speed.py [--repeats 7] [--seed 0] [--void-fraction 0.7] [--sweep] [--threads N]

Default setting: one 640x960 input, 100 queries, 150 classes (80 things), masks 160x240, output 400x600,
about 30 of the 100 queries predicting a class rather than void (`--void-fraction 0.7`). Prints both times
(median over interleaved repeats), their ratio, and whether the two segmentations are identical. `--sweep`
repeats the measurement for several void fractions: the more queries survive the keep filter, the more
full-resolution masks both methods must compute (exactly the same bilinear resizing), and the smaller the gap.
On a busy machine `--threads 1` gives steadier numbers than the default thread count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eovseg.processing.image_processing_eovseg import EovSegImageProcessor  # noqa: E402


def make_outputs(seed: int, num_queries: int, num_classes: int, mask_hw: tuple[int, int], void_fraction: float):
    """Mask logits shaped like a trained model's: a partition of the image into regions (several queries per
    region, as duplicates and partial covers), plus round blobs on top of it, plus noise. Class logits: one
    dominant class per query, void for about `void_fraction` of the queries."""
    gen = torch.Generator().manual_seed(seed)
    h, w = mask_hw
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    num_regions = 24
    centres = torch.rand(num_regions, 2, generator=gen) * torch.tensor([h, w])
    dist = (yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2
    region = dist.argmin(0)
    masks = torch.empty(num_queries, h, w)
    for q in range(num_queries):
        if q % 3 == 2:  # a blob
            cy, cx = (torch.rand(2, generator=gen) * torch.tensor([h, w])).tolist()
            ry, rx = (torch.rand(2, generator=gen) * torch.tensor([h / 3, w / 3]) + 4).tolist()
            inside = 1 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2
            logits = 8 * inside.clamp(min=-1.5)
        else:  # a region of the partition
            r = q % num_regions
            soft = F.avg_pool2d((region == r).float()[None, None], 7, 1, 3, count_include_pad=False)[0, 0]
            logits = 10 * (2 * soft - 1)
        masks[q] = logits + torch.randn(h, w, generator=gen) * 1.5
    class_logits = torch.randn(num_queries, num_classes + 1, generator=gen)
    dominant = torch.randint(0, num_classes, (num_queries,), generator=gen)
    class_logits[torch.arange(num_queries), dominant] += 6
    void = torch.rand(num_queries, generator=gen) < void_fraction
    class_logits[void, -1] += 9
    # The model reports log-probabilities (void last), as the original feeds to its post-processing.
    class_logits = torch.log(class_logits.softmax(-1) + 1e-8)
    return class_logits[None], masks[None]


def reference_panoptic(class_logits, mask_logits, image_size, target_size, thing_ids, threshold=0.0, overlap=0.8):
    """The original algorithm, written plainly: every query is resized to full resolution and goes through the
    sigmoid, then a Python loop over the kept queries decides the segments one by one from full-resolution
    comparisons."""
    padded = (mask_logits.shape[-2] * 4, mask_logits.shape[-1] * 4)
    masks = F.interpolate(mask_logits, size=padded, mode="bilinear", align_corners=False)[0]
    masks = masks[:, : image_size[0], : image_size[1]]
    masks = F.interpolate(masks[None], size=target_size, mode="bilinear", align_corners=False)[0]
    probs = F.softmax(class_logits[0], dim=-1)
    scores, labels = probs.max(-1)
    num_classes = probs.shape[-1] - 1
    keep = labels.ne(num_classes) & (scores > threshold)
    mask_probs = masks.sigmoid()[keep]
    scores, labels = scores[keep], labels[keep]
    segmentation = torch.zeros(target_size, dtype=torch.int32)
    segments = []
    if mask_probs.shape[0] == 0:
        return segmentation, segments
    winner = (scores.view(-1, 1, 1) * mask_probs).argmax(0)
    next_id = 0
    stuff_ids: dict[int, int] = {}
    for k in range(labels.shape[0]):
        label = int(labels[k])
        is_thing = label in thing_ids
        # the three areas are evaluated as the original does, each from the full-resolution maps
        won_area = (winner == k).sum().item()
        own_area = (mask_probs[k] >= 0.5).sum().item()
        segment = (winner == k) & (mask_probs[k] >= 0.5)
        if won_area == 0 or own_area == 0 or segment.sum().item() == 0:
            continue
        if won_area / own_area < overlap:
            continue
        if not is_thing and label in stuff_ids:
            segmentation[segment] = stuff_ids[label]
            continue
        next_id += 1
        if not is_thing:
            stuff_ids[label] = next_id
        segmentation[segment] = next_id
        segments.append({"id": next_id, "label_id": label, "isthing": is_thing})
    return segmentation, segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--void-fraction", type=float, default=0.7)
    parser.add_argument("--sweep", action="store_true", help="also time void fractions 0.9, 0.7, 0.5, 0.3, 0.1, 0.0")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ok = measure(args, args.void_fraction, verbose=True)
    if args.sweep:
        print("\nvoid fraction | kept queries | reference ms | ours ms | speed-up | identical")
        for void_fraction in (0.9, 0.7, 0.5, 0.3, 0.1, 0.0):
            ok &= measure(args, void_fraction, verbose=False)
    if not ok:
        sys.exit(1)


def measure(args, void_fraction: float, verbose: bool) -> bool:
    image_size, target_size = (640, 960), (400, 600)
    mask_hw = (image_size[0] // 4, image_size[1] // 4)
    class_logits, mask_logits = make_outputs(args.seed, args.queries, args.classes, mask_hw, void_fraction)
    thing_ids = set(range(min(80, args.classes)))
    stuff_ids = [c for c in range(args.classes) if c not in thing_ids]
    outputs = SimpleNamespace(
        class_queries_logits=class_logits,
        masks_queries_logits=mask_logits,
        image_sizes=torch.tensor([image_size], dtype=torch.int64),
    )
    processor = EovSegImageProcessor()

    def run_ours():
        return processor.post_process_panoptic_segmentation(
            outputs, label_ids_to_fuse=stuff_ids, target_sizes=[target_size]
        )[0]

    def run_reference():
        return reference_panoptic(class_logits, mask_logits, image_size, target_size, thing_ids)

    run_ours(), run_reference()  # warm-up
    ours_times, ref_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref_seg, ref_info = run_reference()
        t1 = time.perf_counter()
        ours = run_ours()
        t2 = time.perf_counter()
        ref_times.append(t1 - t0)
        ours_times.append(t2 - t1)

    identical = torch.equal(ours["segmentation"], ref_seg) and [
        (s["id"], s["label_id"], not s["was_fused"]) for s in ours["segments_info"]
    ] == [(s["id"], s["label_id"], s["isthing"]) for s in ref_info]
    kept = int((class_logits[0].softmax(-1).argmax(-1) != args.classes).sum())
    t_ref, t_ours = statistics.median(ref_times), statistics.median(ours_times)
    if verbose:
        print(
            f"input {image_size[0]}x{image_size[1]}, {args.queries} queries ({kept} not void), {args.classes} "
            f"classes, masks {mask_hw[0]}x{mask_hw[1]}, output {target_size[0]}x{target_size[1]}, "
            f"{torch.get_num_threads()} threads, {len(ref_info)} segments"
        )
        print(f"reference (original algorithm): {t_ref * 1000:8.1f} ms  (median of {args.repeats})")
        print(f"EovSegImageProcessor          : {t_ours * 1000:8.1f} ms  (median of {args.repeats})")
        print(f"speed-up                      : {t_ref / t_ours:8.2f}x")
        print(f"identical segmentation        : {identical}")
    else:
        print(
            f"{void_fraction:13.1f} | {kept:12d} | {t_ref * 1000:12.1f} | {t_ours * 1000:7.1f} | "
            f"{t_ref / t_ours:7.2f}x | {identical}"
        )
    return identical


if __name__ == "__main__":
    main()

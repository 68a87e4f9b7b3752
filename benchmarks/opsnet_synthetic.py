"""OPSNet's options on synthetic data (CPU, one thread): Mask Filtering and Decoupled Supervision.

    python benchmarks/opsnet_synthetic.py --part mf      # IoU head: Spearman(pred, true IoU), PQ per score mode
    python benchmarks/opsnet_synthetic.py --part ds      # two shape classes as image-level labels only, with/without DS
    python benchmarks/opsnet_synthetic.py --part mf --budget_seconds 120 --eval_images 40   # a quicker run

The model and recipe are those of `benchmarks/learn_synthetic.py` (the tiny preset, random frozen CLIP towers, the
original's optimizer with a larger learning rate, learning-rate steps placed by elapsed time).

* `mf`: trains with `mask_filtering=True` for `--budget_seconds`, then on `--eval_images` held-out images matches
  the last stage's predictions to the ground truth with the training matcher and reports Spearman's rank correlation
  of the predicted IoU with the true IoU of the matched masks (target >= 0.6; all queries, unmatched at IoU 0, are
  reported too), then PQ with the `class`, `class_iou` and `iou` score modes, and with Embedding Modulation.
* `ds`: removes the circle and triangle segments from the panoptic training data (their pixels unlabeled; the
  panoptic vocabulary is rectangle, sky, ground), and trains twice for `--budget_seconds` each: panoptic only, and
  with Decoupled Supervision on image-level data (other images, every class present as a label, the five-class
  image-level vocabulary, half of every batch). Both have the IoU head. It reports held-out PQ on circle and
  triangle with the five-class vocabulary (in-vocabulary classifier: the random CLIP branch is switched off).

Each part is meant to finish in 15 minutes (`ds` trains twice: give it half the budget per run). Prints a JSON line
of the figures at the end of each part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import learn_synthetic  # noqa: E402
from learn_synthetic import CLASS_NAMES, train_with_budget  # noqa: E402

HIDDEN = ["red circle", "yellow triangle"]  # the classes Decoupled Supervision learns from image-level labels only


def build_parser() -> argparse.ArgumentParser:
    # learn_synthetic's options (model size, data, recipe), with a shorter budget per training run
    p = learn_synthetic.build_parser()
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(budget_seconds=480.0)
    p.add_argument("--part", choices=["mf", "ds", "all"], default="all")
    p.add_argument("--image_label_ratio", type=float, default=0.5)
    p.add_argument("--supervision_iou_threshold", type=float, default=None,
                   help="Decoupled Supervision's IoU threshold (default: the configuration's)")
    return p


def make_model(args, vocabulary, **overrides):
    from eovseg import EovSegConfig, EovSegForPanopticSegmentation, EovSegProcessor
    from eovseg.training import SYNTHETIC_IS_THING

    config = EovSegConfig.from_variant(
        "tiny", num_proposals=args.num_proposals, hidden_dim=args.hidden_dim, decoder_ffn_dim=2 * args.hidden_dim,
        train_num_points=args.train_num_points,
        vocabulary=list(CLASS_NAMES), is_thing=list(SYNTHETIC_IS_THING), train_vocabulary=list(vocabulary),
        mask_filtering=True, **overrides,
    )
    model = EovSegForPanopticSegmentation(config)
    processor = EovSegProcessor.from_config(config)
    return model, processor


def panoptic_rows(args, num_images, seed, drop_classes=()):
    """Synthetic panoptic rows; segments of `drop_classes` (category ids) removed, their pixels left unlabeled."""
    from eovseg.training import make_synthetic_panoptic_dataset

    rows = make_synthetic_panoptic_dataset(num_images, args.image_size, args.image_size, seed=seed,
                                           class_names=CLASS_NAMES)
    if not drop_classes:
        return rows
    keep = [i for i in range(len(CLASS_NAMES)) if i not in drop_classes]
    relabel = {old: new for new, old in enumerate(keep)}

    def drop(row):
        segments = [s for s in row["segments_info"] if s["category_id"] not in drop_classes]
        return {"segments_info": [{**s, "category_id": relabel[s["category_id"]]} for s in segments]}

    return rows.map(drop)


def train(args, model, processor, rows, vocabulary, image_label_rows=None):
    import torch

    from eovseg.training import (
        EovSegDataCollator,
        ImageLabelDataset,
        LargeScaleJitter,
        MixedSegmentationDataset,
        PanopticSegmentationDataset,
    )

    torch.manual_seed(args.seed)
    size = args.image_size
    jitter = LargeScaleJitter(size, args.min_scale, args.max_scale)
    dataset = PanopticSegmentationDataset(rows, jitter, seed=args.seed, shuffle=True)
    image_label_names = None
    if image_label_rows is not None:
        image_label_names = list(CLASS_NAMES)
        image_level = ImageLabelDataset(image_label_rows, image_label_names, jitter, seed=args.seed, shuffle=True)
        dataset = MixedSegmentationDataset(dataset, image_level, args.image_label_ratio)
    collator = EovSegDataCollator.from_processor(processor, vocabulary, config=model.config,
                                                 image_label_names=image_label_names)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collator, drop_last=True)
    steps, seconds = train_with_budget(model, loader, dataset, args.learning_rate, args.budget_seconds, args.log_every)
    print(f"trained {steps} steps in {seconds:.0f}s", flush=True)
    return steps, seconds


def iou_correlation(model, processor, rows):
    """Spearman's correlation of predicted and true IoU: (matched queries only, all queries)."""
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    from eovseg.training import EovSegDataCollator, PanopticSegmentationDataset

    dataset = PanopticSegmentationDataset(rows)
    collator = EovSegDataCollator.from_processor(processor, list(CLASS_NAMES), config=model.config)
    criterion_model = model.eval()
    from eovseg.loss_eovseg import EovSegLoss

    criterion = EovSegLoss(model.config)
    matched_pred, matched_true, all_pred, all_true = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 8):
            batch = collator([dataset[i] for i in range(start, min(len(dataset), start + 8))])
            outputs = criterion_model(**{k: v for k, v in batch.items() if k not in ("mask_labels", "class_labels")})
            class_logits = outputs.stage_class_queries_logits[-1]
            masks = outputs.masks_queries_logits
            indices = criterion.match(class_logits, masks, batch["mask_labels"], batch["class_labels"])
            true = model.mask_filtering.iou_targets(masks, batch["mask_labels"], indices)
            for image, (pred_index, _) in enumerate(indices):
                matched_pred += outputs.iou_scores[image, pred_index].tolist()
                matched_true += true[image, pred_index].tolist()
            all_pred += outputs.iou_scores.flatten().tolist()
            all_true += true.flatten().tolist()
    matched = spearmanr(np.array(matched_pred), np.array(matched_true)).statistic
    everything = spearmanr(np.array(all_pred), np.array(all_true)).statistic
    print(f"matched masks: {len(matched_pred)}, mean true IoU {np.mean(matched_true):.3f}, "
          f"mean predicted IoU {np.mean(matched_pred):.3f}")
    return float(matched), float(everything)


def evaluate(model, processor, rows, **kwargs):
    from eovseg.evaluation import evaluate_model
    from eovseg.training import synthetic_categories

    return evaluate_model(model, processor, rows, "panoptic", categories=synthetic_categories(CLASS_NAMES),
                          batch_size=8, progress=False, **kwargs)


def part_mask_filtering(args) -> dict:
    print("== Mask Filtering ==", flush=True)
    model, processor = make_model(args, CLASS_NAMES)
    train(args, model, processor, panoptic_rows(args, args.train_images, args.seed), list(CLASS_NAMES))
    eval_rows = panoptic_rows(args, args.eval_images, args.seed + 1)
    matched, everything = iou_correlation(model, processor, eval_rows)
    print(f"Spearman(predicted IoU, true IoU): matched masks {matched:.3f} (target >= 0.6), all queries {everything:.3f}")
    figures = {"spearman_matched": round(matched, 3), "spearman_all_queries": round(everything, 3)}
    for mode in ("class", "class_iou", "iou"):
        result = evaluate(model, processor, eval_rows, post_process_kwargs={"panoptic": {"score_mode": mode}})
        figures[f"PQ_{mode}"] = round(result["PQ"], 2)
    result = evaluate(model, processor, eval_rows, class_ensemble="embedding_modulation")
    figures["PQ_embedding_modulation"] = round(result["PQ"], 2)
    print("PQ by score mode (geometric ensemble): " + ", ".join(
        f"{m} {figures[f'PQ_{m}']:.1f}" for m in ("class", "class_iou", "iou")))
    print(f"PQ with Embedding Modulation (class scoring; s = 1 here): {figures['PQ_embedding_modulation']:.1f}")
    return figures


def hidden_class_pq(model, processor, rows) -> dict:
    """PQ on the two hidden classes, in-vocabulary classifier only (the random CLIP branch is switched off)."""
    model.ensemble.alpha = model.ensemble.beta = 0.0
    result = evaluate(model, processor, rows)
    per_class = {r["name"]: r for r in result["per_class"].values()}
    figures = {name: round(per_class[name]["PQ"], 2) for name in HIDDEN}
    return figures | {"PQ_hidden_mean": round(sum(figures.values()) / len(figures), 2), "PQ_all": round(result["PQ"], 2)}


def part_decoupled_supervision(args) -> dict:
    from eovseg.training import make_synthetic_image_label_dataset

    print("== Decoupled Supervision ==", flush=True)
    hidden_ids = tuple(CLASS_NAMES.index(name) for name in HIDDEN)
    panoptic_vocabulary = [name for name in CLASS_NAMES if name not in HIDDEN]
    rows = panoptic_rows(args, args.train_images, args.seed, drop_classes=hidden_ids)
    eval_rows = panoptic_rows(args, args.eval_images, args.seed + 1)
    figures = {}
    for use_ds in (False, True):
        print(f"-- {'with' if use_ds else 'without'} Decoupled Supervision", flush=True)
        overrides = {"decoupled_supervision": use_ds}
        if args.supervision_iou_threshold is not None:
            overrides["supervision_iou_threshold"] = args.supervision_iou_threshold
        model, processor = make_model(args, panoptic_vocabulary, **overrides)
        image_label_rows = None
        if use_ds:
            image_label_rows = make_synthetic_image_label_dataset(args.train_images, args.image_size, args.image_size,
                                                                  seed=args.seed + 2, class_names=CLASS_NAMES)
        train(args, model, processor, rows, panoptic_vocabulary, image_label_rows)
        figures["with_ds" if use_ds else "without_ds"] = hidden_class_pq(model, processor, eval_rows)
        print(json.dumps(figures), flush=True)
    return figures


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    start = time.time()
    if args.part in ("mf", "all"):
        print(json.dumps({"mask_filtering": part_mask_filtering(args), "seconds": round(time.time() - start)}),
              flush=True)
    if args.part in ("ds", "all"):
        start = time.time()
        print(json.dumps({"decoupled_supervision": part_decoupled_supervision(args),
                          "seconds": round(time.time() - start)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Open vocabulary in the toy world: PQ on seen and on unseen classes of held-out scenes (CPU, one thread).

    python benchmarks/zero_shot_toy.py                                   # the bundled demo model, ~2 minutes
    python benchmarks/zero_shot_toy.py --control_dir runs/toy_control    # + the random-tower training run
    python benchmarks/zero_shot_toy.py --model runs/toy_eovseg --num_images 128

The model (default: the bundled demo model, EOV-Seg `tiny` with toy-CLIP towers trained on the 14 seen classes only)
segments `--num_images` held-out toy-world scenes (seed 2026, `--size` pixels, every class of the world appears) with
all 18 class names as vocabulary; PQ is averaged over the seen classes and over the 4 unseen ones (3 new colour x shape
combinations and a new stuff type, sand), for each class-scoring rule:

* `geometric`: EOV-Seg's default, the geometric ensemble of the in-vocabulary head and the out-of-vocabulary CLIP
  branch (alpha 0.4 for seen classes, beta 0.8 for unseen ones);
* `in_vocabulary`: the in-vocabulary head alone (alpha = beta = 0): what the CLIP branch adds;
* `embedding_modulation`: OPSNet's Embedding Modulation instead of the ensemble (`class_ensemble=
  "embedding_modulation"`, the processor's training vocabulary as the seen domain).

Controls, the same measure where CLIP knows nothing:

* `random_towers`: the same model with its CLIP towers (CNN CLIP vision and text, ViT block) re-initialised at random
  (open_clip's initialisation, seed 0): the decoder was trained on other towers, so this is a lower bound;
* `--control_dir`: the same EOV-Seg training (same data, steps, seed) from random, untrained towers (the command is in
  `docs/toy_world.md`); evaluated with the geometric ensemble and the in-vocabulary head alone.

Prints one JSON line per setting, then a table. With the bundled model each setting takes ~10 s for 64 scenes.

`--part ds` re-runs OPSNet's Decoupled Supervision in this world (~10 minutes): from the bundled model (an IoU head
added, freshly initialised with seed 0 in both runs), two fine-tuning runs of `--budget_seconds` each on the seen
panoptic data, one panoptic only, one with half of its images image-level (toy-world scenes of every class, tagged
with the names of the classes they show: the unseen classes are then known by tags only); unseen and seen PQ of the
start model and of both runs, geometric ensemble and in-vocabulary head alone. The IoU threshold of `L_match` is 0.2
and the learning rate 1e-3, as in `benchmarks/opsnet_synthetic.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eovseg.evaluation.zero_shot import (  # noqa: E402
    HELD_OUT_SEED,
    evaluate_toy_world,
    in_vocabulary_only,
    with_random_towers,
)


def load(folder):
    from eovseg import EovSegForPanopticSegmentation, EovSegProcessor

    return EovSegForPanopticSegmentation.from_pretrained(folder).eval(), EovSegProcessor.from_pretrained(folder)


def measure(name, model, processor, args, class_ensemble=None, in_vocabulary=False) -> dict:
    start = time.time()
    with torch.no_grad():
        if in_vocabulary:
            with in_vocabulary_only(model):
                result = evaluate_toy_world(model, processor, args.num_images, args.size, args.seed)
        else:
            result = evaluate_toy_world(model, processor, args.num_images, args.size, args.seed,
                                        class_ensemble=class_ensemble)
    result = {"setting": name, **result, "seconds": round(time.time() - start, 1)}
    print(json.dumps(result), flush=True)
    return result


def decoupled_supervision(args) -> list[dict]:
    """OPSNet's Decoupled Supervision in the toy world: both arms start from `--model` with the same new IoU head."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from learn_synthetic import train_with_budget

    from eovseg import EovSegForPanopticSegmentation, EovSegProcessor
    from eovseg.synthetic import TOY_CLASSES, TOY_SEEN_CLASSES, make_toy_world_dataset
    from eovseg.training import (
        EovSegDataCollator,
        ImageLabelDataset,
        LargeScaleJitter,
        MixedSegmentationDataset,
        PanopticSegmentationDataset,
    )

    panoptic = make_toy_world_dataset(args.train_images, args.size, seed=0, split="seen")
    tagged = make_toy_world_dataset(args.train_images, args.size, seed=5, split="all")
    tags = [[TOY_CLASSES[c] for c in sorted({s["category_id"] for s in segs})] for segs in tagged["segments_info"]]
    tagged = tagged.select_columns(["image"]).add_column("labels", tags)
    rows = []
    for use_ds in (None, False, True):
        torch.manual_seed(0)
        model = EovSegForPanopticSegmentation.from_pretrained(
            args.model, mask_filtering=True, decoupled_supervision=bool(use_ds), supervision_iou_threshold=0.2)
        processor = EovSegProcessor.from_pretrained(args.model)
        name = "ds_start" if use_ds is None else ("ds_with" if use_ds else "ds_without")
        if use_ds is not None:
            jitter = LargeScaleJitter(args.size, 1.0, 1.0)
            dataset = PanopticSegmentationDataset(panoptic, jitter, seed=0, shuffle=True)
            if use_ds:
                image_level = ImageLabelDataset(tagged, list(TOY_CLASSES), jitter, seed=0, shuffle=True)
                dataset = MixedSegmentationDataset(dataset, image_level, 0.5)
            collator = EovSegDataCollator.from_processor(processor, list(TOY_SEEN_CLASSES), config=model.config,
                                                         image_label_names=list(TOY_CLASSES) if use_ds else None)
            loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collator, drop_last=True)
            steps, seconds = train_with_budget(model, loader, dataset, 1e-3, args.budget_seconds, 50)
            print(json.dumps({"run": name, "steps": steps, "seconds": round(seconds)}), flush=True)
        model.eval()
        rows.append(measure(name, model, processor, args))
        rows.append(measure(name + "_in_vocabulary", model, processor, args, in_vocabulary=True))
    return rows


def main(argv=None) -> int:
    from eovseg.demo import default_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(default_model_path()), help="model folder (default: the bundled demo model)")
    p.add_argument("--part", choices=["eval", "ds"], default="eval")
    p.add_argument("--budget_seconds", type=float, default=240.0, help="ds: training seconds per run")
    p.add_argument("--train_images", type=int, default=2000, help="ds: panoptic and tagged scenes")
    p.add_argument("--control_dir", default=None, help="the random-tower training run's model folder")
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.part == "ds":
        return report(decoupled_supervision(args), args)
    model, processor = load(args.model)
    rows = [
        measure("geometric", model, processor, args),
        measure("in_vocabulary", model, processor, args, in_vocabulary=True),
        measure("embedding_modulation", model, processor, args, class_ensemble="embedding_modulation"),
        measure("random_towers", with_random_towers(model), processor, args),
    ]
    if args.control_dir:
        control, control_processor = load(args.control_dir)
        rows.append(measure("control_run_geometric", control, control_processor, args))
        rows.append(measure("control_run_in_vocabulary", control, control_processor, args, in_vocabulary=True))
    return report(rows, args)


def report(rows, args) -> int:
    print(f"\n{args.num_images} held-out scenes of {args.size} px, seed {args.seed}; model {args.model}")
    print(f"{'setting':28s} {'PQ':>6s} {'PQ seen':>8s} {'PQ unseen':>10s}")
    for r in rows:
        print(f"{r['setting']:28s} {_fmt(r['PQ']):>6s} {_fmt(r['PQ_seen']):>8s} {_fmt(r['PQ_unseen']):>10s}")
    return 0


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main())

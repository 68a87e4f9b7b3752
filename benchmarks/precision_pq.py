"""What reduced precision does to results: a trained model's PQ in float32 and in bfloat16 (float16 on GPU) on the
held-out synthetic images of `learn_synthetic.py`, and, with `--fixture`, the R50 variant's final outputs on the
original-R50 fixture (deterministic weights, photo, ADE20K-150) in each precision against float32.

    python benchmarks/learn_synthetic.py --output_dir /tmp/tiny-synthetic      # or the bundled demo model
    python benchmarks/precision_pq.py --model_dir /tmp/tiny-synthetic
    python benchmarks/precision_pq.py --fixture tests/fixtures/original-r50

The model is cast whole (`model.to(dtype)`) with `config.float32_sensitive_ops` at its default (deformable
convolution on CPU, hard-mask thresholds, out-of-vocabulary classification and ensemble in float32);
`--no-float32-sensitive-ops` casts everything.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cast(model, dtype, sensitive: bool):
    model = copy.deepcopy(model).to(dtype)
    model.config.float32_sensitive_ops = sensitive
    for layer in model.decoder.layers:
        layer.float32_sensitive_ops = sensitive
    return model.eval()


def pq_by_precision(args, dtypes):
    from learn_synthetic import CLASS_NAMES

    from eovseg import EovSegForPanopticSegmentation, EovSegProcessor
    from eovseg.evaluation import evaluate_model
    from eovseg.training import make_synthetic_panoptic_dataset, synthetic_categories

    model_dir = args.model_dir
    if model_dir is None:
        from eovseg import demo

        if not hasattr(demo, "default_model_path"):
            raise SystemExit("No --model_dir and no bundled demo model in this install: train one with "
                             "benchmarks/learn_synthetic.py --output_dir DIR.")
        model_dir = demo.default_model_path()
    model = EovSegForPanopticSegmentation.from_pretrained(model_dir).eval()
    processor = EovSegProcessor.from_pretrained(model_dir)
    names = list(model.config.vocabulary or CLASS_NAMES)
    rows = make_synthetic_panoptic_dataset(args.eval_images, args.image_size, args.image_size, seed=args.seed + 1,
                                           class_names=names)
    categories = synthetic_categories(names)
    print(f"{model_dir}: {len(rows)} held-out synthetic images of {args.image_size}x{args.image_size}")
    scores = {}
    for dtype in dtypes:
        run = cast(model, dtype, not args.no_float32_sensitive_ops)
        with torch.no_grad():
            result = evaluate_model(run, processor, rows, "panoptic", categories=categories, batch_size=8, progress=False)
        scores[dtype] = result["PQ"]
        print(f"  {str(dtype).replace('torch.', ''):<9} PQ {scores[dtype]:6.2f}  ({scores[dtype] - scores[dtypes[0]]:+.2f})")


def fixture_outputs(args, dtypes):
    from side_by_side import Fixture, Ours

    fixture = Fixture(args.fixture)
    device = torch.device(args.device)
    reference = None
    print("R50 on the fixture photo, ADE20K-150: final outputs against float32")
    for dtype in dtypes:
        ours = Ours(fixture, dtype, device, float32_sensitive_ops=not args.no_float32_sensitive_ops)
        with torch.no_grad():
            out = ours.model(ours.pixels, **ours.vocabulary)
        probs = out.class_queries_logits.float().softmax(-1)[0]
        masks = out.masks_queries_logits.float()[0] > 0
        if reference is None:
            reference = probs, masks
            continue
        same_class = (probs.argmax(-1) == reference[0].argmax(-1)).float().mean().item()
        print(f"  {str(dtype).replace('torch.', ''):<9} class probabilities max |diff| {(probs - reference[0]).abs().max():.4f}, "
              f"same top class for {100 * same_class:.0f}% of queries, mask pixels that flip "
              f"{100 * (masks != reference[1]).float().mean():.2f}%")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=None)
    parser.add_argument("--fixture", default=None, help="compare the R50 variant's outputs on this fixture instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--eval_images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-float32-sensitive-ops", action="store_true")
    args = parser.parse_args(argv)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if args.device.startswith("cuda") else [])
    if args.fixture:
        fixture_outputs(args, dtypes)
    else:
        pq_by_precision(args, dtypes)


if __name__ == "__main__":
    main()

"""Package the bundled demo model (`eovseg/assets/demo_model/`) from a training run, and pick the bundled scene.

    OMP_NUM_THREADS=1 python -m eovseg.training.train <the command in eovseg/assets/demo_model/README.md>
    python scripts/make_demo_model.py --run_dir runs/demo_model

What it does: loads the trained model and processor of `--run_dir`; stores the weights as float16 (half the size;
the model loads them as float32, its configured dtype) and evaluates that stored model on a held-out synthetic set
(another seed than training and the training script's evaluation) with `eovseg.evaluation.evaluate_model`; writes the
model, processor and a model card recording the command, seed and held-out figures (`held_out.json`, which
`tests/test_demo.py` re-measures); saves as `shapes_scene.png` the first held-out-style scene (seed `SCENE_SEED`) with
at least four segments that the model segments with every ground-truth segment matched to a prediction of its class
(IoU > 0.5) and no other prediction.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "eovseg" / "assets"
HELD_OUT_SEED = 2026
HELD_OUT_IMAGES = 64
IMAGE_SIZE = 64
SCENE_SEED = 7
SCENE_SIZE = 64

TRAIN_COMMAND = (
    "OMP_NUM_THREADS=1 python -m eovseg.training.train --model tiny --dataset synthetic "
    "--categories eovseg/assets/shapes_categories.json --synthetic_train_images 4000 --synthetic_image_size 64 "
    "--image_size 64 --min_scale 1 --max_scale 1 --test_shortest_edge 64 --test_longest_edge 256 "
    "--per_device_batch_size 8 --learning_rate 1.5e-3 --max_steps 3000 --save_steps 0 --eval_dataset synthetic "
    "--synthetic_eval_images 100 --logging_steps 100 --seed 0 --cpu --no_progress --output_dir runs/demo_model"
)


def store_half(folder: Path) -> None:
    """Rewrite the folder's safetensors with float16 floating-point tensors (the config keeps float32)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path, metadata={"format": "pt"})


def held_out_rows(class_names):
    from eovseg.training import make_synthetic_panoptic_dataset

    return make_synthetic_panoptic_dataset(HELD_OUT_IMAGES, IMAGE_SIZE, IMAGE_SIZE, seed=HELD_OUT_SEED,
                                           class_names=class_names)


def evaluate(model, processor) -> dict:
    from eovseg.evaluation import evaluate_model
    from eovseg.training import synthetic_categories

    rows = held_out_rows(model.config.vocabulary)
    categories = synthetic_categories(model.config.vocabulary)
    return evaluate_model(model, processor, rows, "panoptic", categories=categories, batch_size=8, progress=False)


def scene_is_clean(model, processor, row) -> bool:
    """Every ground-truth segment found with its class (IoU > 0.5), nothing else predicted, at least 4 segments."""
    from eovseg.demo import segment

    image = row["image"].convert("RGB")
    label = np.asarray(row["label"].convert("RGB")).astype(np.int64)
    ids = label[..., 0] + 256 * label[..., 1] + 65536 * label[..., 2]
    truth = [(ids == s["id"], s["category_id"]) for s in row["segments_info"] if not s["iscrowd"]]
    if len(truth) < 4 or len(truth) != len(row["segments_info"]):
        return False
    result = segment(model, processor, image, None, model.config.is_thing)
    seg = result["segmentation"].numpy()
    predicted = [(seg == s["id"], s["label_id"]) for s in result["segments_info"]]
    if len(predicted) != len(truth):
        return False
    for mask, category in truth:
        if not any(c == category and (mask & p).sum() / (mask | p).sum() > 0.5 for p, c in predicted):
            return False
    return True


def pick_scene(model, processor) -> int:
    from eovseg.training import make_synthetic_panoptic_dataset

    rows = make_synthetic_panoptic_dataset(40, SCENE_SIZE, SCENE_SIZE, seed=SCENE_SEED,
                                           class_names=model.config.vocabulary)
    for index in range(len(rows)):
        if scene_is_clean(model, processor, rows[index]):
            rows[index]["image"].convert("RGB").save(ASSETS / "shapes_scene.png")
            return index
    raise SystemExit("no clean scene among 40")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from eovseg import EovSegForPanopticSegmentation, EovSegProcessor

    out = ASSETS / "demo_model"
    if out.exists():
        shutil.rmtree(out)  # this script's own output folder
    model = EovSegForPanopticSegmentation.from_pretrained(args.run_dir).eval()
    processor = EovSegProcessor.from_pretrained(args.run_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).unlink()  # 3.6 MB of open_clip's fixed tokenizer, which the processor builds offline when absent
    store_half(out)
    model = EovSegForPanopticSegmentation.from_pretrained(out).eval()  # what is shipped
    processor = EovSegProcessor.from_pretrained(out)
    results = evaluate(model, processor)
    index = pick_scene(model, processor)
    metrics = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_eval = next(m for m in reversed(metrics) if "eval/PQ" in m)
    held_out = {
        "seed": HELD_OUT_SEED, "num_images": HELD_OUT_IMAGES, "image_size": IMAGE_SIZE,
        **{k: round(float(results[k]), 3) for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")},
    }
    (out / "held_out.json").write_text(json.dumps(held_out, indent=2) + "\n")
    card = model_card(held_out, train_eval, index)
    (out / "README.md").write_text(card)
    print(json.dumps({"held_out": held_out, "scene_index": index}))
    return 0


def model_card(held_out: dict, train_eval: dict, scene_index: int) -> str:
    return f"""# The bundled demo model: EOV-Seg tiny, trained on synthetic shapes (a toy)

This is **not** a real segmentation model. It is the `tiny` preset of `eovseg` (2.6M parameters, random frozen CLIP
towers: no pretrained weights are used) trained on one CPU thread (3000 steps of 8 images; 29 minutes on our shared,
busy 2-core machine) on `eovseg`'s synthetic panoptic data:
red circles, purple rectangles and yellow triangles (things) over a blue sky and a green ground (stuff), 64x64 pixels.
It knows those five classes and nothing else; other class names give meaningless results. It is there so that
`python -m eovseg.demo`, the README's snippets and the tests run on a model whose outputs mean something.

For real weights, convert an authors' checkpoint (README, "Converting the authors' checkpoints") and pass the folder
(`python -m eovseg.demo --model eovseg-r50 --image street.jpg`).

## How it was made

Trained with the project's own training script, one thread, seed 0 (from the repository root):

```bash
{TRAIN_COMMAND}
python scripts/make_demo_model.py --run_dir runs/demo_model
```

The class names are descriptive (`red circle`, ..., from `eovseg/assets/shapes_categories.json`): with a random text
tower, one-word names have nearly parallel text embeddings. `scripts/make_demo_model.py` stores the weights as
float16 (they load as float32), evaluates the stored model, and picks the bundled scene. Same command, same machine
type and thread count give the same weights; another machine may differ in float round-off.

## Figures

- Training script's own evaluation (100 synthetic images, seed 1000003): PQ {train_eval['eval/PQ']:.1f}.
- Held-out set (`held_out.json`, measured on the float16-stored weights by `eovseg.evaluation.evaluate_model`), {held_out['num_images']} synthetic images of {held_out['image_size']}x{held_out['image_size']}, seed {held_out['seed']}: **PQ {held_out['PQ']:.1f}** (SQ {held_out['SQ']:.1f}, RQ {held_out['RQ']:.1f}; things {held_out['PQ_th']:.1f}, stuff {held_out['PQ_st']:.1f}). `tests/test_demo.py` re-measures it.
- The bundled scene `eovseg/assets/shapes_scene.png` is image {scene_index} of `make_synthetic_panoptic_dataset(40, 64, 64, seed={SCENE_SEED})`: the first whose every segment the model finds with the right class (a demo picture chosen to show the model working, not a measure of it).
"""


if __name__ == "__main__":
    sys.exit(main())

"""Write the toy world's data sets (`save_to_disk` folders) for EOV-Seg training on the seen classes.

    python scripts/make_toy_world.py --output_dir runs/toy_world --train_images 4000 --eval_images 100 --size 128

`OUTPUT_DIR/seen_train` (panoptic training: only the 14 seen classes appear, the toy COCO, seed 0) and
`OUTPUT_DIR/seen_eval` (the training script's own evaluation, seen classes, seed 1000003). The held-out scenes with
unseen classes are drawn by the benchmark and the tests themselves (`make_toy_world_dataset(..., split="all")`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eovseg.synthetic import make_toy_world_dataset  # noqa: E402

TRAIN_SEED = 0
EVAL_SEED = 1000003


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--train_images", type=int, default=4000)
    p.add_argument("--eval_images", type=int, default=100)
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args(argv)
    for name, count, seed in (("seen_train", args.train_images, TRAIN_SEED), ("seen_eval", args.eval_images, EVAL_SEED)):
        target = args.output_dir / name
        if target.exists():
            raise SystemExit(f"make_toy_world: error: {target} exists; remove it or choose another --output_dir")
        make_toy_world_dataset(count, args.size, seed=seed, split="seen").save_to_disk(str(target))
    return 0


if __name__ == "__main__":
    sys.exit(main())

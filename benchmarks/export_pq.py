"""PQ of every exported precision on a model's held-out synthetic set, against the PyTorch model in float32: ONNX
Runtime float32, int8 weights-only (dynamic quantization) and int8 static (activations calibrated); OpenVINO float32,
bfloat16 (the computation's precision at load time), float16 weights, int8 weights-only (NNCF weight compression) and int8 static
(NNCF post-training quantization).

    python benchmarks/export_pq.py                        # the bundled demo model (its held_out.json gives the set)
    python benchmarks/export_pq.py --model DIR --work_dir /tmp/export-pq --calibration 32

The held-out set is the one `scripts/make_demo_model.py` records in the model folder's `held_out.json` (`seed`,
`num_images`, `image_size`: toy-world scenes of all 18 classes, `eovseg.synthetic.make_toy_world_dataset`); the
calibration images are toy-world scenes of another seed. Every variant runs the model's default vocabulary with the predictor `eovseg predict` uses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def held_out(model_dir: Path, seed_offset: int = 0, count: int | None = None):
    """The toy-world scenes of every class (seen and unseen) that `held_out.json` names, as the model card's figures."""
    from eovseg.synthetic import make_toy_world_dataset, toy_world_categories

    spec = json.loads((model_dir / "held_out.json").read_text())
    rows = list(make_toy_world_dataset(count or spec["num_images"], spec["image_size"], seed=spec["seed"] + seed_offset,
                                       split="all"))
    return rows, toy_world_categories("all"), spec


def panoptic_quality(predictor, rows, categories) -> float:
    import numpy as np

    from eovseg.evaluation import PanopticQuality

    metric = PanopticQuality(categories)
    for start in range(0, len(rows), 8):
        batch = rows[start : start + 8]
        for result, row in zip(predictor([row["image"].convert("RGB") for row in batch]), batch):
            metric.add(result, {"segmentation": np.asarray(row["label"]), "segments_info": row["segments_info"]})
    return metric.compute()["PQ"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder with held_out.json (default: the demo model)")
    parser.add_argument("--work_dir", default=None, help="where the exports go (default: a temporary folder)")
    parser.add_argument("--calibration", type=int, default=32, help="synthetic images for static int8 calibration")
    args = parser.parse_args(argv)

    from eovseg import demo
    from eovseg.loading import ModelOutputError
    from eovseg.onnx_export import export_model_folder
    from eovseg.predict import Predictor, load_model
    from eovseg.runtime import load

    model_dir = Path(args.model) if args.model else Path(demo.default_model_path())
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="eovseg-export-pq-"))
    model, processor = load_model(str(model_dir))
    config = model.config
    rows, categories, spec = held_out(model_dir)
    calibration = [row["image"].convert("RGB") for row in held_out(model_dir, 1000, args.calibration)[0]]
    print(f"{model_dir}: {len(rows)} held-out images of {spec['image_size']}x{spec['image_size']} (seed {spec['seed']}), "
          f"PQ recorded {spec.get('PQ')}")
    eager = panoptic_quality(Predictor(model, processor, config.vocabulary, config.is_thing, False), rows, categories)
    print(f"{'PyTorch eager float32':<34} PQ {eager:6.2f}")
    exports = [("onnx", "float32", None), ("onnx", "int8", None), ("onnx", "int8", calibration),
               ("openvino", "float32", None), ("openvino", "float16", None), ("openvino", "int8", None),
               ("openvino", "int8", calibration)]
    base = work / "onnx-float32"
    try:
        for format, precision, images in exports:
            folder = work / f"{format}-{precision}{'-static' if images else ''}"
            if folder.exists():
                shutil.rmtree(folder)
            start = time.perf_counter()
            export_model_folder(model_dir if folder == base else base, folder, format, precision, images)
            seconds = time.perf_counter() - start
            runtime_precisions = ["float32", "bfloat16"] if (format, precision) == ("openvino", "float32") else ["float32"]
            for run_precision in runtime_precisions:
                runtime = load(folder, precision=run_precision)
                name = f"{'ONNX Runtime' if format == 'onnx' else 'OpenVINO'} {precision if precision != 'float32' else run_precision}"
                name += " static" if images else " weights-only" if precision == "int8" else ""
                try:
                    pq = panoptic_quality(runtime.predictor(config.vocabulary, config.is_thing, False), rows, categories)
                except ModelOutputError as error:
                    print(f"{name:<34} failed: {error}")
                    continue
                print(f"{name:<34} PQ {pq:6.2f}  ({pq - eager:+.2f} vs eager float32; export {seconds:.0f} s)")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

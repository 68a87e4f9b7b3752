"""One figure per model: the evaluation `eovseg train --eval_dataset synthetic` prints at the end is the one
`eovseg evaluate --dataset synthetic` prints for the saved model with its defaults (same held-out images, same
settings)."""

import json

from eovseg.data_sources import synthetic_eval_dataset
from eovseg.evaluation.evaluate import load_eval_dataset
from eovseg.evaluation.evaluate import run as evaluate_run
from eovseg.loading import default_model_path
from eovseg.parsers import SYNTHETIC_EVAL_IMAGES, SYNTHETIC_IMAGE_SIZE
from eovseg.training.train import build_datasets, parse_args, train

TRAIN = ["--dataset", "synthetic", "--eval_dataset", "synthetic", "--synthetic_train_images", "2", "--image_size", "64",
         "--no_augmentation", "--max_steps", "1", "--per_device_batch_size", "2", "--learning_rate", "1e-6",
         "--save_steps", "0", "--no_progress", "--cpu"]


def test_training_and_evaluate_use_one_held_out_set_whatever_the_training_seed(tmp_path):
    held_out = load_eval_dataset("synthetic")
    assert len(held_out) == SYNTHETIC_EVAL_IMAGES and held_out[0]["image"].size == (SYNTHETIC_IMAGE_SIZE,) * 2
    for seed in ("0", "42"):
        train_rows, eval_rows = build_datasets(parse_args(["--model", "tiny", *TRAIN, "--seed", seed,
                                                           "--output_dir", str(tmp_path)]))
        assert eval_rows["file_name"] == held_out["file_name"]
        assert [r.tobytes() for r in eval_rows["image"]] == [r.tobytes() for r in held_out["image"]]
        assert not set(train_rows["file_name"]) & set(held_out["file_name"])
    fewer = synthetic_eval_dataset(3)  # --num_synthetic 3: the first three of the same images
    assert [r.tobytes() for r in fewer["image"]] == [r.tobytes() for r in held_out["image"][:3]]


def test_the_training_figure_is_eovseg_evaluate_with_its_defaults(tmp_path, capsys):
    out = tmp_path / "out"
    summary = train(parse_args(["--model", str(default_model_path()), *TRAIN, "--output_dir", str(out)]))
    results = evaluate_run(["--model", str(out), "--dataset", "synthetic", "--no_progress"])
    assert summary["eval"]["num_images"] == results["num_images"] == SYNTHETIC_EVAL_IMAGES
    assert summary["eval"]["PQ"] > 10  # a trained model: the comparison below means something
    assert summary["eval"]["PQ"] == results["PQ"] and summary["eval"]["SQ"] == results["SQ"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["eval/PQ"] == results["PQ"]

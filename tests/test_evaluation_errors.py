"""The evaluation command's refusals: it never replaces a file, never scores an annotation of another size than
its image, never reports a table of nothing for a vocabulary that matches no ground-truth category, and says
which vocabulary it used when the data set stores none."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from eovseg.evaluation.evaluate import evaluate_model, main


def _id_to_rgb(ids):
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def _row(height=32, width=32, label_size=None, category=1):
    label_height, label_width = label_size or (height, width)
    ids = np.zeros((label_height, label_width), np.int64)
    ids[: label_height // 2] = 7
    image = Image.fromarray(np.full((height, width, 3), 90, np.uint8))
    return {"image": image, "label": Image.fromarray(_id_to_rgb(ids)),
            "segments_info": [{"id": 7, "category_id": category, "iscrowd": 0}]}


@pytest.fixture(scope="module")
def tiny():
    from eovseg import EovSegConfig, EovSegForPanopticSegmentation
    from eovseg.processing import EovSegProcessor

    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny")
    processor = EovSegProcessor.from_config(config, size={"shortest_edge": 32, "longest_edge": 32})
    return EovSegForPanopticSegmentation(config), processor


def _categories(ids):
    return [{"id": i, "name": f"class {i}", "isthing": i % 2} for i in ids]


def test_existing_output_is_never_replaced(tmp_path, capsys):
    output = tmp_path / "results.json"
    output.write_text("my own notes")
    args = ["--model", "random:tiny", "--dataset", "synthetic", "--num_synthetic", "1", "--shortest_edge", "32",
            "--longest_edge", "32", "--no_progress", "--output", str(output)]
    assert main(args) == 1  # bad input: 1, as every command (2 is for usage errors)
    error = capsys.readouterr().err.strip()
    assert error == f"eovseg evaluate: error: --output {output} exists; give a new file name or --overwrite to replace it."
    assert output.read_text() == "my own notes"
    assert main([*args, "--overwrite"]) == 0
    assert json.loads(output.read_text())["units"] == "percent"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no partial file left


def test_annotation_of_another_size_than_its_image_is_refused(tiny):
    model, processor = tiny
    rows = [_row(), _row(label_size=(16, 16))]  # the second annotation is at half the image's size
    with pytest.raises(ValueError, match=r"row 1: the annotation is 16x16 but the image is 32x32"):
        evaluate_model(model, processor, rows, "all", categories=_categories([1, 2]), progress=False)


def test_vocabulary_matching_no_ground_truth_category_is_an_error(tiny, tmp_path, capsys):
    model, processor = tiny
    rows = [_row(category=11), _row(category=12)]
    with pytest.raises(ValueError, match=r"None of the 2 vocabulary ids \(\[1, 2\] \.\.\.\) is a ground-truth category"):
        evaluate_model(model, processor, rows, "panoptic", categories=_categories([1, 2]), progress=False)
    # Semantic label maps (read only while evaluating): an error after the run instead of a table of nan.
    semantic_rows = [{"image": r["image"], "semantic": np.full((32, 32), 40)} for r in rows]
    with pytest.raises(ValueError, match="Nothing was evaluated: no ground-truth pixel of the vocabulary's classes"):
        evaluate_model(model, processor, semantic_rows, "semantic", categories=_categories([1, 2]),
                       columns={"semantic": "semantic"}, progress=False)
    # On the command line: one line, status 1, nothing written.
    vocabulary = tmp_path / "vocabulary.json"
    vocabulary.write_text(json.dumps(_categories([500, 501])))
    output = tmp_path / "out.json"
    code = main(["--model", "random:tiny", "--dataset", "synthetic", "--num_synthetic", "2", "--vocabulary",
                 str(vocabulary), "--no_progress", "--output", str(output)])
    error = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in error and "None of the 2 vocabulary ids" in error and not output.exists()


def test_data_set_without_categories_says_which_vocabulary_is_used(tiny, caplog):
    model, processor = tiny
    rows = [_row(category=0)]
    with caplog.at_level(logging.WARNING, logger="eovseg.evaluation.evaluate"):
        result = evaluate_model(model, processor, rows, "panoptic", progress=False)
    assert "stores no categories: evaluating with the model's own vocabulary" in caplog.text
    assert result["num_images"] == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eovseg.evaluation.evaluate"):
        evaluate_model(model, processor, rows, "panoptic", categories=_categories([0, 1]), progress=False)
    assert "stores no categories" not in caplog.text


@pytest.mark.parametrize("option, value", [("--shortest_edge", "0"), ("--shortest_edge", "-64"),
                                           ("--longest_edge", "0"), ("--batch_size", "0"), ("--max_samples", "0"),
                                           ("--threshold", "1.5"), ("--num_synthetic", "-1")])
def test_out_of_range_values_are_usage_errors(option, value, tmp_path, capsys):
    # Before: --shortest_edge 0 (or -64) reported PQ 0.0 with exit 0.
    output = tmp_path / "out.json"
    code = main(["--model", "random:tiny", "--dataset", "synthetic", "--num_synthetic", "1", "--no_progress",
                 "--output", str(output), option, value])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error.startswith(f"eovseg evaluate: error: argument {option}: must be ")
    assert not output.exists()


def test_ignored_category_ids_outside_the_vocabulary_are_refused(tmp_path, capsys):
    # Before: a typo (-1, 99) ignored nothing, silently, exit 0.
    output = tmp_path / "out.json"
    args = ["--model", "random:tiny", "--dataset", "synthetic", "--num_synthetic", "1", "--shortest_edge", "32",
            "--longest_edge", "32", "--no_progress", "--output", str(output)]
    assert main([*args, "--ignore_category_ids", "99", "-1"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("eovseg evaluate: error: ignore_category_ids [-1, 99] are not category ids")
    assert not output.exists()

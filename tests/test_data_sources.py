"""The one data-set loader and category resolver that training and evaluation share (`eovseg.data_sources`)."""

import json
import os

import datasets
import pytest

from eovseg import EovSegConfig
from eovseg.data_sources import load_local_dataset, normalize_categories, resolve_categories
from eovseg.evaluation.evaluate import load_eval_dataset
from eovseg.synthetic import make_synthetic_panoptic_dataset, synthetic_categories
from eovseg.vocabularies import get_vocabulary
from eovseg.vocabulary import VocabularyError


def _rows(n, tag):
    return datasets.Dataset.from_dict({"tag": [tag] * n, "x": list(range(n))})


def test_splits_of_a_saved_dataset_dict(tmp_path):
    path = str(tmp_path / "dd")
    datasets.DatasetDict({"train": _rows(3, "train"), "validation": _rows(2, "validation"), "extra": _rows(1, "extra")}).save_to_disk(path)
    assert load_local_dataset(path, None, ("train",))["tag"] == ["train"] * 3
    assert load_eval_dataset(path)["tag"] == ["validation"] * 2  # the evaluation's default splits
    assert load_local_dataset(path, "extra", ("train",))["tag"] == ["extra"]
    with pytest.raises(KeyError, match=r"No split 'tset'; splits: \['train', 'validation', 'extra'\]"):
        load_local_dataset(path, "tset", ("train",))
    with pytest.raises(ValueError, match=r"Choose a split among .* \(--dataset_split\)"):
        load_local_dataset(path, None, ("test",), "--dataset_split")


def test_data_files_and_missing_paths(tmp_path):
    parquet, jsonl = tmp_path / "rows.parquet", tmp_path / "rows.jsonl"
    _rows(4, "p").to_parquet(str(parquet))
    jsonl.write_text("".join(json.dumps({"tag": "j", "x": i}) + "\n" for i in range(2)))
    assert load_local_dataset(str(parquet), None, ("train",))["x"] == [0, 1, 2, 3]
    assert load_eval_dataset(str(jsonl))["tag"] == ["j", "j"]  # one file: its only split whatever the defaults
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported data file type 'txt'"):
        load_local_dataset(str(tmp_path / "rows.txt"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_local_dataset(str(tmp_path / "absent"))


def test_category_sources_in_order(tmp_path):
    config = EovSegConfig.from_variant("tiny")
    own = [{"id": i, "name": n, "isthing": bool(t)} for i, (n, t) in enumerate(zip(config.vocabulary, config.is_thing))]
    synthetic = make_synthetic_panoptic_dataset(num_images=1, seed=0)
    assert resolve_categories(None, synthetic, config) == normalize_categories(synthetic_categories())
    assert resolve_categories(None, _rows(1, "x"), config) == own  # nothing stored: the model's vocabulary
    ade = get_vocabulary("ade20k_150")
    by_name = resolve_categories("ade20k_150", synthetic, config)
    assert [c["id"] for c in by_name] == ade.dataset_ids and [c["isthing"] for c in by_name] == ade.is_thing
    names = [own[2]["name"], own[0]["name"]]  # names take the model's ids and flags
    assert resolve_categories(names, None, config) == [own[2], own[0]]
    path = tmp_path / "cats.json"
    path.write_text(json.dumps({"categories": [{"id": 7, "name": "disc", "isthing": 1}, {"id": 9, "name": "sky", "isthing": "false"}]}))
    assert resolve_categories(str(path), synthetic, config) == [
        {"id": 7, "name": "disc", "isthing": True}, {"id": 9, "name": "sky", "isthing": False}]
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        resolve_categories(["no such class"], None, config)
    with pytest.raises(VocabularyError, match="isthing of id 3 is 'no'"):
        normalize_categories([{"id": 3, "name": "x", "isthing": "no"}])


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--model", "tiny", "--output_dir", "o", "--dataset", "{data}"],
        ["train", "--model", "tiny", "--output_dir", "o", "--dataset", "synthetic", "--eval_dataset", "{data}"],
        ["evaluate", "--model", "random:tiny", "--dataset", "{data}"],
    ],
    ids=["train", "train-eval", "evaluate"],
)
def test_empty_or_unreadable_data_sets_are_one_line_errors(command, tmp_path, monkeypatch, capsys):
    from eovseg.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    datasets.Dataset.from_dict({"x": []}).save_to_disk("no_rows")
    datasets.DatasetDict({"train": _rows(1, "t"), "validation": _rows(0, "v")}).save_to_disk("empty_split")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "garbage.json").write_text("{not json")
    capsys.readouterr()  # save_to_disk's progress bars
    expected = {
        "no_rows": "data set 'no_rows' has no rows",
        "empty_split": "data set 'empty_split' has no rows in split 'validation'",
        "empty.jsonl": "data set 'empty.jsonl' has no rows (the file is empty)",
        "garbage.json": "cannot read 'garbage.json' as a data set (ArrowInvalid: JSON parse error",
    }
    for data, message in expected.items():
        argv = [data if arg == "{data}" else arg for arg in command]
        assert cli_main(argv) == 1, data
        # datasets' own progress bars and log lines aside, one line from the command
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eovseg")]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in lines[0], lines
        assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")

"""The vocabulary options of `eovseg demo` and `eovseg predict`: a vocabulary file's own colours reach their pictures (as
a built-in vocabulary's do), a file's bad colour is refused in one line, and a bad vocabulary is refused before the
model is loaded."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eovseg.demo import run as run_demo
from eovseg.loading import resolve_vocabulary
from eovseg.predict import main as predict_main
from eovseg.synthetic import SYNTHETIC_CLASS_NAMES, SYNTHETIC_IS_THING, make_synthetic_panoptic_dataset
from eovseg.vocabulary import VocabularyError

# Colours no rule of the drawing would pick for these names (a "red circle" drawn teal, ...).
FILE_COLORS = [(0, 128, 128), (255, 160, 0), (20, 20, 120), (200, 0, 90), (120, 120, 0)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from eovseg import EovSegConfig, EovSegForPanopticSegmentation
    from eovseg.processing import EovSegProcessor

    root = tmp_path_factory.mktemp("colors")
    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny")
    EovSegForPanopticSegmentation(config).save_pretrained(root / "model")
    EovSegProcessor.from_config(config, size={"shortest_edge": 48, "longest_edge": 64}).save_pretrained(root / "model")
    image = root / "scene.png"
    next(iter(make_synthetic_panoptic_dataset(1, 48, 64, seed=3)))["image"].save(image)
    vocabulary = root / "shapes.json"
    vocabulary.write_text(json.dumps({"classes": [
        {"id": i, "name": name, "isthing": int(thing), "color": list(color)}
        for i, (name, thing, color) in enumerate(zip(SYNTHETIC_CLASS_NAMES, SYNTHETIC_IS_THING, FILE_COLORS))]}))
    return {"root": root, "model": root / "model", "image": image, "vocabulary": vocabulary}


def tinted_in_file_colors(picture: np.ndarray, image: np.ndarray, ids: np.ndarray, segments) -> list[float]:
    """Per segment, the fraction of its pixels tinted half-way to its class's file colour (outlines and labels are
    the rest)."""
    fractions = []
    for segment in segments:
        inside = ids == segment["id"]
        expected = image[inside] + (np.array(FILE_COLORS[segment["label_id"]]) - image[inside]) * 0.5
        fractions.append(float((np.abs(picture[inside] - expected).max(-1) <= 1).mean()))
    return fractions


def test_resolve_vocabulary_gives_a_files_colors(setup):
    from eovseg import EovSegConfig

    config = EovSegConfig.from_variant("tiny")
    assert resolve_vocabulary(config, vocabulary=str(setup["vocabulary"])).colors == FILE_COLORS
    assert resolve_vocabulary(config, classes=["car", "sky"]).colors is None


def test_predict_draws_a_vocabulary_files_colors(setup, tmp_path):
    out = tmp_path / "out"
    assert predict_main([str(setup["image"]), "--output_dir", str(out), "--model", str(setup["model"]),
                         "--vocabulary", str(setup["vocabulary"])]) == 0
    annotation = json.loads((out / "panoptic.json").read_text())["annotations"][0]
    png = np.asarray(Image.open(out / "panoptic" / annotation["file_name"]), dtype=np.int64)
    ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
    segments = [{"id": s["id"], "label_id": s["category_id"]} for s in annotation["segments_info"]]
    assert segments
    overlay = np.asarray(Image.open(out / "overlay" / annotation["file_name"]).convert("RGB"), dtype=np.float64)
    image = np.asarray(Image.open(setup["image"]).convert("RGB"), dtype=np.float64)
    assert min(tinted_in_file_colors(overlay, image, ids, segments)) > 0.5


def test_the_demo_draws_a_vocabulary_files_colors(setup, tmp_path):
    report = run_demo(setup["image"], str(setup["model"]), None, None, tmp_path, vocabulary=str(setup["vocabulary"]))
    segments = report["segments"]
    assert segments
    # The legend panel of the demo's picture: a swatch in the file's colour for each class found, none for the others
    # (the overlay panel is drawn with the same colours by the one drawing function).
    sheet = np.asarray(Image.open(report["overlay"]).convert("RGB"))
    left, top, right, bottom = report["picture_panels"]["legend"]
    legend = sheet[top:bottom, left:right].reshape(-1, 3)
    for label_id in {s["label_id"] for s in segments}:
        assert (legend == FILE_COLORS[label_id]).all(-1).sum() > 50, SYNTHETIC_CLASS_NAMES[label_id]
    others = set(range(len(FILE_COLORS))) - {s["label_id"] for s in segments}
    assert all(not (legend == FILE_COLORS[k]).all(-1).any() for k in others)


def test_a_bad_color_in_a_vocabulary_file_is_one_line(tmp_path):
    from eovseg.vocabularies import read_vocabulary_file

    path = tmp_path / "bad.json"
    for color in ([0, 0], [0, 0, 300], "red", [0.5, 0, 0]):
        path.write_text(json.dumps({"classes": [{"id": 0, "name": "car", "color": color}]}))
        with pytest.raises(VocabularyError, match=r"bad.json: class 'car' color"):
            read_vocabulary_file(path)


@pytest.mark.parametrize("command", ["demo", "predict"])
@pytest.mark.parametrize("options, message", [
    (["--vocabulary", "missing.json"], "Vocabulary file 'missing.json' does not exist"),
    (["--vocabulary", "no_such_name"], "Unknown vocabulary 'no_such_name'"),
    (["--classes", "car", "--stuff", "sky"], "Stuff classes ['sky'] are not in the vocabulary"),
])
def test_a_bad_vocabulary_is_refused_before_the_model_is_loaded(command, options, message, setup, tmp_path, capsys,
                                                                 monkeypatch):
    # Before, the model was loaded first (seconds for a converted checkpoint), then the vocabulary refused.
    import eovseg.auto_registration
    from eovseg.cli import main as cli_main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(eovseg.auto_registration, "load_model_folder", no_loading)
    monkeypatch.chdir(tmp_path)
    inputs = [str(setup["image"])] if command == "predict" else ["--image", str(setup["image"])]
    assert cli_main([command, *inputs, "--output_dir", "out", "--model", str(setup["model"]), *options]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

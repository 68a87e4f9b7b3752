"""The toy world (issue 22): its seen/unseen split, its toy CLIP pretraining, and the bundled model segmenting classes
it never saw in panoptic training while a random-tower control does not."""

import json

import numpy as np
import pytest
import torch

from eovseg import EovSegForPanopticSegmentation, EovSegProcessor
from eovseg.demo import default_model_path
from eovseg.evaluation.zero_shot import HELD_OUT_SEED, evaluate_toy_world, seen_unseen_pq, with_random_towers
from eovseg.synthetic import (
    TOY_CLASSES,
    TOY_SEEN_CLASSES,
    TOY_UNSEEN_CLASSES,
    make_toy_world_dataset,
    toy_world_categories,
    toy_world_crop,
)

# The model card's 64 held-out scenes (seed 2026, 128 px; ~7 s per pass). Measured on the bundled model: unseen-class
# PQ 30.8 (held_out.json), 0.0 with its CLIP towers re-initialised at random. The bound 20 leaves room for float
# round-off across machines moving a few segments (one unseen segment moves the unseen mean by ~1-2 points) and sits
# far above the control's; 5 is issue 22's bound for a control.
NUM_SCENES = 64
UNSEEN_PQ_AT_LEAST = 20.0
CONTROL_UNSEEN_PQ_AT_MOST = 5.0


def _segment_names(row):
    return [TOY_CLASSES[s["category_id"]] for s in row["segments_info"]]


def test_seen_split_never_shows_an_unseen_class_and_all_split_does():
    seen = make_toy_world_dataset(30, 48, seed=5, split="seen")
    every = make_toy_world_dataset(30, 48, seed=5, split="all")
    assert json.loads(seen.info.description)["categories"] == toy_world_categories("seen")
    assert [c["name"] for c in toy_world_categories("all")] == list(TOY_CLASSES)
    seen_names = {n for row in seen for n in _segment_names(row)}
    all_names = {n for row in every for n in _segment_names(row)}
    assert seen_names <= set(TOY_SEEN_CLASSES)
    assert all_names & set(TOY_UNSEEN_CLASSES)
    for row in every:  # the caption names exactly the classes shown; labels cover the image
        assert row["caption"] == "a photo of " + ", ".join(dict.fromkeys(_segment_names(row))) + "."
        assert sum(s["area"] for s in row["segments_info"]) == 48 * 48
    # the unseen things are new combinations of seen words; the unseen stuff is a new word
    seen_words = {w for n in TOY_SEEN_CLASSES for w in n.split()}
    assert [set(n.split()) <= seen_words for n in TOY_UNSEEN_CLASSES] == [True, True, True, False]


def test_toy_world_is_a_pure_function_of_its_arguments():
    a = make_toy_world_dataset(3, 40, seed=9, split="all")
    b = make_toy_world_dataset(3, 40, seed=9, split="all")
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["image"], b["image"]))
    assert a["segments_info"] == b["segments_info"]
    crop = toy_world_crop("sand", np.random.default_rng(0), 32)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    with pytest.raises(ValueError, match="split must be one of"):
        make_toy_world_dataset(1, 32, split="unseen")
    with pytest.raises(ValueError, match="not a toy-world class"):
        toy_world_crop("car", np.random.default_rng(0))


def test_seen_unseen_pq_averages_the_classes_that_occur():
    results = {"per_class": {
        0: {"name": "red circle", "PQ": 80.0, "TP": 3, "FN": 0},
        1: {"name": "sky", "PQ": 60.0, "TP": 2, "FN": 1},
        2: {"name": "sand", "PQ": 10.0, "TP": 1, "FN": 4},
        3: {"name": "red triangle", "PQ": 0.0, "TP": 0, "FN": 0},  # never occurs: left out
    }}
    out = seen_unseen_pq(results, TOY_SEEN_CLASSES)
    assert out["PQ_seen"] == pytest.approx(70.0) and out["PQ_unseen"] == pytest.approx(10.0)
    assert set(out["per_class"]) == {"red circle", "sky", "sand"}


def test_pretraining_saves_an_eovseg_model_holding_the_trained_towers(tmp_path):
    from eovseg.training.pretrain_toy_clip import main

    assert main(["--output_dir", str(tmp_path / "clip"), "--steps", "2", "--scenes_per_step", "4", "--scene_pool",
                 "8", "--scene_size", "64", "--crop_size", "32", "--retrieval_scenes", "2", "--log_every", "1"]) == 0
    model = EovSegForPanopticSegmentation.from_pretrained(tmp_path / "clip")
    assert model.config.train_vocabulary == list(TOY_SEEN_CLASSES)
    torch.manual_seed(0)
    fresh = EovSegForPanopticSegmentation(model.config)
    for tower in ("clip_backbone", "spatial_extractor"):  # every tower weight moved away from the initialisation
        trained, initial = getattr(model, tower).state_dict(), getattr(fresh, tower).state_dict()
        changed = [k for k, v in trained.items() if v.is_floating_point() and not torch.equal(v, initial[k])]
        assert len(changed) > 0.5 * len(trained), tower
    assert not any(p.requires_grad for p in model.clip_backbone.parameters())


@pytest.fixture(scope="module")
def bundled():
    model = EovSegForPanopticSegmentation.from_pretrained(default_model_path()).eval()
    return model, EovSegProcessor.from_pretrained(default_model_path())


def test_bundled_model_segments_classes_it_never_saw_and_a_random_tower_control_does_not(bundled):
    model, processor = bundled
    assert model.config.vocabulary == list(TOY_CLASSES)
    assert set(model.config.train_vocabulary) == set(TOY_SEEN_CLASSES)
    with torch.no_grad():
        trained = evaluate_toy_world(model, processor, NUM_SCENES, seed=HELD_OUT_SEED)
        control = evaluate_toy_world(with_random_towers(model), processor, NUM_SCENES, seed=HELD_OUT_SEED)
    assert trained["PQ_unseen"] >= UNSEEN_PQ_AT_LEAST, trained
    assert control["PQ_unseen"] <= CONTROL_UNSEEN_PQ_AT_MOST, control
    assert set(trained["per_class"]) & set(TOY_UNSEEN_CLASSES)

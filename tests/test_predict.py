"""`eovseg predict`: folders, videos, the run's COCO panoptic output, resume, bad inputs, torchrun splitting."""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eovseg.evaluation import PanopticQuality
from eovseg.predict import main as predict_main
from eovseg.synthetic import SYNTHETIC_CLASS_NAMES, SYNTHETIC_IS_THING, make_synthetic_panoptic_dataset

CLASSES = SYNTHETIC_CLASS_NAMES
STUFF = [n for n, thing in zip(CLASSES, SYNTHETIC_IS_THING) if not thing]
NUM_IMAGES, HEIGHT, WIDTH, BATCH = 20, 48, 64, 4
VIDEO_FRAMES = 5


def make_tiny_model_folder(path: Path) -> Path:
    from eovseg import EovSegConfig, EovSegForPanopticSegmentation
    from eovseg.processing import EovSegProcessor

    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny")
    EovSegForPanopticSegmentation(config).save_pretrained(path)
    EovSegProcessor.from_config(config, size={"shortest_edge": 48, "longest_edge": 64}).save_pretrained(path)
    return path


def write_video(path: Path, frames) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    model = make_tiny_model_folder(root / "model")
    rows = list(make_synthetic_panoptic_dataset(NUM_IMAGES, HEIGHT, WIDTH, seed=3))
    folder = root / "shapes"
    (folder / "more").mkdir(parents=True)
    paths = []
    for i, row in enumerate(rows):  # the last five in a subfolder (sorted after the others)
        path = folder / ("more" if i >= 15 else "") / f"img_{i:03d}.png"
        row["image"].save(path)
        paths.append(path)
    video = root / "clip.mp4"
    write_video(video, [r["image"] for r in make_synthetic_panoptic_dataset(VIDEO_FRAMES, HEIGHT, WIDTH, seed=4)])
    return {"root": root, "model": model, "rows": rows, "folder": folder, "paths": paths, "video": video}


def run_args(data, output_dir, *inputs):
    inputs = inputs or (str(data["folder"]), str(data["video"]))
    return [*inputs, "--output_dir", str(output_dir), "--model", str(data["model"]), "--classes", *CLASSES,
            "--stuff", *STUFF, "--batch_size", str(BATCH), "--instances"]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def single_run(data):
    """One process with one thread, as each process of the two-process run below (OMP_NUM_THREADS=1): the scores in
    the records are float32 sums whose round-off depends on the thread count."""
    output_dir = data["root"] / "out1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert predict_main(run_args(data, output_dir)) == 0
    finally:
        torch.set_num_threads(threads)
    return output_dir


def reference(row) -> dict:
    return {"segmentation": np.asarray(row["label"]), "segments_info": row["segments_info"]}


def categories():
    return [{"id": i, "name": n, "isthing": int(t)} for i, (n, t) in enumerate(zip(CLASSES, SYNTHETIC_IS_THING))]


def test_writes_coco_panoptic_pngs_overlays_video_and_instances(data, single_run):
    from pycocotools import mask as mask_utils

    coco = json.loads((single_run / "panoptic.json").read_text())
    assert coco["categories"] == categories()
    assert [im["file_name"] for im in coco["images"][:NUM_IMAGES]] == [str(p) for p in data["paths"]]
    assert len(coco["images"]) == len(coco["annotations"]) == NUM_IMAGES + VIDEO_FRAMES
    assert [a["image_id"] for a in coco["annotations"]] == list(range(1, NUM_IMAGES + VIDEO_FRAMES + 1))
    for annotation in coco["annotations"]:
        png = np.asarray(Image.open(single_run / "panoptic" / annotation["file_name"]), dtype=np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        for segment in annotation["segments_info"]:
            rows, cols = np.nonzero(ids == segment["id"])
            assert segment["area"] == rows.size > 0
            assert segment["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            assert segment["isthing"] == SYNTHETIC_IS_THING[segment["category_id"]]
        assert set(np.unique(ids)) <= {0} | {s["id"] for s in annotation["segments_info"]}
    for path in data["paths"]:
        key = path.relative_to(data["folder"].parent).with_suffix(".png")
        overlay = Image.open(single_run / "overlay" / key)
        assert overlay.size == (WIDTH, HEIGHT) and np.any(np.asarray(overlay) != np.asarray(Image.open(path)))
    video = json.loads((single_run / "videos" / "clip.json").read_text())
    assert [f["frame"] for f in video["frames"]] == list(range(VIDEO_FRAMES)) and video["fps"] == 5.0
    assert [f["file_name"] for f in video["frames"]] == [a["file_name"] for a in coco["annotations"][NUM_IMAGES:]]
    import av

    with av.open(str(single_run / "overlay" / "clip.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == VIDEO_FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)
    instances = json.loads((single_run / "instances.json").read_text())
    assert instances and {d["image_id"] for d in instances} <= {im["id"] for im in coco["images"]}
    for detection in instances[:20]:
        assert SYNTHETIC_IS_THING[detection["category_id"]]
        assert mask_utils.decode({**detection["segmentation"], "counts": detection["segmentation"]["counts"].encode()}).sum() == detection["area"]


def test_files_evaluate_to_the_pq_of_the_in_memory_path(data, single_run):
    from eovseg.predict import load_model

    coco = json.loads((single_run / "panoptic.json").read_text())
    from_files = PanopticQuality(categories())
    for annotation, row in zip(coco["annotations"][:NUM_IMAGES], data["rows"]):
        prediction = {"segmentation": str(single_run / "panoptic" / annotation["file_name"]),
                      "segments_info": annotation["segments_info"]}
        from_files.add(prediction, reference(row))

    model, processor = load_model(str(data["model"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the predict run (round-off depends on the thread count)
    try:
        in_memory = in_memory_quality(data, model, processor, coco, single_run)
    finally:
        torch.set_num_threads(threads)
    assert from_files.state_dict() == in_memory.state_dict()
    assert sum(in_memory.state_dict()["fn"]) + sum(in_memory.state_dict()["fp"]) > 0
    assert json.dumps(from_files.compute(), sort_keys=True) == json.dumps(in_memory.compute(), sort_keys=True)


def in_memory_quality(data, model, processor, coco, single_run) -> PanopticQuality:
    """PQ of the model run directly in the run's batches, checking that the files hold the same segments."""
    in_memory = PanopticQuality(categories())
    stuff_ids = {i for i, thing in enumerate(SYNTHETIC_IS_THING) if not thing}
    for start in range(0, NUM_IMAGES, BATCH):
        rows = data["rows"][start : start + BATCH]
        images = [Image.open(p).convert("RGB") for p in data["paths"][start : start + BATCH]]
        with torch.no_grad():
            outputs = model(**processor(images=images, text=CLASSES, return_tensors="pt"))
        results = processor.post_process_panoptic_segmentation(
            outputs, label_ids_to_fuse=stuff_ids, target_sizes=[(HEIGHT, WIDTH)] * len(images))
        for index, (result, row) in enumerate(zip(results, rows), start=start):
            in_memory.add(result, reference(row))
            # The files hold the in-memory segments exactly (so any ground truth scores them the same).
            annotation = coco["annotations"][index]
            png = np.asarray(Image.open(single_run / "panoptic" / annotation["file_name"]), dtype=np.int64)
            ids = result["segmentation"].numpy()
            assert np.array_equal(png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2], np.where(ids > 0, ids, 0))
            assert [(s["id"], s["category_id"]) for s in annotation["segments_info"]] == [
                (s["id"], s["label_id"]) for s in result["segments_info"]]
    return in_memory


def test_two_processes_write_exactly_the_files_of_one(data, single_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "eovseg.predict", *run_args(data, tmp_path / "out2")]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{NUM_IMAGES + 1} inputs to segment in 2 process(es)" in run.stdout
    one, two = tree(single_run), tree(tmp_path / "out2")
    assert sorted(one) == sorted(two)
    assert [name for name in one if one[name] != two[name]] == []


def test_resume_skips_inputs_already_written(data, single_run, tmp_path, capsys):
    output_dir = tmp_path / "out"
    assert predict_main(run_args(data, output_dir, *map(str, data["paths"][:6]))) == 0
    first = {p: p.stat().st_mtime_ns for p in (output_dir / "panoptic").rglob("*.png")}
    capsys.readouterr()
    assert predict_main(run_args(data, output_dir, *map(str, data["paths"][:10]))) == 0
    assert "6 of 10 inputs already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in first} == first
    coco = json.loads((output_dir / "panoptic.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == [str(p) for p in data["paths"][:10]]
    assert len(list((output_dir / "panoptic").rglob("*.png"))) == 10


def test_bad_inputs_are_skipped_and_listed(data, tmp_path, capsys):
    broken_image, broken_video = tmp_path / "broken.jpg", tmp_path / "broken.mp4"
    broken_image.write_bytes(b"not an image")
    broken_video.write_bytes(b"\x00" * 100)
    missing = tmp_path / "missing.png"
    args = run_args(data, tmp_path / "out", str(data["paths"][0]), str(broken_image), str(broken_video), str(missing))
    assert predict_main(args) == 1
    err = capsys.readouterr().err
    for path in (broken_image, broken_video, missing):
        assert len([line for line in err.splitlines() if line.startswith(f"skipped {path}: ")]) == 1
    assert "Traceback" not in err
    coco = json.loads((tmp_path / "out" / "panoptic.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == [str(data["paths"][0])]
    assert not list((tmp_path / "out").rglob("*.partial"))


def test_refuses_a_folder_it_did_not_make_or_other_settings(data, tmp_path, capsys):
    foreign = tmp_path / "busy"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert predict_main(run_args(data, foreign, str(data["paths"][0]))) == 1
    assert "holds other files" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "mine"

    output_dir = tmp_path / "run"
    assert predict_main(run_args(data, output_dir, str(data["paths"][0]))) == 0
    before = tree(output_dir)
    assert predict_main(run_args(data, output_dir, str(data["paths"][0]))[:-1] + ["--threshold", "0.5"]) == 1
    assert "other settings (instances, threshold)" in capsys.readouterr().err
    assert tree(output_dir) == before


def test_clear_errors_for_a_bad_model_or_vocabulary(data, tmp_path, capsys):
    image = str(data["paths"][0])
    assert predict_main([image, "--output_dir", str(tmp_path / "a"), "--model", str(tmp_path)]) == 1
    assert "is not a folder with a config.json" in capsys.readouterr().err
    assert predict_main([image, "--output_dir", str(tmp_path / "b"), "--model", str(data["model"]),
                         "--classes", "car", "--stuff", "road"]) == 1
    assert "are not in the vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_commands_are_registered(data, tmp_path, capsys):
    from eovseg.cli import main as cli_main

    assert cli_main(["predict", str(data["paths"][0]), "--output_dir", str(tmp_path / "x"), "--model", str(tmp_path)]) == 1
    assert cli_main(["app", "--model", str(tmp_path)]) == 1
    assert capsys.readouterr().err.count("is not a folder with a config.json") == 2


def test_a_built_in_vocabulary_by_name(data, tmp_path, capsys):
    from eovseg.vocabularies import get_vocabulary

    image, model = str(data["paths"][0]), str(data["model"])
    assert predict_main([image, "--output_dir", str(tmp_path / "city"), "--model", model, "--vocabulary", "cityscapes"]) == 0
    cityscapes = get_vocabulary("cityscapes")
    categories = json.loads((tmp_path / "city" / "panoptic.json").read_text())["categories"]
    assert [(c["name"], bool(c["isthing"])) for c in categories] == list(zip(cityscapes.class_names, cityscapes.is_thing))
    assert predict_main([image, "--output_dir", str(tmp_path / "x"), "--model", model, "--vocabulary", "nope"]) == 1
    assert "Unknown vocabulary 'nope'" in capsys.readouterr().err
    assert predict_main([image, "--output_dir", str(tmp_path / "y"), "--model", model, "--vocabulary", "cityscapes",
                         "--classes", "car"]) == 1
    assert "not both" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Output names, the output folder, broken models, validation before writing
# ----------------------------------------------------------------------------------------------------------------------


def png_ids(path: Path) -> np.ndarray:
    png = np.asarray(Image.open(path), dtype=np.int64)
    return png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]


def test_a_video_and_a_folder_of_its_name_write_distinct_files(data, tmp_path, capsys):
    # Before the fix both wrote panoptic/v/000000.png: the image's segments were replaced by the first frame's.
    (tmp_path / "v").mkdir()
    Image.open(data["paths"][0]).save(tmp_path / "v" / "000000.png")
    (tmp_path / "v.mp4").write_bytes(data["video"].read_bytes())
    args = run_args(data, tmp_path / "out", str(tmp_path / "v.mp4"), str(tmp_path / "v"))
    assert predict_main(args) == 0
    output = tmp_path / "out"
    coco = json.loads((output / "panoptic.json").read_text())
    names = [a["file_name"] for a in coco["annotations"]]
    assert len(names) == len(set(names)) == VIDEO_FRAMES + 1
    assert "v/000000.png" in names and json.loads((output / "videos" / "v-2.json").read_text())["video"] == str(tmp_path / "v.mp4")
    for annotation in coco["annotations"]:  # every file holds the segments its annotation lists
        ids = png_ids(output / "panoptic" / annotation["file_name"])
        assert {s["id"] for s in annotation["segments_info"]} == set(np.unique(ids)) - {0}
    before = tree(output)
    capsys.readouterr()
    assert predict_main(args) == 0  # resumed: the same names, nothing segmented again
    assert "2 of 2 inputs already done" in capsys.readouterr().out
    assert {k: v for k, v in tree(output).items() if k != "panoptic.json"} == {
        k: v for k, v in before.items() if k != "panoptic.json"}


def test_output_names_are_unique_whatever_the_inputs():
    from eovseg.predict import _output_keys

    names = [("v", "video"), ("v/000000", "image"), ("clip", "image"), ("clip", "video"), ("Clip", "image"),
             ("a/b", "image"), ("a", "video"), ("v-2", "image")]
    keys = _output_keys(names)
    assert keys == ["v-3", "v/000000", "clip", "clip-3", "Clip-2", "a/b", "a-2", "v-2"]
    # no two inputs write the same panoptic PNG (an image K: K.png; a video V: V/NNNNNN.png)
    pngs = [f"{k}.png" if kind == "image" else f"{k}/000000.png" for k, (_, kind) in zip(keys, names)]
    assert len({p.casefold() for p in pngs}) == len(pngs)
    assert _output_keys([("x", "image"), ("x", "image"), ("x-2", "image")]) == ["x", "x-2", "x-2-2"]


def test_the_output_folder_is_never_an_input(data, tmp_path, capsys):
    # Before the fix the second run (the README's way to resume) segmented the first run's overlays.
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in data["paths"][:2]:
        Image.open(path).save(photos / path.name)
    output = photos / "out"
    args = run_args(data, output, str(photos))
    assert predict_main(args) == 0 and predict_main(args) == 0
    assert "2 of 2 inputs already done" in capsys.readouterr().out
    coco = json.loads((output / "panoptic.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == [str(photos / p.name) for p in data["paths"][:2]]
    # another run's folder inside an input folder is left out too; the output folder given as an input is refused
    assert predict_main(run_args(data, tmp_path / "second", str(photos))) == 0
    assert len(json.loads((tmp_path / "second" / "panoptic.json").read_text())["images"]) == 2
    overlay = next((output / "overlay").rglob("*.png"))
    assert predict_main(run_args(data, output, str(photos), str(overlay))) == 1
    assert f"skipped {overlay}: inside --output_dir" in capsys.readouterr().err


def broken_model(data, tmp_path, case) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / case
    shutil.copytree(data["model"], folder)
    weights = folder / "model.safetensors"
    config = json.loads((folder / "config.json").read_text())
    if case == "nan_weights":
        tensors = load_file(weights)
        for name in tensors:
            if name.startswith("decoder."):
                tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, weights, metadata={"format": "pt"})
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "garbage":
        weights.write_bytes(bytes(range(256)) * 40)
    elif case == "pickle":
        tensors = dict(load_file(weights), extra=argparse.Namespace(x=1))
        weights.unlink()
        torch.save(tensors, folder / "pytorch_model.bin")
    elif case == "shapes":
        (folder / "config.json").write_text(json.dumps({**config, "hidden_dim": 96}))
    elif case == "config_string":
        (folder / "config.json").write_text(json.dumps({**config, "num_proposals": "ten"}))
    elif case == "config_negative":
        (folder / "config.json").write_text(json.dumps({**config, "hidden_dim": -5}))
    elif case == "config_list":
        (folder / "config.json").write_text("[1, 2]")
    elif case == "processor":
        (folder / "processor_config.json").write_text("{bad")
    return folder


BROKEN_MODELS = {
    "nan_weights": "weights hold NaN or infinite values (decoder.",
    "truncated": "model.safetensors is damaged or incomplete",
    "garbage": "model.safetensors is damaged or incomplete",
    "pickle": "was refused, since unpickling them could run code",
    "shapes": "has shape [64] where the folder's config.json gives [96]",
    "config_string": "config.json: num_proposals must be an integer of at least 1, got 'ten'",
    "config_negative": "config.json: hidden_dim must be an integer of at least 1, got -5",
    "config_list": "config.json: it must hold a JSON object",
    "processor": "processor_config.json' is not a valid JSON file",
}


@pytest.mark.parametrize("case", sorted(BROKEN_MODELS))
def test_a_broken_model_folder_is_one_line_and_nothing_is_written(case, data, tmp_path, capsys):
    # Before: tracebacks from torch, safetensors or transformers (the pickle one advising weights_only=False), a
    # run.json left behind, the broken processor file silently replaced by defaults, and NaN weights giving
    # "0 segments" with exit 0.
    from eovseg.cli import main as cli_main

    folder = broken_model(data, tmp_path, case)
    capsys.readouterr()
    for command in (["predict", str(data["paths"][0]), "--output_dir", str(tmp_path / "out")],
                    ["demo", "--image", str(data["paths"][0]), "--output_dir", str(tmp_path / "out")]):
        assert cli_main([*command, "--model", str(folder), "--classes", *CLASSES]) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
        assert len(lines) == 1 and BROKEN_MODELS[case] in lines[0] and str(folder) in lines[0], lines
        assert "weights_only" not in lines[0]
        assert not (tmp_path / "out").exists()


def test_non_finite_outputs_stop_the_run_and_leave_no_files(data, tmp_path, capsys, monkeypatch):
    # Finite weights that overflow: before the fix every input was segmented into nothing, exit 0.
    from eovseg import EovSegForPanopticSegmentation

    forward = EovSegForPanopticSegmentation.forward

    def overflowing(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        outputs.masks_queries_logits[..., 0, 0] = float("inf")
        return outputs

    monkeypatch.setattr(EovSegForPanopticSegmentation, "forward", overflowing)
    output = tmp_path / "out"
    assert predict_main(run_args(data, output, *map(str, data["paths"][:2]))) == 1
    err = capsys.readouterr().err
    assert "masks_queries_logits hold NaN or infinite values" in err and "Traceback" not in err
    assert not output.exists()
    output.mkdir()  # an empty folder the user made stays, empty
    assert predict_main(run_args(data, output, *map(str, data["paths"][:2]))) == 1
    assert output.is_dir() and list(output.iterdir()) == []


def test_a_run_that_segments_nothing_fails_and_leaves_no_files(data, tmp_path, capsys):
    # Every input unreadable: before the fix an empty panoptic.json and the run's state were left, exit 1.
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a picture")
    output = tmp_path / "out"
    assert predict_main(run_args(data, output, str(garbage))) == 1
    err = capsys.readouterr().err
    assert "nothing segmented: every input was skipped" in err and "Traceback" not in err
    assert not output.exists()
    # a good input beside it: the run succeeds for it and names the skipped one
    assert predict_main(run_args(data, output, str(garbage), str(data["paths"][0]))) == 1
    assert (output / "panoptic.json").is_file()


def test_bad_arguments_write_nothing_and_the_corrected_run_is_not_refused(data, tmp_path, capsys):
    # Before the fix a bad --threshold or --model left run.json, and the corrected run was refused ("other settings").
    output = tmp_path / "out"
    image = str(data["paths"][0])
    for bad, message in ((["--threshold", "5"], "must be a probability between 0 and 1, got '5'"),
                         (["--threshold", "nan"], "expected a finite number within float32's range, got 'nan'"),
                         (["--mask_threshold", "-1"], "must be a probability between 0 and 1, got '-1'"),
                         (["--batch_size", "0"], "must be a positive integer, got '0'")):
        assert predict_main(run_args(data, output, image) + bad) == 2
        assert f"argument {bad[0]}: {message}" in capsys.readouterr().err
        assert not output.exists()
    bad_model = broken_model(data, tmp_path, "config_negative")
    assert predict_main([image, "--output_dir", str(output), "--model", str(bad_model), "--classes", "a"]) == 1
    assert predict_main([image, "--output_dir", str(output), "--stuff", "road"]) == 1
    assert "give --classes too" in capsys.readouterr().err
    assert predict_main([str(tmp_path / "missing.png"), "--output_dir", str(output)]) == 1
    assert "nothing to segment" in capsys.readouterr().err
    assert predict_main(run_args(data, Path(image) / "out", image)) == 1
    assert f"{image!r} is a file" in capsys.readouterr().err
    assert not output.exists()
    assert predict_main(run_args(data, output, image) + ["--threshold", "0.5"]) == 0


def test_python_m_eovseg_predict_gives_one_line(data, tmp_path):
    folder = broken_model(data, tmp_path, "config_string")
    run = subprocess.run([sys.executable, "-m", "eovseg.predict", str(data["paths"][0]), "--output_dir",
                          str(tmp_path / "out"), "--model", str(folder)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith("num_proposals must be an integer of at least 1, got 'ten'.")


def test_progress_counts_inputs_and_each_video_frame(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_DELAY", "0")  # drawn at once: these steps are shorter than a bar's usual delay
    images = [str(p) for p in data["paths"][:3]]
    args = run_args(data, tmp_path / "out", *images, str(data["video"]))
    assert predict_main([*args[:-3], "--batch_size", "1"]) == 0  # without --instances, one image per pass
    err = capsys.readouterr().err
    assert "eovseg predict: 100%" in err and "4/4" in err  # three images and the video: one step each
    assert f"clip.mp4: {VIDEO_FRAMES}frame" in err  # the video's own bar, by frame


def same_json(ours, theirs, abs_tol: float = 2e-6, rel_tol: float = 0.0) -> bool:
    """Equal JSON-like values (dicts, lists, tuples), floats within `abs_tol` or `rel_tol` (by default 2e-6: one unit
    of the 6 decimals written, plus round-off), NaN equal to NaN."""
    if isinstance(ours, dict):
        return isinstance(theirs, dict) and ours.keys() == theirs.keys() and all(
            same_json(ours[k], theirs[k], abs_tol, rel_tol) for k in ours)
    if isinstance(ours, (list, tuple)):
        return isinstance(theirs, (list, tuple)) and len(ours) == len(theirs) and all(
            same_json(a, b, abs_tol, rel_tol) for a, b in zip(ours, theirs))
    if isinstance(ours, float) or isinstance(theirs, float):
        if not isinstance(theirs, (int, float)) or not isinstance(ours, (int, float)):
            return False
        if math.isnan(ours) or math.isnan(theirs):
            return math.isnan(ours) and math.isnan(theirs)
        return math.isclose(ours, theirs, rel_tol=rel_tol, abs_tol=abs_tol)
    return ours == theirs


def assert_same_files(ours: dict[str, bytes], theirs: dict[str, bytes]) -> None:
    """Two runs' files (`tree`): the same names, PNGs byte for byte, JSON with scores within their rounding."""
    assert sorted(ours) == sorted(theirs)
    for name, content in ours.items():
        if name.endswith(".json"):  # scores are written to 6 decimals: a 1e-7 difference may round either way
            assert same_json(json.loads(content), json.loads(theirs[name])), name
        else:
            assert content == theirs[name], name


def test_a_batch_of_mixed_sizes_gives_the_results_of_one_image_at_a_time(data, tmp_path):
    """`--batch_size` batches an image only with images of its processed (resized and padded) size: padded to
    another image's size, its segments would change."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    sizes = [(48, 64), (48, 96), (96, 96), (48, 64), (48, 96), (64, 48)]  # processed: 64x64, 32x64, 64x64, ...
    for i, ((height, width), row) in enumerate(zip(sizes, data["rows"])):
        row["image"].resize((width, height)).save(folder / f"{i}.png")
    runs = {}
    for batch in (1, 4):
        assert predict_main([str(folder), "--output_dir", str(tmp_path / f"batch{batch}"), "--model", str(data["model"]),
                             "--classes", *CLASSES, "--stuff", *STUFF, "--batch_size", str(batch)]) == 0
        runs[batch] = {k: v for k, v in tree(tmp_path / f"batch{batch}").items() if ".eovseg-predict" not in k}
    segments = [s for a in json.loads(runs[1]["panoptic.json"])["annotations"] for s in a["segments_info"]]
    assert len(segments) >= len(sizes)
    assert_same_files(runs[4], runs[1])


def test_predictor_runs_each_processed_size_in_one_pass_and_keeps_the_order(data):
    """The Predictor's batches: one forward pass per processed size, holding every image of that size; results in
    the order of the images."""
    from eovseg.predictor import Predictor
    from eovseg.processing import EovSegProcessor

    predictor = Predictor.__new__(Predictor)  # the grouping only: no model
    predictor.processor = EovSegProcessor.from_pretrained(data["model"])  # shortest edge 48, longest 64, padded to 32
    passes = []

    def segment(images, instances):
        passes.append([image.size for image in images])
        return [image.size for image in images]

    predictor._segment = segment
    # (width, height): processed 64x64, 32x64, 64x64, 64x64, 32x64, 64x64
    sizes = [(64, 48), (96, 48), (96, 96), (64, 48), (96, 48), (48, 64)]
    assert predictor([Image.new("RGB", size) for size in sizes]) == sizes
    assert passes == [[(64, 48), (96, 96), (64, 48), (48, 64)], [(96, 48), (96, 48)]]
    with pytest.raises(ValueError, match="at least 2 pixels"):
        predictor([Image.new("RGB", (64, 1))])

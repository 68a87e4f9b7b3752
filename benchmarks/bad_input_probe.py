"""Bad-input probe: several hundred bad inputs across every command and the Python API, each run as a new user would,
each outcome classified. Prints a table of categories and outcomes, writes one JSON line per case.

    python benchmarks/bad_input_probe.py [--workdir /tmp/eovseg-probe] [--only SUBSTRING] [--list]

Outcomes:
- refused: a clean refusal (CLI: exit 1 or 2 with one `... error: ...` line and no traceback; API: an exception of
  the documented kinds, ValueError / TypeError / OSError / KeyError and their subclasses, with a one-line message),
  the user's files unchanged and nothing left behind.
- accepted: the command or call succeeded where the case allows it (`either`).
- CRASH: the process died (a signal, e.g. a segmentation fault), or the case ran past its time limit.
- LOST: a file the user owned was changed or removed.
- SILENT: a bad input was accepted without an error.
- POOR: refused, but with a traceback, a message of several lines or none, an exception of another kind (from deep
  inside a library), or files left behind.

Cases run in a worker process (one import of torch for all); a worker that dies is recorded as a crash of its case
and replaced. Nothing here reaches the network.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"

CASE_SECONDS = 120
OK_EXCEPTIONS = (ValueError, TypeError, OSError, KeyError)
USER_FILE = "notes.txt"


@dataclass
class Case:
    name: str
    category: str
    argv: list[str] | None = None  # an `eovseg` command line; "{out}" is the case's fresh output path
    call: Callable[[Path], Any] | None = None  # an API call, given the case's folder
    expect: str = "refuse"  # or "either": a clean success is fine too
    user_files: dict[str, bytes] = field(default_factory=dict)  # planted in {out} before the run


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: made once by the parent, read by every worker
# ----------------------------------------------------------------------------------------------------------------------


def make_fixtures(root: Path) -> None:
    import datasets
    import numpy as np
    import torch
    from PIL import Image

    from eovseg import EovSegConfig, EovSegForPanopticSegmentation
    from eovseg.conversion_scripts.key_mapping import ours_to_original_key
    from eovseg.demo import default_model_path
    from eovseg.synthetic import make_synthetic_panoptic_dataset

    datasets.disable_progress_bars()
    (root / "images").mkdir(parents=True)
    data = make_synthetic_panoptic_dataset(num_images=3, height=64, width=64, seed=1)
    data.select(range(2)).save_to_disk(str(root / "data_ok"))
    image = data[0]["image"].convert("RGB")
    image.save(root / "images" / "ok.png")
    (root / "clean").mkdir()
    image.save(root / "clean" / "ok.png")
    _make_bad_images(root / "images", np.asarray(image))
    _make_bad_datasets(root, data)
    _make_bad_models(root, Path(default_model_path()))
    _make_vocabulary_files(root / "vocab")
    torch.manual_seed(0)
    tiny = EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny"))
    state = {ours_to_original_key(k): v for k, v in tiny.state_dict().items() if k != "default_text_embeddings"}
    _make_bad_checkpoints(root / "ckpt", state)


def _make_bad_images(folder: Path, rgb) -> None:
    import numpy as np
    from PIL import Image

    good = (folder / "ok.png").read_bytes()
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "random.png").write_bytes(os.urandom(2048))
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(folder / "sixteen_bit.png")
    Image.fromarray(rgb[..., 0].astype(np.float32) / 255.0).save(folder / "float.tiff")
    Image.fromarray(rgb[..., 0].astype(np.int32) * 1000).save(folder / "int32.tiff")
    Image.fromarray(rgb[:1, :1]).save(folder / "one_pixel.png")
    Image.fromarray(rgb[:1]).save(folder / "one_row.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("LA").save(folder / "grey_alpha.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif")
    (folder / "dir.png").mkdir()
    os.symlink(folder / "missing_target.png", folder / "broken_link.png")
    (folder / "video.mp4").write_bytes(os.urandom(4096))
    (folder / "empty_dir").mkdir()
    # a PNG header announcing 60000 x 60000 pixels (a decompression bomb)
    header = bytearray(good[:33])
    header[16:24] = (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big")
    (folder / "bomb.png").write_bytes(bytes(header) + good[33:])


def _make_bad_datasets(root: Path, data) -> None:
    import datasets

    data.select(range(2)).remove_columns(["segments_info"]).save_to_disk(str(root / "data_no_segments"))

    def unknown_category(row):
        row["segments_info"] = [dict(s, category_id=999) for s in row["segments_info"]]
        return row

    data.select(range(2)).map(unknown_category).save_to_disk(str(root / "data_unknown_category"))
    data.select([]).save_to_disk(str(root / "data_empty"))
    plain = datasets.Dataset.from_dict({"image": [row["image"] for row in data.select(range(2))]})
    plain.save_to_disk(str(root / "data_images_only"))
    (root / "data_garbage.parquet").write_bytes(os.urandom(1024))
    (root / "data_empty.jsonl").write_text("")
    (root / "coco_bad.json").write_text('{"images": [], "annotations": [{"file_name": "x.png"}]}')
    (root / "coco_garbage.json").write_text("{not json")


def _make_bad_models(root: Path, demo: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(demo / "model.safetensors"))

    def variant(name: str, edit: Callable[[Path], None]) -> None:
        folder = root / "models" / name
        shutil.copytree(demo, folder)
        edit(folder)

    def save(folder: Path, tensors) -> None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    variant("nan_weights", lambda f: save(f, {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                              for k, v in weights.items()}))
    variant("truncated", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]))
    variant("garbage", lambda f: (f / "model.safetensors").write_bytes(os.urandom(5000)))
    variant("wrong_shapes", lambda f: save(f, {k: (v[..., :1].clone() if v.ndim > 1 else v) for k, v in weights.items()}))
    first_tower_key = next(k for k in weights if "clip" in k.lower())
    variant("missing_tower_weight", lambda f: save(f, {k: v for k, v in weights.items() if k != first_tower_key}))
    variant("no_config", lambda f: (f / "config.json").unlink())
    variant("config_garbage", lambda f: (f / "config.json").write_text("{ this is not json"))
    for field_name, value in (("hidden_dim", -1), ("num_queries", "many"), ("num_stages", 0), ("geometric_ensemble_alpha", 7.0)):
        def bogus(folder: Path, key=field_name, val=value) -> None:
            config = json.loads((folder / "config.json").read_text())
            config[key] = val
            (folder / "config.json").write_text(json.dumps(config))

        variant(f"config_{field_name}", bogus)

    def pickled(folder: Path) -> None:
        (folder / "model.safetensors").unlink()
        torch.save(dict(weights), folder / "pytorch_model.bin")

    variant("pickle_only", pickled)

    def pickled_code(folder: Path) -> None:
        (folder / "model.safetensors").unlink()
        torch.save({**weights, "payload": _CodeRunsOnLoad(str(root / "EXECUTED"))}, folder / "pytorch_model.bin")

    variant("pickle_running_code", pickled_code)
    (root / "models" / "empty").mkdir()
    (root / "models" / "a_file").write_text("not a folder\n")


def _make_vocabulary_files(folder: Path) -> None:
    folder.mkdir()
    (folder / "empty.json").write_text("[]")
    (folder / "not_json.json").write_text("{oops")
    (folder / "dict.json").write_text('{"a": 1}')
    (folder / "duplicates.json").write_text('[{"name": "cat", "isthing": 1}, {"name": "cat", "isthing": 1}]')
    (folder / "flag_no.json").write_text('[{"name": "cat", "isthing": "no"}]')
    (folder / "empty_name.json").write_text('[{"name": "", "isthing": 1}]')
    (folder / "numbers.json").write_text("[1, 2, 3]")
    (folder / "empty.txt").write_text("")


class _CodeRunsOnLoad:
    """A pickle that, if ever unpickled, creates a marker file: no command may execute it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _make_bad_checkpoints(folder: Path, state: dict) -> None:
    import torch

    folder.mkdir()
    torch.save({"model": state}, folder / "ok.pth")
    good = (folder / "ok.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(good[: len(good) // 2])
    (folder / "garbage.pth").write_bytes(os.urandom(4096))
    (folder / "empty.pth").write_bytes(b"")
    flipped = bytearray(good)
    middle = len(flipped) // 2
    flipped[middle : middle + 500] = bytes(b ^ 0xFF for b in flipped[middle : middle + 500])
    (folder / "flipped.pth").write_bytes(bytes(flipped))
    nan_state = dict(state)
    key = next(k for k, v in state.items() if v.is_floating_point())
    nan_state[key] = torch.full_like(state[key], float("nan"))
    torch.save({"model": nan_state}, folder / "nan.pth")
    torch.save({"model": {k: v for i, (k, v) in enumerate(state.items()) if i % 2}}, folder / "half_keys.pth")
    shapes = {k: (v.flatten()[:1].clone() if v.ndim else v) for k, v in state.items()}
    torch.save({"model": shapes}, folder / "wrong_shapes.pth")
    torch.save({"model": state, "payload": _CodeRunsOnLoad(str(folder / "EXECUTED"))}, folder / "code.pth")
    torch.save([1, 2, 3], folder / "a_list.pth")


# ----------------------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------------------

NUMBER_VALUES = {"abc": "refuse", "": "refuse", "nan": "refuse", "inf": "refuse", "-1": "refuse", "1e400": "refuse"}
# options whose negative or infinite values have a meaning
ALLOWED = {
    ("train", "--seed", "-1"): "either",
    ("train", "--ignore_index", "-1"): "either",
    ("evaluate", "--ignore_index", "-1"): "either",
    ("train", "--max_train_seconds", "inf"): "either",
}


def build_cases(fx: Path) -> list[Case]:
    cases: list[Case] = []
    for build in (_option_cases, _file_cases, _model_cases, _data_cases, _vocabulary_cases, _checkpoint_cases,
                  _combination_cases, _api_cases):
        cases.extend(build(fx))
    return cases


def _base_args(fx: Path) -> dict[str, list[str]]:
    """A valid, tiny command line of each command (a bad value replaces or joins one of its options)."""
    return {
        "demo": ["demo", "--image", str(fx / "images/ok.png"), "--output_dir", "{out}"],
        "predict": ["predict", str(fx / "images/ok.png"), "--output_dir", "{out}"],
        "train": ["train", "--model", "tiny", "--dataset", "synthetic", "--synthetic_train_images", "2",
                  "--synthetic_eval_images", "1", "--synthetic_image_size", "64", "--image_size", "64",
                  "--max_steps", "1", "--output_dir", "{out}", "--no_progress"],
        "evaluate": ["evaluate", "--model", "random:tiny", "--dataset", "synthetic", "--num_synthetic", "1",
                     "--no_progress"],
        "convert": ["convert", "--checkpoint_path", str(fx / "ckpt/ok.pth"), "--variant", "tiny",
                    "--output_dir", "{out}"],
        "app": ["app", "--port", "0"],
    }


def _numeric_options(command: str) -> list[tuple[str, Any]]:
    import importlib

    from eovseg.cli import COMMANDS

    module = importlib.import_module(COMMANDS[command])
    parser = module.build_parser()
    options = []
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        kind = getattr(action.type, "__name__", str(action.type))
        name = action.option_strings[-1]
        if action.type in (int, float) or any(word in kind for word in ("int", "float", "positive", "fraction", "probab")):
            options.append((name, action))
    return options


def _option_cases(fx: Path) -> list[Case]:
    cases = []
    for command, base in _base_args(fx).items():
        for option, _action in _numeric_options(command):
            for value, expect in NUMBER_VALUES.items():
                expect = ALLOWED.get((command, option, value), expect)
                argv = _with_option(base, option, value)
                cases.append(Case(f"{command} {option} {value!r}", f"{command}: numeric option", argv, expect=expect))
    for command, option in (("train", "--max_steps"), ("train", "--gradient_accumulation_steps"),
                            ("train", "--per_device_batch_size"), ("evaluate", "--shortest_edge"),
                            ("evaluate", "--batch_size"), ("evaluate", "--max_samples"), ("predict", "--batch_size"),
                            ("train", "--synthetic_image_size"), ("train", "--image_size"), ("evaluate", "--longest_edge")):
        cases.append(Case(f"{command} {option} 0", f"{command}: numeric option", _with_option(_base_args(fx)[command], option, "0")))
    for command, option, value in (("train", "--flip_probability", "2"), ("train", "--min_scale", "3"),
                                   ("train", "--max_scale", "0.05"), ("predict", "--threshold", "1.5"),
                                   ("predict", "--mask_threshold", "7"), ("app", "--port", "99999"),
                                   ("app", "--port", "-5"), ("train", "--image_label_ratio", "1.5"),
                                   ("evaluate", "--threshold", "2"), ("train", "--mixed_precision", "fp8"),
                                   ("evaluate", "--task", "depth"), ("convert", "--variant", "r101"),
                                   ("train", "--warmup_iters", "-3"), ("train", "--lr_steps", "-5"),
                                   ("evaluate", "--device", "quantum")):
        cases.append(Case(f"{command} {option} {value}", f"{command}: out-of-range option",
                          _with_option(_base_args(fx)[command], option, value)))
    for command in _base_args(fx):
        cases.append(Case(f"{command} --no_such_option", "usage", _base_args(fx)[command] + ["--no_such_option"]))
    cases.append(Case("eovseg no_such_command", "usage", ["no_such_command"]))
    cases.append(Case("eovseg (no argument)", "usage", [], expect="either"))
    return cases


def _with_option(base: list[str], option: str, value: str) -> list[str]:
    argv = list(base)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


def _file_cases(fx: Path) -> list[Case]:
    """Unreadable, odd or missing images through demo and predict (the same file must get the same answer)."""
    cases = []
    either = {"sixteen_bit.png", "cmyk.jpg", "grey_alpha.png", "palette.gif", "one_row.png", "one_pixel.png",
              "float.tiff", "empty_dir"}
    names = sorted(p.name for p in (fx / "images").iterdir() if p.name != "ok.png") + ["no_such_file.png"]
    for name in names:
        path = str(fx / "images" / name)
        expect = "either" if name in either else "refuse"
        cases.append(Case(f"demo --image {name}", "images", ["demo", "--image", path, "--output_dir", "{out}"], expect=expect))
        cases.append(Case(f"predict {name}", "images", ["predict", path, "--output_dir", "{out}"], expect=expect))
    ok = str(fx / "images/ok.png")
    cases.append(Case("predict output folder inside its input", "images",
                      ["predict", str(fx / "clean"), "--output_dir", str(fx / "clean" / "out")], expect="either"))
    cases.append(Case("predict --output_dir is a file", "images", ["predict", ok, "--output_dir", "{out}/notes.txt"],
                      user_files={USER_FILE: b"mine\n"}))
    cases.append(Case("demo --output_dir is a file", "images", ["demo", "--image", ok, "--output_dir", "{out}/notes.txt"],
                      user_files={USER_FILE: b"mine\n"}))
    cases.append(Case("demo replaces a user's file of its name", "images",
                      ["demo", "--image", ok, "--output_dir", "{out}"],
                      user_files={"ok_panoptic.png": b"the user's own picture\n"}))
    cases.append(Case("predict with no input", "usage", ["predict", "--output_dir", "{out}"]))
    return cases


def _model_cases(fx: Path) -> list[Case]:
    cases = []
    ok = str(fx / "images/ok.png")
    for folder in sorted((fx / "models").iterdir()):
        model = str(folder)
        for command, argv in (("demo", ["demo", "--model", model, "--image", ok, "--output_dir", "{out}"]),
                              ("predict", ["predict", ok, "--model", model, "--output_dir", "{out}"]),
                              ("evaluate", ["evaluate", "--model", model, "--dataset", "synthetic", "--num_synthetic",
                                            "1", "--no_progress"]),
                              ("train", _with_option(_base_args(fx)["train"], "--model", model))):
            # a pickle of tensors alone is read safely (weights_only), as transformers reads it
            expect = "either" if folder.name == "pickle_only" else "refuse"
            cases.append(Case(f"{command} --model {folder.name}", "model folders", argv, expect=expect))
    for name in ("no_such_folder", "user/repo-that-is-not-here"):
        cases.append(Case(f"predict --model {name}", "model folders", ["predict", ok, "--model", name, "--output_dir", "{out}"]))
    return cases


def _data_cases(fx: Path) -> list[Case]:
    cases = []
    for name in ("data_no_segments", "data_unknown_category", "data_empty", "data_images_only", "data_garbage.parquet",
                 "data_empty.jsonl", "coco_bad.json", "coco_garbage.json", "no_such_data"):
        path = str(fx / name)
        cases.append(Case(f"train --dataset {name}", "data sets", _with_option(_base_args(fx)["train"], "--dataset", path)))
        cases.append(Case(f"train --eval_dataset {name}", "data sets",
                          _base_args(fx)["train"] + ["--eval_dataset", path, "--categories", "shapes"]))
        cases.append(Case(f"evaluate --dataset {name}", "data sets",
                          ["evaluate", "--model", "random:tiny", "--dataset", path, "--no_progress"]))
    # the synthetic data set stores its categories: accepted
    cases.append(Case("train --dataset of the synthetic rows", "data sets",
                      _with_option(_base_args(fx)["train"], "--dataset", str(fx / "data_ok")), expect="either"))
    return cases


def _vocabulary_cases(fx: Path) -> list[Case]:
    cases = []
    ok = str(fx / "images/ok.png")
    specs = [str(p) for p in sorted((fx / "vocab").iterdir())] + ["no_such_vocabulary", "ade20k_150,extra", ""]
    for spec in specs:
        label = Path(spec).name or repr(spec)
        cases.append(Case(f"demo --vocabulary {label}", "vocabularies",
                          ["demo", "--image", ok, "--vocabulary", spec, "--output_dir", "{out}"]))
        cases.append(Case(f"predict --vocabulary {label}", "vocabularies",
                          ["predict", ok, "--vocabulary", spec, "--output_dir", "{out}"]))
        cases.append(Case(f"evaluate --vocabulary {label}", "vocabularies",
                          _base_args(fx)["evaluate"] + ["--vocabulary", spec]))
    for classes in ([""], [",", "cat"], ["cat", "cat"], [" "]):
        cases.append(Case(f"predict --classes {classes!r:.30}", "vocabularies",
                          ["predict", ok, "--classes", *classes, "--output_dir", "{out}"]))
    # a name longer than the text tower's context is cut, with a warning
    cases.append(Case("predict --classes of 5000 letters", "vocabularies",
                      ["predict", ok, "--classes", "x" * 5000, "--output_dir", "{out}"], expect="either"))
    cases.append(Case("predict --stuff without --classes", "vocabularies",
                      ["predict", ok, "--stuff", "sky", "--output_dir", "{out}"]))
    cases.append(Case("predict --stuff not among --classes", "vocabularies",
                      ["predict", ok, "--classes", "cat", "--stuff", "sky", "--output_dir", "{out}"]))
    cases.append(Case("demo --stuff without --classes", "vocabularies",
                      ["demo", "--image", ok, "--stuff", "sky", "--output_dir", "{out}"]))
    return cases


def _checkpoint_cases(fx: Path) -> list[Case]:
    cases = []
    for path in sorted((fx / "ckpt").glob("*.pth")):
        if path.name == "ok.pth":
            continue
        cases.append(Case(f"convert {path.name}", "checkpoints",
                          ["convert", "--checkpoint_path", str(path), "--variant", "tiny", "--output_dir", "{out}"]))
    ok = str(fx / "ckpt/ok.pth")
    for variant in ("r50", "convnext_l"):
        cases.append(Case(f"convert tiny checkpoint as {variant}", "checkpoints",
                          ["convert", "--checkpoint_path", ok, "--variant", variant, "--output_dir", "{out}"]))
    cases.append(Case("convert into a non-empty folder", "checkpoints",
                      ["convert", "--checkpoint_path", ok, "--variant", "tiny", "--output_dir", "{out}"],
                      user_files={"config.json": b"the user's own config\n"}))
    cases.append(Case("convert --checkpoint_path missing", "checkpoints",
                      ["convert", "--checkpoint_path", str(fx / "nope.pth"), "--variant", "tiny", "--output_dir", "{out}"]))
    cases.append(Case("convert --push_to_hub offline", "checkpoints",
                      _base_args(fx)["convert"] + ["--push_to_hub", "someone/model"]))
    cases.append(Case("convert --stuff_ids out of range", "checkpoints", _base_args(fx)["convert"] + ["--stuff_ids", "9999"]))
    return cases


def _combination_cases(fx: Path) -> list[Case]:
    train = _base_args(fx)["train"]
    return [
        Case("train --resume_from_checkpoint latest, no checkpoint", "training runs",
             train + ["--resume_from_checkpoint", "latest"], user_files={"metrics.jsonl": b'{"step": 1}\n'}),
        Case("train --resume_from_checkpoint missing path", "training runs",
             train + ["--resume_from_checkpoint", str(fx / "no_checkpoint")]),
        Case("train into a user's folder", "training runs", train, user_files={USER_FILE: b"mine\n"}),
        Case("train --push_to_hub offline", "training runs", train + ["--push_to_hub", "someone/model"]),
        Case("train --learning_rate 1e30, 3 steps", "training runs",
             _with_option(_with_option(train, "--learning_rate", "1e30"), "--max_steps", "3")),
        Case("train --config_overrides garbage", "training runs", train + ["--config_overrides", "{not json"]),
        Case("train --config_overrides bogus value", "training runs", train + ["--config_overrides", '{"hidden_dim": -4}']),
        Case("train --categories missing file", "training runs", train + ["--categories", str(fx / "nope.json")]),
        Case("evaluate --output is a folder", "evaluation", _base_args(fx)["evaluate"] + ["--output", str(fx / "images")]),
        Case("evaluate --output exists", "evaluation", _base_args(fx)["evaluate"] + ["--output", "{out}/notes.txt"],
             user_files={USER_FILE: b"mine\n"}),
        Case("evaluate --model random:nonsense", "evaluation", _with_option(_base_args(fx)["evaluate"], "--model", "random:x")),
        Case("evaluate --split missing", "evaluation",
             ["evaluate", "--model", "random:tiny", "--dataset", str(fx / "data_ok"), "--split", "nope", "--no_progress"]),
        Case("app --host not an address", "app", ["app", "--host", "not an address!", "--port", "0"]),
        Case("app --model missing", "app", ["app", "--model", str(fx / "nope"), "--port", "0"]),
    ]


def _api_cases(fx: Path) -> list[Case]:
    """The Python API: processor, model, post-processing, vocabularies, pipelines."""
    cases = []

    def add(name: str, category: str, call: Callable[[Path], Any], expect: str = "refuse") -> None:
        cases.append(Case(name, f"API: {category}", call=call, expect=expect))

    def model_and_processor():
        from eovseg.auto_registration import load_model_folder
        from eovseg.demo import default_model_path

        return load_model_folder(default_model_path())

    def run_model(**inputs):
        model, _ = model_and_processor()
        return model(**inputs)

    def processor_call(**kwargs):
        _, processor = model_and_processor()
        return processor(**kwargs)

    def post(method: str, outputs_of=None, **kwargs):
        import torch

        model, processor = model_and_processor()
        if outputs_of is None:
            with torch.no_grad():
                outputs = model(pixel_values=torch.zeros(1, 3, 64, 64))
        else:
            outputs = outputs_of(model)
        return getattr(processor, method)(outputs, **kwargs)

    import numpy as np

    bad_images = {
        "None": None, "a string that is no file": "no_such_image.png", "an int": 7, "empty array": np.zeros((0, 0, 3), np.uint8),
        "4-D array": np.zeros((1, 2, 8, 8, 3), np.uint8), "NaN float array": np.full((8, 8, 3), np.nan, np.float32),
        "complex array": np.zeros((8, 8, 3), np.complex64), "object array": np.array([[object()]]),
        "5 channels": np.zeros((8, 8, 5), np.uint8), "negative floats": np.full((8, 8, 3), -3.0, np.float32),
        "list of nothing": [], "dict": {"a": 1},
        "a folder": str(fx / "images"), "garbage file": str(fx / "images/random.png"),
    }
    for label, image in bad_images.items():
        add(f"processor(images={label})", "processor", lambda _, image=image: processor_call(images=image))
    for label, text in {"empty list": [], "None in list": ["cat", None], "int": 5, "nested": [["cat"]],
                        "empty string": [""], "only commas": [",,,"]}.items():
        add(f"processor(text={label})", "processor", lambda _, text=text: processor_call(images=np.zeros((8, 8, 3), np.uint8), text=text))
    for label, kwargs in {"return_tensors='xx'": {"return_tensors": "xx"}, "size=-5": {"size": -5},
                          "size='big'": {"size": "big"}, "size={}": {"size": {}}}.items():
        add(f"processor({label})", "processor",
            lambda _, kwargs=kwargs: processor_call(images=np.zeros((8, 8, 3), np.uint8), **kwargs))

    import torch

    model_inputs = {
        "pixel_values 3-D": {"pixel_values": torch.zeros(3, 64, 64)},
        "pixel_values 1 channel": {"pixel_values": torch.zeros(1, 1, 64, 64)},
        "pixel_values int": {"pixel_values": torch.zeros(1, 3, 64, 64, dtype=torch.int64)},
        "pixel_values NaN": {"pixel_values": torch.full((1, 3, 64, 64), float("nan"))},
        "pixel_values inf": {"pixel_values": torch.full((1, 3, 64, 64), float("inf"))},
        "pixel_values 0x0": {"pixel_values": torch.zeros(1, 3, 0, 0)},
        "pixel_values 2x2": {"pixel_values": torch.zeros(1, 3, 2, 2)},
        "pixel_values a list": {"pixel_values": [[0.0]]},
        "pixel_mask 10x10": {"pixel_values": torch.zeros(1, 3, 64, 64), "pixel_mask": torch.ones(1, 10, 10, dtype=torch.long)},
        "pixel_mask all zero": {"pixel_values": torch.zeros(1, 3, 64, 64), "pixel_mask": torch.zeros(1, 64, 64, dtype=torch.long)},
        "pixel_mask batch 2": {"pixel_values": torch.zeros(1, 3, 64, 64), "pixel_mask": torch.ones(2, 64, 64, dtype=torch.long)},
        "input_ids float": {"pixel_values": torch.zeros(1, 3, 64, 64), "input_ids": torch.zeros(2, 77)},
        "input_ids out of range": {"pixel_values": torch.zeros(1, 3, 64, 64), "input_ids": torch.full((2, 77), 10**6)},
        "text_embeddings NaN": {"pixel_values": torch.zeros(1, 3, 64, 64), "text_embeddings": torch.full((2, 512), float("nan"))},
        "text_embeddings wrong width": {"pixel_values": torch.zeros(1, 3, 64, 64), "text_embeddings": torch.zeros(2, 3)},
        "class_ensemble bogus": {"pixel_values": torch.zeros(1, 3, 64, 64), "class_ensemble": "bogus"},
        "mask_labels without class_labels": {"pixel_values": torch.zeros(1, 3, 64, 64), "mask_labels": [torch.zeros(1, 64, 64)]},
    }
    for label, inputs in model_inputs.items():
        add(f"model({label})", "model", lambda _, inputs=inputs: run_model(**inputs))

    def nan_outputs(model):
        with torch.no_grad():
            out = model(pixel_values=torch.zeros(1, 3, 64, 64))
        out.class_queries_logits = torch.full_like(out.class_queries_logits, float("nan"))
        return out

    methods = ("post_process_panoptic_segmentation", "post_process_semantic_segmentation",
               "post_process_instance_segmentation")
    post_kwargs = {
        "target_sizes as strings": {"target_sizes": ["64x64"]}, "target_sizes negative": {"target_sizes": [(-1, 64)]},
        "target_sizes wrong count": {"target_sizes": [(64, 64), (64, 64)]}, "threshold 5": {"threshold": 5.0},
        "label_ids_to_fuse outside": {"label_ids_to_fuse": {999}}, "threshold nan": {"threshold": float("nan")},
    }
    for method in methods:
        short = method.replace("post_process_", "").replace("_segmentation", "")
        add(f"{short}: NaN class logits", "post-processing", lambda _, m=method: post(m, nan_outputs))
        add(f"{short}: outputs None", "post-processing", lambda _, m=method: post(m, lambda model: None))
        add(f"{short}: outputs a dict", "post-processing", lambda _, m=method: post(m, lambda model: {"a": 1}))
        for label, kwargs in post_kwargs.items():
            if method.endswith("semantic_segmentation") and label in ("threshold 5", "label_ids_to_fuse outside", "threshold nan"):
                continue
            if method.endswith("instance_segmentation") and label == "label_ids_to_fuse outside":
                continue
            add(f"{short}: {label}", "post-processing", lambda _, m=method, kw=kwargs: post(m, **kw))

    from eovseg.vocabularies import build_vocabulary, get_vocabulary, load_vocabulary

    add("build_vocabulary is_thing 'no'", "vocabularies", lambda _: build_vocabulary(["a", "b"], is_thing=["no", "no"]))
    add("build_vocabulary is_thing too short", "vocabularies", lambda _: build_vocabulary(["a", "b"], is_thing=[True]))
    add("build_vocabulary empty", "vocabularies", lambda _: build_vocabulary([]))
    add("build_vocabulary of ints", "vocabularies", lambda _: build_vocabulary([1, 2]))
    add("get_vocabulary unknown", "vocabularies", lambda _: get_vocabulary("ade20k_9999"))
    add("load_vocabulary None", "vocabularies", lambda _: load_vocabulary(None), expect="either")
    add("load_vocabulary stuff outside", "vocabularies", lambda _: load_vocabulary(["cat", "dog"], stuff=["sky"]))

    from eovseg import EovSegConfig, EovSegForPanopticSegmentation

    for label, kwargs in {"variant unknown": {"variant": "r101"}, "num_queries -1": {"num_queries": -1},
                          "hidden_dim 'x'": {"hidden_dim": "x"}, "num_stages 0": {"num_stages": 0},
                          "geometric_ensemble_alpha 3": {"geometric_ensemble_alpha": 3.0}}.items():
        if "variant" in kwargs:
            add(f"EovSegConfig.from_variant({label})", "config", lambda _, kw=kwargs: EovSegConfig.from_variant(kw["variant"]))
        else:
            add(f"EovSegConfig({label})", "config", lambda _, kw=kwargs: EovSegConfig(**kw))

    add("from_pretrained missing local folder", "loading",
        lambda d: EovSegForPanopticSegmentation.from_pretrained(str(d / "no_such_folder")))
    for folder in sorted((fx / "models").iterdir()):
        if folder.name in ("nan_weights",):  # from_pretrained loads weights as stored; the commands refuse these
            continue
        add(f"from_pretrained {folder.name}", "loading",
            lambda _, f=folder: EovSegForPanopticSegmentation.from_pretrained(str(f)),
            expect="either" if folder.name == "pickle_only" else "refuse")

    def save_into_file(_: Path):
        model, _ = model_and_processor()
        model.save_pretrained(str(fx / "models" / "a_file"))

    add("save_pretrained into a file", "loading", save_into_file)

    def pipeline_call(**kwargs):
        from transformers import pipeline

        from eovseg.demo import default_model_path

        pipe = pipeline("open-vocabulary-segmentation", model=str(default_model_path()))
        return pipe(str(fx / "images/ok.png"), **kwargs)

    for label, kwargs in {"candidate_labels as one string": {"candidate_labels": "red circle, blue sky"},
                          "candidate_labels empty": {"candidate_labels": []},
                          "candidate_labels ints": {"candidate_labels": [1, 2]},
                          "subtask depth": {"subtask": "depth"}, "threshold -1": {"threshold": -1},
                          "stuff_labels without candidates": {"stuff_labels": ["sky"]}}.items():
        add(f"pipeline({label})", "pipelines", lambda _, kw=kwargs: pipeline_call(**kw))
    return cases


# ----------------------------------------------------------------------------------------------------------------------
# Running a case (in the worker) and classifying it
# ----------------------------------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def run_case(case: Case, folder: Path) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out = folder / "out"
    if case.user_files:
        out.mkdir()
        for name, content in case.user_files.items():
            (out / name).write_bytes(content)
    before = _snapshot(folder)
    start = time.time()
    if case.argv is not None:
        result = _run_cli([a.replace("{out}", str(out)) for a in case.argv])
    else:
        result = _run_api(case.call, folder)
    result["seconds"] = round(time.time() - start, 2)
    after = _snapshot(folder)
    result["lost"] = sorted(name for name, content in before.items() if after.get(name, b"<gone>") != content)
    result["left"] = sorted(name for name in after if name not in before)
    return result


class _CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _CaseTimeout()


def _run_cli(argv: list[str]) -> dict:
    from eovseg.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = None
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except _CaseTimeout:
        return {"kind": "cli", "timeout": True, "stderr": stderr.getvalue()[-400:]}
    except BaseException as err:  # an exception escaping the command is itself a finding
        return {"kind": "cli", "code": "exception", "exception": type(err).__name__, "stderr": traceback.format_exc()[-800:]}
    return {"kind": "cli", "code": code, "stderr": stderr.getvalue()[-2000:]}


def _run_api(call: Callable[[Path], Any], folder: Path) -> dict:
    try:
        call(folder)
    except _CaseTimeout:
        return {"kind": "api", "timeout": True}
    except BaseException as err:
        return {"kind": "api", "exception": type(err).__name__, "ok_type": isinstance(err, OK_EXCEPTIONS),
                "message": str(err)[:600], "module": type(err).__module__}
    return {"kind": "api", "exception": None}


def classify(case: Case, result: dict) -> str:
    if result.get("crash") or result.get("timeout"):
        return "CRASH"
    if result["lost"]:
        return "LOST"
    if result["kind"] == "cli":
        code = result["code"]
        if code == 0 or code is None:
            return "accepted" if case.expect == "either" else "SILENT"
        if code == "exception":
            return "POOR"
        lines = [line for line in _bare_lines(result["stderr"])]
        clean = code in (1, 2) and lines and "Traceback" not in result["stderr"] and "error" in lines[-1]
        if not clean or result["left"]:
            return "POOR"
        return "refused"
    if result["exception"] is None:
        return "accepted" if case.expect == "either" else "SILENT"
    message = result["message"].strip()
    if not result["ok_type"] or not message or "\n" in message or result["left"]:
        return "POOR"
    return "refused"


def _bare_lines(text: str) -> list[str]:
    """stderr without progress bars and library warnings."""
    keep = []
    for line in text.replace("\r", "\n").splitlines():
        if not line.strip() or "it/s]" in line or "%|" in line or line.startswith(("[transformers]", "WARNING", "warn")):
            continue
        keep.append(line)
    return keep


def worker(workdir: Path, start: int, results: Path, only: str | None) -> None:
    cases = _selected(build_cases(workdir / "fixtures"), only)
    signal.signal(signal.SIGALRM, _alarm)
    with results.open("a") as sink:
        for index in range(start, len(cases)):
            case = cases[index]
            sink.write(json.dumps({"index": index, "started": True}) + "\n")
            sink.flush()
            signal.alarm(CASE_SECONDS)
            result = run_case(case, workdir / "cases" / f"{index:04d}")
            signal.alarm(0)
            sink.write(json.dumps({"index": index, **result}) + "\n")
            sink.flush()


def _selected(cases: list[Case], only: str | None) -> list[Case]:
    return [c for c in cases if only is None or only in c.name or only in c.category]


# ----------------------------------------------------------------------------------------------------------------------
# The parent: fixtures, workers, report
# ----------------------------------------------------------------------------------------------------------------------


def _collect(results: Path) -> dict[int, dict]:
    done, started = {}, set()
    if results.exists():
        for line in results.read_text().splitlines():
            record = json.loads(line)
            if record.get("started"):
                started.add(record["index"])
            else:
                done[record["index"]] = record
    for index in started - set(done):
        done[index] = {"index": index, "crash": True, "lost": [], "left": []}
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/eovseg-probe", help="fixtures and case folders (made afresh)")
    parser.add_argument("--only", default=None, help="run only cases whose name or category contains this")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    results = workdir / "results.jsonl"
    if args.worker is not None:
        worker(workdir, args.worker, results, args.only)
        return 0
    if workdir.exists():
        shutil.rmtree(workdir)
    make_fixtures(workdir / "fixtures")
    cases = _selected(build_cases(workdir / "fixtures"), args.only)
    if args.list:
        for case in cases:
            print(f"{case.category:28s} {case.name}")
        print(f"{len(cases)} cases")
        return 0
    _run_workers(workdir, results, len(cases), args.only)
    report(cases, _collect(results), workdir)
    executed = sorted(str(p) for p in (workdir / "fixtures").rglob("EXECUTED"))
    print("a pickle's code RAN: " + ", ".join(executed) if executed else "no pickle's code ran")
    if not args.keep:
        shutil.rmtree(workdir / "cases", ignore_errors=True)
    return 0


def _run_workers(workdir: Path, results: Path, total: int, only: str | None) -> None:
    next_index = 0
    while next_index < total:
        command = [sys.executable, __file__, "--workdir", str(workdir), "--worker", str(next_index)]
        if only:
            command += ["--only", only]
        with open(workdir / "worker.log", "a") as log:
            subprocess.run(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        done = _collect(results)
        next_index = max(done) + 1 if done else total
        print(f"  ... {len(done)}/{total} cases", file=sys.stderr, flush=True)


def report(cases: list[Case], done: dict[int, dict], workdir: Path) -> None:
    table: dict[str, Counter] = defaultdict(Counter)
    findings = []
    with (workdir / "report.jsonl").open("w") as sink:
        for index, case in enumerate(cases):
            result = done.get(index, {"crash": True, "lost": [], "left": [], "missing": True})
            outcome = classify(case, result)
            table[case.category][outcome] += 1
            sink.write(json.dumps({"name": case.name, "category": case.category, "outcome": outcome, **result}) + "\n")
            if outcome not in ("refused", "accepted"):
                detail = result.get("message") or (_bare_lines(result.get("stderr", "")) or [""])[-1]
                findings.append(f"{outcome:8s} {case.name}: {str(detail)[:160]}")
    outcomes = ["refused", "accepted", "POOR", "SILENT", "LOST", "CRASH"]
    print(f"\n{'category':30s} " + " ".join(f"{o:>8s}" for o in outcomes) + "    total")
    totals = Counter()
    for category in sorted(table):
        totals.update(table[category])
        row = " ".join(f"{table[category][o]:8d}" for o in outcomes)
        print(f"{category:30s} {row} {sum(table[category].values()):8d}")
    print(f"{'all':30s} " + " ".join(f"{totals[o]:8d}" for o in outcomes) + f" {sum(totals.values()):8d}")
    print("\nFindings:" if findings else "\nNo findings.")
    for line in findings:
        print("  " + line)
    print(f"\nper-case records: {workdir / 'report.jsonl'}")


if __name__ == "__main__":
    sys.exit(main())

"""Makes transformers' common test mixins importable as `tests.test_*` (as in transformers' own tree), from the
source distribution of the installed version that scripts/fetch_transformers_tests.py unpacks into
`.cache/transformers-<version>/` (or from the folder named by `EOVSEG_TRANSFORMERS_TESTS`, e.g. a git checkout of the
same version, which needs none of the stand-ins below).

The sdist ships `tests/*.py` but not the modules those import from `tests/exporters`, `tests/generation`,
`tests/utils`, `tests/pipelines` and `utils/`. Where one is missing, a stand-in of ours takes its place:

- `ExportTesterMixin`: an empty base. Its torch.export battery is what EoMT turns off (`test_torch_exportable =
  False`); our own export test is tests/test_export.py.
- `GenerationTesterMixin`: an empty class; the mixins only test that a non-generative model does not inherit it.
- `config_common_kwargs`: the common `PreTrainedConfig` arguments, each with a non-default value.
- `url_to_local_path`: the Hub's fixture images (COCO cats, two ADE20k pairs) are replaced by generated images of the
  same sizes and modes, written to a temporary folder: tests never reach the Hub.
- `ImageSegmentationPipelineTests`: transformers' class reads a Hub data set; ours runs the same checks (output
  structure for RGB, RGBA, LA and L images; a batched call) on generated images, and compares the batched results
  with the one-by-one ones.

PipelineTesterMixin loads each model of a task from a "tiny model" folder: `TRANSFORMERS_TINY_MODEL_PATH` points it
to one written here (the tiny preset with both image-processor backends), as transformers allows for local runs.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import transformers

REPO = Path(__file__).resolve().parents[3]
SOURCES_ENV = "EOVSEG_TRANSFORMERS_TESTS"
WORK = Path(tempfile.mkdtemp(prefix="eovseg-transformers-common-"))
atexit.register(shutil.rmtree, WORK, True)


def transformers_sources() -> Path:
    """The folder holding transformers' `tests/` (and `src/transformers`) for the installed version."""
    folder = Path(os.environ.get(SOURCES_ENV) or REPO / ".cache" / f"transformers-{transformers.__version__}")
    if not (folder / "tests" / "__init__.py").is_file():
        raise pytest.UsageError(
            f"transformers' test sources for version {transformers.__version__} are not in {folder}: run "
            f"`python scripts/fetch_transformers_tests.py` (or set {SOURCES_ENV} to a transformers checkout of that "
            "version)"
        )
    return folder


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:
        return True


def _stand_in(name: str, **attributes) -> None:
    """Register module `name` (and its parent packages) unless the sources provide it."""
    if not _missing(name):
        return
    parts = name.split(".")
    for depth in range(1, len(parts)):
        package = ".".join(parts[:depth])
        if _missing(package):
            module = types.ModuleType(package)
            module.__path__ = []
            sys.modules[package] = module
    module = types.ModuleType(name, "Stand-in written by eovseg's tests/models/eovseg/conftest.py")
    module.__dict__.update(attributes)
    sys.modules[name] = module


# ------------------------------------------------------------------------------------------------ fixture images

# The Hub fixtures the mixins name, by file name: (width, height) and whether the file is a label map. Facts about
# those files; their content is generated here.
FIXTURE_IMAGES = {
    "000000039769.jpg": ((640, 480), False),
    "000000039769.png": ((640, 480), False),
    "coco_sample.png": ((640, 480), False),
    "ADE_val_00000001.jpg": ((683, 512), False),
    "ADE_val_00000001.png": ((683, 512), True),
    "ADE_val_00000002.jpg": ((683, 512), False),
    "ADE_val_00000002.png": ((683, 512), True),
}


def generated_image(size: tuple[int, int], label_map: bool, seed: int, mode: str = "RGB"):
    """A smooth scene of a few flat regions (so segmentation maps and resizing have edges to work on)."""
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    centres = rng.uniform(0, 1, (5, 2)) * (width, height)
    region = np.argmin([(x - cx) ** 2 + (y - cy) ** 2 for cx, cy in centres], axis=0)
    if label_map:
        return Image.fromarray(rng.choice(np.arange(1, 150), 5, replace=False)[region].astype(np.uint8), "L")
    colours = rng.integers(0, 256, (5, 3))
    noise = rng.integers(-8, 9, (height, width, 3))
    image = Image.fromarray(np.clip(colours[region] + noise, 0, 255).astype(np.uint8), "RGB")
    return image.convert(mode)


def url_to_local_path(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    if name not in FIXTURE_IMAGES:
        # videos and audio: a path that does not exist, so a test that reads one fails on it (tests run offline)
        return str(WORK / "not-generated" / name)
    path = WORK / "fixtures" / name
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        size, label_map = FIXTURE_IMAGES[name]
        # an image and its label map share the stem, hence the layout of their regions
        generated_image(size, label_map, seed=sum(map(ord, Path(name).stem))).save(path)
    return str(path)


# ------------------------------------------------------------------------------------------------ pipeline tests


class ImageSegmentationPipelineTests:
    """Stand-in for transformers' tests/pipelines/test_pipelines_image_segmentation.py (see the module docstring)."""

    def get_test_pipeline(self, model, tokenizer=None, image_processor=None, feature_extractor=None, processor=None,
                          dtype="float32"):
        from transformers import ImageSegmentationPipeline

        segmenter = ImageSegmentationPipeline(
            model=model, tokenizer=tokenizer, image_processor=image_processor, processor=processor, dtype=dtype
        )
        return segmenter, [url_to_local_path("000000039769.png")] * 2

    @staticmethod
    def _check(outputs, size):
        from PIL import Image

        assert isinstance(outputs, list) and outputs, outputs
        for segment in outputs:
            assert set(segment) == {"score", "label", "mask"}, segment
            assert segment["score"] is None or isinstance(segment["score"], float), segment
            assert isinstance(segment["label"], str), segment
            assert isinstance(segment["mask"], Image.Image) and segment["mask"].size == size, segment
        from huggingface_hub import ImageSegmentationOutputElement
        from transformers.testing_utils import compare_pipeline_output_to_hub_spec

        for segment in outputs:
            compare_pipeline_output_to_hub_spec(segment, ImageSegmentationOutputElement)

    def run_pipeline_test(self, segmenter, examples):
        options = {"threshold": 0.0, "mask_threshold": 0, "overlap_mask_area_threshold": 0}
        single = segmenter(examples[0], **options)
        self._check(single, (640, 480))
        for mode in ("RGBA", "LA", "L"):
            image = generated_image((96, 80), False, seed=len(mode), mode=mode)
            self._check(segmenter(image, **options), image.size)
        batched = segmenter([examples[0]] * 5, batch_size=2, **options)
        assert len(batched) == 5
        for outputs in batched:
            self._check(outputs, (640, 480))
            assert [s["label"] for s in outputs] == [s["label"] for s in single]
            for got, expected in zip(outputs, single):
                assert got["score"] == pytest.approx(expected["score"], rel=1e-4, abs=1e-6)
                assert np.array_equal(np.asarray(got["mask"]), np.asarray(expected["mask"]))


# ------------------------------------------------------------------------------------------------ tiny model folder

TINY_IMAGE_SIZE = {"shortest_edge": 64, "longest_edge": 128}


def image_processor_classes() -> dict:
    """The image-processor backends eovseg ships: {"torchvision": ..., "pil": ...} (the PIL one where it exists)."""
    from eovseg.processing.image_processing_eovseg import EovSegImageProcessor

    classes = {"torchvision": EovSegImageProcessor}
    try:
        from eovseg.processing.image_processing_pil_eovseg import EovSegImageProcessorPil
    except ImportError:
        return classes
    classes["pil"] = EovSegImageProcessorPil
    return classes


def write_tiny_model_folder(root: Path) -> None:
    """`root/reports/tiny_model_summary.json` and `root/eovseg/EovSegForPanopticSegmentation/`, the layout
    PipelineTesterMixin reads when `TRANSFORMERS_TINY_MODEL_PATH` is a local folder."""
    import torch

    from eovseg import EovSegConfig, EovSegForPanopticSegmentation, EovSegProcessor

    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny")
    model = EovSegForPanopticSegmentation(config)
    # the image-segmentation pipeline passes no class names: the model runs on its stored default vocabulary
    model.set_default_vocabulary_embeddings(EovSegProcessor.from_config(config).encode_vocabulary(config.vocabulary)["input_ids"])
    folder = root / "eovseg" / type(model).__name__
    model.save_pretrained(folder)
    processors = image_processor_classes()
    # one preprocessor_config.json serves every backend: the summary lists each class, all read the same file
    processors["torchvision"](size=TINY_IMAGE_SIZE).save_pretrained(folder)
    summary = {
        type(model).__name__: {
            "tokenizer_classes": [],
            "processor_classes": [cls.__name__ for cls in processors.values()],
            "model_classes": [type(model).__name__],
        }
    }
    (root / "reports").mkdir(parents=True)
    (root / "reports" / "tiny_model_summary.json").write_text(json.dumps(summary), encoding="utf-8")


class _TransformersAndEovSeg(types.ModuleType):
    """What test_pipeline_mixin looks class names up in: transformers, then eovseg (the names in our summary)."""

    def __getattr__(self, name):
        import eovseg

        for source in (sys.modules["transformers"], eovseg, *map(sys.modules.get, _EOVSEG_MODULES)):
            if source is not None and hasattr(source, name):
                return getattr(source, name)
        raise AttributeError(name)


_EOVSEG_MODULES = ("eovseg.processing.image_processing_pil_eovseg",)


# ------------------------------------------------------------------------------------------------ set-up


def pytest_configure(config):
    # the markers transformers' own conftest registers for the mixins
    for name in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                 "torch_compile_test", "is_pipeline_test", "order"):
        config.addinivalue_line("markers", f"{name}: used by transformers' common test mixins")


SOURCES = transformers_sources()
sys.path.insert(0, str(SOURCES))
sys.path.append(str(SOURCES / "utils"))
_stand_in("tests.exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
_stand_in("tests.generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
_stand_in(
    "tests.utils.test_configuration_utils",
    config_common_kwargs={
        "return_dict": False,
        "output_hidden_states": True,
        "dtype": "float16",
        "chunk_size_feed_forward": 5,
        "is_encoder_decoder": True,
        "architectures": ["EovSegForPanopticSegmentation"],
        "id2label": {0: "label"},
        "label2id": {"label": "0"},
        "problem_type": "regression",
    },
)
_stand_in("fetch_hub_objects_for_ci", url_to_local_path=url_to_local_path)
_stand_in(
    "tests.pipelines.test_pipelines_image_segmentation", ImageSegmentationPipelineTests=ImageSegmentationPipelineTests
)
if "TRANSFORMERS_TINY_MODEL_PATH" not in os.environ:
    write_tiny_model_folder(WORK / "tiny-models")
    os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = str(WORK / "tiny-models")

import tests.test_pipeline_mixin as _pipeline_mixin  # noqa: E402

_pipeline_mixin.transformers_module = _TransformersAndEovSeg("transformers_and_eovseg")

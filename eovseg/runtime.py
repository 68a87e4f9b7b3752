"""Run an `eovseg export` folder with ONNX Runtime or OpenVINO: no PyTorch model, any class list.

    from eovseg import runtime

    segmenter = runtime.load("eovseg-onnx")                     # the folder `eovseg export` wrote
    results = segmenter(images, ["cat", "grass, lawn"], stuff=["grass, lawn"])
    results = segmenter(images, "ade20k_150")                     # a built-in vocabulary by name
    results = segmenter(images)                                   # the model's default vocabulary

Each result is what `eovseg predict` writes from: `segmentation` (an (H, W) map of segment ids at the image's size,
0 = none) and `segments_info` (`id`, `label_id` = the class's index in the vocabulary, `score`, ...), from the
processor's `post_process_panoptic_segmentation` (or `subtask="semantic"` / `"instance"`) on the graphs' outputs.

A class list is encoded once by the exported text graph (the processor tokenizes it) and kept for the next call
with the same list. The image graph takes one image at a time: a batch is run image by image at the batch's padded
size, which gives the numbers a batched forward of the model gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .loading import check_finite_outputs, resolve_vocabulary
from .onnx_export import ExportFolderError, read_manifest  # noqa: F401  (the runtime's error, by its name here too)
from .predictor import Predictor

RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = ("float32", "bfloat16", "float16")
_OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def load(folder, runtime: str | None = None, precision: str = "float32", threads: int | None = None,
         providers: Sequence | None = None) -> "EovSegRuntime":
    """The export folder `folder` ready to run. `runtime` is "onnxruntime" or "openvino" (default: the one the
    folder was exported for); `precision` the computation's precision where the runtime chooses it (OpenVINO:
    "bfloat16" on CPUs with bfloat16 instructions); `threads` the intra-op threads (default: the runtime's);
    `providers` ONNX Runtime's execution providers (default: CPU)."""
    return EovSegRuntime(folder, runtime, precision, threads, providers)


def _import_runtime(name: str, extra: str):
    """The runtime's package, or a one-line error saying how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise ExportFolderError(f"running an export with {name} needs {name}, not installed: "
                                f"pip install 'eovseg[{extra}]'.") from None


class _OnnxRuntimeGraph:
    def __init__(self, path: Path, threads: int | None, providers: Sequence | None):
        ort = _import_runtime("onnxruntime", "onnx")

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only (not the constant-folding notes on the exported casts)
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict) -> dict:
        return dict(zip(self.output_names, self.session.run(None, feeds)))


class _OpenVinoGraph:
    def __init__(self, path: Path, threads: int | None, precision: str):
        ov = _import_runtime("openvino", "openvino")

        config = {"INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, feeds: dict) -> dict:
        results = self.request.infer(feeds)
        return {output.get_any_name(): results[output] for output in self.compiled.outputs}


class EovSegRuntime:
    """An export folder loaded into a runtime (see [`load`]): `config`, `processor` and the two graphs."""

    def __init__(self, folder, runtime: str | None = None, precision: str = "float32", threads: int | None = None,
                 providers: Sequence | None = None):
        import numpy as np
        import torch

        from .configuration_eovseg import EovSegConfig
        from .onnx_export import DEFAULT_EMBEDDINGS
        from .processing import EovSegProcessor

        folder = Path(folder)
        self.manifest = read_manifest(folder)
        runtime = runtime or ("openvino" if self.manifest["format"] == "openvino" else "onnxruntime")
        if runtime not in RUNTIMES:
            raise ExportFolderError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}.")
        if precision not in PRECISIONS or (runtime == "onnxruntime" and precision != "float32"):
            offered = "float32" if runtime == "onnxruntime" else ", ".join(PRECISIONS)
            raise ExportFolderError(f"precision {precision!r} is not offered by {runtime} here ({offered}; ONNX Runtime "
                                "runs the graph's own precision).")
        if runtime == "onnxruntime" and self.manifest["format"] != "onnx":
            raise ExportFolderError(f"{str(folder)!r} holds an OpenVINO export: ONNX Runtime runs `--format onnx` exports.")
        if runtime == "openvino" and self.manifest["format"] != "openvino":
            raise ExportFolderError(f"{str(folder)!r} holds an ONNX export: convert it for OpenVINO with `eovseg export "
                                    f"{folder} --format openvino --output_dir DIR`.")
        self.folder, self.runtime, self.precision = folder, runtime, precision
        self.config = EovSegConfig.from_pretrained(folder)
        self.processor = EovSegProcessor.from_pretrained(folder)
        stored = folder / DEFAULT_EMBEDDINGS
        self.default_text_embeddings = torch.from_numpy(np.load(stored)) if stored.is_file() else None
        self.image_graph = self._graph(self.manifest["graphs"]["image"], threads, providers)
        self.text_graph = self._graph(self.manifest["graphs"]["text"], threads, providers)
        self._vocabularies: dict[tuple, dict] = {}

    def _graph(self, name: str, threads, providers):
        if self.runtime == "onnxruntime":
            return _OnnxRuntimeGraph(self.folder / name, threads, providers)
        return _OpenVinoGraph(self.folder / name, threads, self.precision)

    # ------------------------------------------------------------------ vocabulary

    def text_embeddings(self, input_ids):
        """The text graph: prompts' token ids (P, L) to synonym embeddings (S, D), float32 numpy."""
        import numpy as np

        return self.text_graph({"input_ids": np.asarray(input_ids, dtype=np.int64)})["text_embeddings"]

    def encode_vocabulary(self, class_names: Sequence[str] | None = None) -> dict:
        """The image graph's vocabulary inputs (numpy) for `class_names` (encoded by the text graph), or for the
        model's default vocabulary from its stored embeddings when `class_names` is None."""
        import numpy as np

        from .classifier_eovseg import build_synonym_index
        from .vocabulary import seen_class_mask, synonym_counts

        key = tuple(class_names) if class_names is not None else None
        if key not in self._vocabularies:
            if class_names is None:
                if self.default_text_embeddings is None:
                    raise ExportFolderError("this export has no stored default vocabulary: give the classes to find.")
                names, embeddings = self.config.vocabulary, self.default_text_embeddings.numpy()
            else:
                names = list(class_names)
                embeddings = self.text_embeddings(self.processor.encode_vocabulary(names, return_tensors="np")["input_ids"])
            self._vocabularies.clear()  # one vocabulary kept: a run uses one
            self._vocabularies[key] = {
                "text_embeddings": np.ascontiguousarray(embeddings, dtype=np.float32),
                "synonym_index": build_synonym_index(synonym_counts(names)).numpy(),
                "class_seen_mask": np.asarray(seen_class_mask(names, self.config.train_vocabulary), dtype=bool),
            }
        return self._vocabularies[key]

    # ------------------------------------------------------------------ images

    def forward(self, pixel_values, vocabulary: dict, pixel_mask=None):
        """The image graph on a batch (image by image), as the model's output: `class_queries_logits`,
        `masks_queries_logits`, `out_of_vocabulary_logits` (and `iou_scores`) as torch tensors, `image_sizes`."""
        import numpy as np
        import torch

        from .modeling_eovseg import EovSegOutput, _image_sizes

        pixels = np.asarray(pixel_values, dtype=np.float32)
        rows = [self.image_graph({"pixel_values": pixels[i : i + 1], **vocabulary}) for i in range(pixels.shape[0])]
        outputs = {name: torch.from_numpy(np.concatenate([row[name] for row in rows])) for name in rows[0]}
        mask = None if pixel_mask is None else torch.as_tensor(np.asarray(pixel_mask))
        return EovSegOutput(**outputs, image_sizes=_image_sizes(torch.from_numpy(pixels), mask))

    def predictor(self, class_names, is_thing, vocabulary_given: bool = True, subtask: str = "panoptic",
                  threshold: float = 0.0, overlap_mask_area_threshold: float = 0.8, mask_threshold: float = 0.5,
                  colors=None):
        """An `eovseg predict` Predictor that runs this export instead of the PyTorch model."""
        return RuntimePredictor(self, class_names, is_thing, vocabulary_given, subtask, threshold,
                                overlap_mask_area_threshold, mask_threshold, colors)

    def __call__(self, images, classes: Sequence[str] | str | None = None, stuff: Sequence[str] | None = None,
                 subtask: str = "panoptic", threshold: float = 0.0, overlap_mask_area_threshold: float = 0.8,
                 mask_threshold: float = 0.5) -> list[dict]:
        """Segment `images` (PIL images, or one) with `classes` (class entries, a built-in vocabulary's name, or
        None for the model's default vocabulary); `stuff` names the classes of the list that are stuff."""
        from PIL import Image

        if isinstance(classes, str):
            names, is_thing, given, _ = resolve_vocabulary(self.config, None, None, classes)
        else:
            names, is_thing, given, _ = resolve_vocabulary(self.config, classes, stuff)
        single = isinstance(images, Image.Image)
        predictor = self.predictor(names, is_thing, given, subtask, threshold, overlap_mask_area_threshold,
                                   mask_threshold)
        results = predictor([images] if single else list(images))
        return results[0] if single else results


class RuntimePredictor(Predictor):
    """`eovseg predict`'s Predictor on an export: the text pass by the text graph (or the stored default
    vocabulary), the forward by the image graph; the same post-processing."""

    def __init__(self, runtime: EovSegRuntime, *args):
        super().__init__(runtime, runtime.processor, *args)

    @property
    def device(self):
        return "cpu"

    def _encode_vocabulary(self) -> dict:
        return self.model.encode_vocabulary(self.class_names)

    def _forward(self, images):
        inputs = self.processor(images=list(images), return_tensors="np")
        vocabulary = self.text or self.model.encode_vocabulary(None)
        outputs = self.model.forward(inputs["pixel_values"], vocabulary, inputs.get("pixel_mask"))
        check_finite_outputs(outputs)
        return outputs

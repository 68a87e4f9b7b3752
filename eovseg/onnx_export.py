"""`eovseg export`: a model folder as graphs other runtimes run (ONNX Runtime, OpenVINO), with no PyTorch model.

    eovseg export MODEL --format onnx --output_dir eovseg-onnx            # ONNX Runtime
    eovseg export MODEL --format openvino --output_dir eovseg-openvino    # OpenVINO IR
    eovseg export MODEL --format onnx --precision int8 --output_dir ...   # weights quantized to int8

The output folder holds two graphs and what is needed to feed them:

- `image` (`image.onnx`, or `image.xml` + `image.bin`): the whole image path (CLIP backbone, ViT block, light
  aggregator, decoder, out-of-vocabulary branch, geometric ensemble) for one image. Inputs: `pixel_values` (1, 3, H, W)
  as the processor makes them (any H and W that are multiples of `config.size_divisibility`), the vocabulary's
  `text_embeddings` (S, D), its `synonym_index` (K, M: each class's rows of `text_embeddings`, -1 padded) and
  `class_seen_mask` (K,). Outputs: `class_queries_logits` (1, Q, K + 1), `masks_queries_logits` (1, Q, H/4, W/4),
  `out_of_vocabulary_logits` (1, Q, K + 1) and, with Mask Filtering, `iou_scores` (1, Q). (One image: the
  decoder's dynamic convolutions group by image and query, and ONNX's group count is a constant.)
- `text` (`text.onnx` / `text.xml`): the CLIP text tower: `input_ids` (P, L) of a vocabulary's prompts (the
  processor's `encode_vocabulary`) to the synonym embeddings (S, D), so a new class list needs no PyTorch model.
- the processor's files and the model's `config.json` (class names, thing flags, the training vocabulary), the
  default vocabulary's embeddings (`default_text_embeddings.npy`) and `eovseg_export.json` (what was written, how).

`eovseg.runtime.load(DIR)` runs such a folder. A float32 ONNX export may be given as MODEL: its graphs are converted
(`--format openvino`, `--precision int8`) without building the PyTorch model. `--precision int8` quantizes the image graph's weights (ONNX Runtime's dynamic
quantization, NNCF's weight compression); with `--calibration IMAGES` the activations too (static quantization,
calibrated on those images with the default vocabulary). The text graph stays float32.

The modulated deformable convolutions of the neck become ONNX's `DeformConv` (opset 19, which ONNX Runtime's CPU
provider implements) in the ONNX export, and OpenVINO's own `DeformableConvolution` (through its ONNX front end's
`org.openvinotoolkit.DeformableConv2D`) in the OpenVINO export.

The output folder must be new, empty or an earlier export (only the files that export wrote are replaced); the
graphs are written to a staging folder beside it and moved in when complete.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .command_line import (
    CommandError,
    add_progress_option,
    command_main,
    command_parser,
    non_empty_text,
    output_dir_problem,
    progress_switch,
)

FORMATS = ("onnx", "openvino")
# (OpenVINO computes in bfloat16 from a float32 export: a precision chosen when the graph is loaded)
# (ONNX float16 is left to TensorRT's engines: onnxruntime's float16 converter breaks the graph's typing)
PRECISIONS = {"onnx": ("float32", "int8"), "openvino": ("float32", "float16", "int8")}
MANIFEST = "eovseg_export.json"
DEFAULT_EMBEDDINGS = "default_text_embeddings.npy"


class ExportFolderError(ValueError):
    """An export folder or a setting the runtime cannot use (one line)."""


def read_manifest(folder: Path) -> dict:
    """The manifest of an `eovseg export` folder, refused in one line when missing or unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ExportFolderError(f"{str(folder)!r} is not an `eovseg export` folder (no {MANIFEST}).")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["graphs"]["image"], manifest["graphs"]["text"], manifest["format"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ExportFolderError(f"{path} cannot be read as an export manifest: export the model again.") from None
    return manifest
OPSET = 19
IMAGE_INPUTS = ("pixel_values", "text_embeddings", "synonym_index", "class_seen_mask")
TEXT_INPUTS = ("input_ids",)
TEXT_OUTPUTS = ("text_embeddings",)


def image_output_names(config) -> list[str]:
    names = ["class_queries_logits", "masks_queries_logits", "out_of_vocabulary_logits"]
    return names + ["iou_scores"] if config.mask_filtering else names


# ----------------------------------------------------------------------------------------------------------------------
# The two graphs as modules
# ----------------------------------------------------------------------------------------------------------------------


def graph_vocabulary(model, text_embeddings, synonym_index, class_seen_mask, dtype):
    """The model's vocabulary from the image graph's tensor inputs (the text embeddings, the stored void embedding
    normalized, both in `dtype`)."""
    import torch
    import torch.nn.functional as F

    from .modeling_eovseg import _Vocabulary

    embeddings = text_embeddings.to(dtype)
    void = F.normalize(model.void_embedding.weight, dim=-1).to(dtype)
    return _Vocabulary(embeddings, torch.cat([embeddings, void]), synonym_index, class_seen_mask, False)


def image_graph(model):
    """The image path of `model` as a module whose inputs are tensors only (see the module's docstring): the vocabulary
    comes as its embeddings and synonym index, whose sizes stay symbolic in a traced program (the model's own forward
    takes the synonym counts as Python numbers, which a trace would fix)."""
    import torch

    class EovSegImageGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values, text_embeddings, synonym_index, class_seen_mask):
            m = self.model
            pixel_values = m._check_pixel_values(pixel_values)
            vocabulary = graph_vocabulary(m, text_embeddings, synonym_index, class_seen_mask, pixel_values.dtype)
            image = m._encode_image(pixel_values)
            decoded = m._decode(image, vocabulary)
            class_logits, out_vocab_logits, _ = m._ensemble_with_clip(
                image.clip["clip_dense"], decoded.mask_logits[-1], decoded.embeddings[-1], decoded.class_logits[-1],
                vocabulary, "geometric", None, None,
            )
            outputs = (class_logits, decoded.mask_logits[-1], out_vocab_logits)
            return outputs + (decoded.iou[-1],) if decoded.iou is not None else outputs

    return EovSegImageGraph().eval()


def text_graph(model):
    """The text pass of `model` as a module: prompts' token ids (P, L) to synonym embeddings (S, D), as
    `get_text_embeddings` computes them (each prompt normalized, averaged over the templates, normalized)."""
    import torch
    import torch.nn.functional as F

    from .vocabulary import PROMPT_TEMPLATES

    class EovSegTextGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = model.clip_backbone

        def forward(self, input_ids):
            prompts = F.normalize(self.backbone.encode_text(input_ids).float(), dim=-1)
            synonyms = prompts.reshape(-1, len(PROMPT_TEMPLATES), prompts.shape[-1]).mean(1)
            return F.normalize(synonyms, dim=-1)

    return EovSegTextGraph().eval()


# ----------------------------------------------------------------------------------------------------------------------
# ONNX translations of the operators torch.onnx does not know
# ----------------------------------------------------------------------------------------------------------------------


def _translations() -> dict:
    """torch.onnx's `custom_translation_table`: torchvision's deformable convolution as ONNX's `DeformConv`, the
    coordinate features from the feature map's shape."""
    import torch
    from onnxscript import opset19 as op

    from .modeling_eovseg import _register_coordinate_features_operator

    _register_coordinate_features_operator()

    def coordinate_features(x):
        # torch.linspace(-1, 1, n) (filled from both ends, as torch does) over height and width, (B, 2, H, W)
        shape = op.Shape(x)
        batch, height, width = op.Slice(shape, [0], [1]), op.Slice(shape, [2], [3]), op.Slice(shape, [3], [4])

        def linspace(n):
            index = op.Cast(op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1)), to=1)
            count = op.Cast(n, to=1)
            step = op.Div(op.Constant(value_float=2.0), op.Max(op.Sub(count, op.Constant(value_float=1.0)),
                                                                op.Constant(value_float=1.0)))
            from_start = op.Add(op.Constant(value_float=-1.0), op.Mul(index, step))
            from_end = op.Sub(op.Constant(value_float=1.0),
                              op.Mul(op.Sub(op.Sub(count, op.Constant(value_float=1.0)), index), step))
            return op.Where(op.Less(index, op.Div(count, op.Constant(value_float=2.0))), from_start, from_end)

        plane = op.Concat(height, width, axis=0)
        grid_x = op.Expand(op.Unsqueeze(linspace(width), [0]), plane)
        grid_y = op.Expand(op.Unsqueeze(linspace(height), [1]), plane)
        grid = op.Unsqueeze(op.Concat(op.Unsqueeze(grid_x, [0]), op.Unsqueeze(grid_y, [0]), axis=0), [0])
        return op.CastLike(op.Expand(grid, op.Concat(batch, op.Constant(value_ints=[2]), height, width, axis=0)), x)

    def deform_conv2d(input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dilation_h,
                           dilation_w, groups, offset_groups, use_mask):
        return op.DeformConv(input, weight, offset, bias, mask, dilations=[dilation_h, dilation_w], group=groups,
                             offset_group=offset_groups, pads=[pad_h, pad_w, pad_h, pad_w], strides=[stride_h, stride_w])

    return {
        torch.ops.torchvision.deform_conv2d.default: deform_conv2d,
        torch.ops.eovseg.coordinate_features.default: coordinate_features,
    }


def _export(module, args: tuple, path: Path, input_names, output_names, dynamic_shapes) -> None:
    import torch

    with torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=list(input_names),
            output_names=list(output_names), opset_version=OPSET, custom_translation_table=_translations(),
            # not onnxscript's optimizer: its rule for `x + 0` also drops the `+ 1e-8` that keeps an empty mask's
            # pooling weights finite (0 / 0 in the graph); ONNX Runtime and OpenVINO optimize the graph when loading
            optimize=False, verify=False, report=False,
        )
    program.save(str(path), external_data=False)


def image_example(config) -> tuple[tuple, tuple]:
    """Example inputs of the image graph and their dynamic dimensions, for `torch.onnx.export`."""
    import torch

    div = config.size_divisibility
    text_embeddings = torch.randn(4, config.embed_dim)
    text_embeddings = text_embeddings / text_embeddings.norm(dim=-1, keepdim=True)
    # one image (the decoder's dynamic convolutions group by batch x queries, and ONNX wants a constant group count);
    # traced at 4 x 6 multiples, 3 classes, 2 synonyms at most: a size-1 dimension would be taken as a constant
    example = (torch.randn(1, 3, 4 * div, 6 * div), text_embeddings,
               torch.tensor([[0, 1], [2, -1], [3, -1]]), torch.tensor([True, False, False]))
    Dim = torch.export.Dim
    classes, synonyms = Dim("classes", max=100000), Dim("synonyms", max=1000000)
    shapes = ({2: div * Dim("height", min=2, max=512), 3: div * Dim("width", min=2, max=512)},
              {0: synonyms}, {0: classes, 1: Dim("max_synonyms", max=1000)}, {0: classes})
    return example, shapes


def export_graphs(model, folder: Path) -> dict[str, Path]:
    """Write `image.onnx` and `text.onnx` of `model` (float32, eval mode) into `folder`. Returns the paths by graph
    name."""
    import torch

    config = model.config
    paths = {"image": folder / "image.onnx", "text": folder / "text.onnx"}
    example, shapes = image_example(config)
    _export(image_graph(model), example, paths["image"], IMAGE_INPUTS, image_output_names(config), shapes)
    from .processing import EovSegProcessor

    ids = EovSegProcessor.from_config(config).encode_vocabulary(["cat", "dog, puppy"])["input_ids"]
    context = model.clip_backbone.clip_model.positional_embedding.shape[0]
    _export(text_graph(model), (ids,), paths["text"], TEXT_INPUTS, TEXT_OUTPUTS,
            ({0: torch.export.Dim("prompts", max=10000000), 1: torch.export.Dim("length", min=3, max=context)},))
    return paths


def openvino_deform_conv(graph):
    """Replace each ONNX `DeformConv` of an ONNX `graph` (in place) by OpenVINO's deformable convolution, which its
    ONNX front end reads as `org.openvinotoolkit.DeformableConv2D` (it has no translation of `DeformConv`).

    OpenVINO's kernel gives 0 for a sampling point whose 2x2 neighbourhood leaves the image, where torchvision (and
    `DeformConv`) interpolate with the zeros outside: the input padded with zeros and convolved unpadded gives
    torchvision's numbers."""
    from onnx import helper

    nodes = []
    for node in graph.node:
        if node.op_type != "DeformConv" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, weight, offset, bias, mask = (list(node.input) + [""] * 5)[:5]
        pads, name = list(attributes.get("pads", [0, 0, 0, 0])), node.name or node.output[0]
        half = len(pads) // 2
        nodes.append(helper.make_node("Constant", [], [f"{name}_pads"],
                                      value=helper.make_tensor(f"{name}_pads", 7, [8], [0, 0, *pads[:half], 0, 0, *pads[half:]])))
        nodes.append(helper.make_node("Pad", [x, f"{name}_pads"], [f"{name}_padded"]))
        convolved = f"{name}_unbiased" if bias else node.output[0]
        nodes.append(helper.make_node(
            "DeformableConv2D", [f"{name}_padded", offset, weight] + ([mask] if mask else []), [convolved],
            domain="org.openvinotoolkit", strides=list(attributes.get("strides", [1, 1])), pads=[0, 0, 0, 0],
            dilations=list(attributes.get("dilations", [1, 1])), group=int(attributes.get("group", 1)),
            deformable_groups=int(attributes.get("offset_group", 1))))
        if bias:
            nodes.append(helper.make_node("Constant", [], [f"{name}_axes"], value=helper.make_tensor(f"{name}_axes", 7, [3], [0, 2, 3])))
            nodes.append(helper.make_node("Unsqueeze", [bias, f"{name}_axes"], [f"{name}_bias"]))
            nodes.append(helper.make_node("Add", [convolved, f"{name}_bias"], [node.output[0]]))
    del graph.node[:]
    graph.node.extend(nodes)


def to_openvino(onnx_path: Path, xml_path: Path) -> None:
    """An ONNX graph of `export_graphs` as OpenVINO IR (`xml_path` and its `.bin`), float32 weights."""
    import onnx
    import openvino as ov
    from onnx import helper

    graph = onnx.load(str(onnx_path))
    if any(node.op_type == "DeformConv" for node in graph.graph.node):
        openvino_deform_conv(graph.graph)
        graph.opset_import.append(helper.make_opsetid("org.openvinotoolkit", 1))
        rewritten = onnx_path.with_name(onnx_path.stem + ".openvino.onnx")
        onnx.save(graph, str(rewritten))
        onnx_path = rewritten
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


# ----------------------------------------------------------------------------------------------------------------------
# int8
# ----------------------------------------------------------------------------------------------------------------------


def calibration_feeds(config, processor, images: Sequence, embeddings) -> list[dict]:
    """The image graph's inputs for each calibration image, with the vocabulary `embeddings` (the default one)."""
    import numpy as np

    from .vocabulary import synonym_counts, seen_class_mask
    from .classifier_eovseg import build_synonym_index

    counts = synonym_counts(config.vocabulary)
    vocabulary = {
        "text_embeddings": np.asarray(embeddings, dtype=np.float32),
        "synonym_index": build_synonym_index(counts).numpy(),
        "class_seen_mask": np.asarray(seen_class_mask(config.vocabulary, config.train_vocabulary), dtype=bool),
    }
    return [{"pixel_values": processor(images=[image], return_tensors="np")["pixel_values"].astype(np.float32),
             **vocabulary} for image in images]


def quantize_onnx(path: Path, feeds: list[dict] | None) -> None:
    """`path` (an image graph) with int8 weights, in place: ONNX Runtime's static quantization (activations too,
    calibrated on `feeds`) when calibration inputs are given, else its dynamic quantization (weights int8,
    activations quantized per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = path.with_name(path.stem + ".prepared.onnx")
    quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
    if feeds:
        class Reader:
            def __init__(self):
                self.items = iter(feeds)

            def get_next(self):
                return next(self.items, None)

        # the products with weights only: other operators' inputs hold -inf by design (masked logits, attention
        # masks), which no int8 range covers
        quantize_static(str(prepared), str(path), Reader(), weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                        nodes_to_exclude=_products_of_activations(prepared))
    else:
        quantize_dynamic(str(prepared), str(path), weight_type=QuantType.QInt8,
                         nodes_to_exclude=_products_of_activations(prepared))
    prepared.unlink()


def _products_of_activations(path: Path) -> list[str]:
    """The matrix products of a graph between two activations (attention's): left in float32 by the dynamic
    quantization (int8 weights), which would otherwise quantize the whole tensor by its range, and a masked
    attention row of an empty mask (-inf scores, NaN weights, replaced by zeros after the product) makes that range
    NaN for every row."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [node.name for node in graph.node
            if node.op_type in ("MatMul", "Gemm", "Conv") and not any(i in constants for i in node.input[1:2])]


def quantize_openvino(xml_path: Path, feeds: list[dict] | None) -> None:
    """`xml_path` (an image graph) with int8 weights, in place: NNCF's post-training quantization (activations
    too, calibrated on `feeds`) when calibration inputs are given, else NNCF's int8 weight compression."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(xml_path))
    if feeds:
        # as for ONNX Runtime: products of two activations (attention, with the NaN rows of empty masks) stay float
        # and only the inputs of weighted layers: element-wise inputs hold -inf by design (masked logits)
        ignored = nncf.IgnoredScope(names=_openvino_products_of_activations(model), validate=False,
                                    types=["Add", "Multiply", "Subtract", "Divide", "Power", "Maximum", "Minimum",
                                           "Interpolate", "MVN", "ReduceMean", "ReduceSum", "ReduceMax", "Concat",
                                           "Softmax", "SoftMax", "Exp", "Log", "Select", "Sigmoid"])
        quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds), ignored_scope=ignored,
                                  model_type=nncf.ModelType.TRANSFORMER)
    else:
        quantized = nncf.compress_weights(model)
    staged = xml_path.with_name(xml_path.stem + ".int8.xml")
    ov.save_model(quantized, str(staged), compress_to_fp16=False)
    del model, quantized
    os.replace(staged, xml_path)
    os.replace(staged.with_suffix(".bin"), xml_path.with_suffix(".bin"))


def _openvino_products_of_activations(model) -> list[str]:
    def constant(output) -> bool:
        node = output.get_node()
        while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Unsqueeze") and node.get_type_name() != "Constant":
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [op.get_friendly_name() for op in model.get_ops()
            if op.get_type_name() == "MatMul" and not any(constant(op.input_value(i)) for i in range(2))]


# ----------------------------------------------------------------------------------------------------------------------
# The export folder
# ----------------------------------------------------------------------------------------------------------------------


def check_output_folder(folder: Path) -> None:
    """Refuse an output folder that is a file or holds anything an earlier `eovseg export` did not write."""
    problem = output_dir_problem(folder)
    if problem:
        raise CommandError(problem)
    if not folder.exists() or not any(folder.iterdir()):
        return
    ours = set(_written_files(folder))
    others = sorted(p.name for p in folder.iterdir() if p.name not in ours)
    if others:
        raise CommandError(f"--output_dir {str(folder)!r} holds files eovseg export did not write ({', '.join(others[:3])}"
                           f"{', ...' if len(others) > 3 else ''}): give a new or empty folder.")


def _written_files(folder: Path) -> list[str]:
    """The files an earlier export wrote into `folder` (its manifest and what it lists), none when it has no manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return []
    if not isinstance(files, list):
        return []
    # plain names only: a manifest naming "../x" or an absolute path must not make the export replace that file
    return [MANIFEST, *(name for name in files if isinstance(name, str) and name and Path(name).name == name)]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_in(staging: Path, folder: Path) -> None:
    """The staged files into `folder`: a rename of the whole folder when `folder` does not exist; else file by file,
    the manifest last, then the earlier export's files this one did not write again are removed."""
    if not folder.exists():
        staging.chmod(0o777 & ~_umask())  # mkdtemp's folder is private
        os.replace(staging, folder)
        return
    earlier = _written_files(folder)
    names = sorted(p.name for p in staging.iterdir())
    for name in names:
        if name != MANIFEST:
            os.replace(staging / name, folder / name)
    os.replace(staging / MANIFEST, folder / MANIFEST)
    for name in set(earlier) - set(names):
        if (folder / name).is_file():
            (folder / name).unlink()
    shutil.rmtree(staging, ignore_errors=True)


def export_model_folder(model_dir, output_dir, format: str = "onnx", precision: str = "float32",
                        calibration_images: Sequence | None = None) -> list[str]:
    """Export the model folder `model_dir` into `output_dir` (see this module's docstring); returns the file names.
    `model_dir` may also be a float32 ONNX export, whose graphs are then converted (no PyTorch model is built).
    `calibration_images` (PIL images) make the int8 export quantize activations too (static quantization)."""
    import numpy as np

    if format not in FORMATS:
        raise CommandError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}.")
    if precision not in PRECISIONS[format]:
        raise CommandError(f"--precision {precision!r} is not offered for {format} (one of {', '.join(PRECISIONS[format])}).")
    output_dir, model_dir = Path(output_dir), Path(model_dir)
    if output_dir.resolve() == model_dir.resolve():
        raise CommandError("--output_dir is the model folder itself: give another folder.")
    check_output_folder(output_dir)
    source = _source(model_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.eovseg-export-", dir=output_dir.parent))
    try:
        paths, embeddings = source.write_graphs(staging)
        if embeddings is not None:
            np.save(staging / DEFAULT_EMBEDDINGS, embeddings)
        feeds = None
        if precision == "int8" and calibration_images:
            if embeddings is None:
                raise CommandError("static int8 calibration runs on the model's default vocabulary, which this model "
                                   "does not store: export without calibration images (weights-only int8).")
            feeds = calibration_feeds(source.config, source.processor, calibration_images, embeddings)
        graphs = _finish_graphs(paths, format, precision, feeds)
        _save_processor(source.processor, staging)
        source.config.to_json_file(str(staging / "config.json"))
        files = sorted(p.name for p in staging.iterdir())
        (staging / MANIFEST).write_text(json.dumps({
            "format": format, "precision": precision, "graphs": graphs, "files": files,
            "int8": None if precision != "int8" else ("static" if feeds else "weights"),
            "batch_size": 1, "opset": OPSET,
        }, indent=1), encoding="utf-8")
        _move_in(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [MANIFEST, *files]


class _ModelSource:
    """A model folder: the PyTorch model is loaded and traced."""

    def __init__(self, folder: Path):
        from .auto_registration import load_model_folder
        from .configuration_eovseg import EovSegConfig

        model, self.processor = load_model_folder(folder)
        self.model = model.float().eval()
        self.config = EovSegConfig.from_pretrained(folder)  # as saved (loading may complete the model's own)

    def write_graphs(self, folder: Path):
        from .loading import has_stored_vocabulary

        embeddings = self.model.default_text_embeddings.float().numpy() if has_stored_vocabulary(self.model) else None
        return export_graphs(self.model, folder), embeddings


class _ExportSource:
    """A float32 ONNX export: its graphs are copied and converted."""

    def __init__(self, folder: Path, manifest: dict):
        from .configuration_eovseg import EovSegConfig
        from .processing import EovSegProcessor

        if manifest.get("format") != "onnx" or manifest.get("precision") != "float32":
            raise CommandError(f"{str(folder)!r} is a {manifest.get('format')} {manifest.get('precision')} export: "
                               "export from the model folder, or from a float32 ONNX export.")
        self.folder, self.manifest = folder, manifest
        self.config = EovSegConfig.from_pretrained(folder)
        self.processor = EovSegProcessor.from_pretrained(folder)

    def write_graphs(self, folder: Path):
        import numpy as np

        paths = {}
        for name, file in self.manifest["graphs"].items():
            paths[name] = folder / file
            shutil.copyfile(self.folder / file, paths[name])
        stored = self.folder / DEFAULT_EMBEDDINGS
        return paths, np.load(stored) if stored.is_file() else None


def _source(folder: Path):
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        return _ExportSource(folder, read_manifest(folder))
    return _ModelSource(folder)


def _save_processor(processor, folder: Path) -> None:
    """The processor's files (tokenizer, processor and image processor configurations), without the model code files
    a model folder gets for `trust_remote_code` (the runtime loads the processor from the installed package)."""
    from transformers import ProcessorMixin

    ProcessorMixin.save_pretrained(processor, folder)
    processor.image_processor.save_pretrained(folder)


def _finish_graphs(paths: dict[str, Path], format: str, precision: str, feeds) -> dict[str, str]:
    """The exported ONNX graphs in their final form (format, precision); the file of each graph by name."""
    if format == "onnx":
        if precision == "int8":
            quantize_onnx(paths["image"], feeds)
        return {name: path.name for name, path in paths.items()}
    graphs = {}
    for name, path in paths.items():
        xml = path.with_suffix(".xml")
        to_openvino(path, xml)
        for stale in path.parent.glob(f"{path.stem}*.onnx"):
            stale.unlink()
        if name == "image" and precision == "int8":
            quantize_openvino(xml, feeds)
        elif precision == "float16":
            _openvino_half_weights(xml)
        graphs[name] = xml.name
    return graphs


def _openvino_half_weights(xml: Path) -> None:
    """Weights stored in float16 (half the file); the precision of the computation is chosen when the graph is
    loaded (`eovseg.runtime.load(..., precision=...)`)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    staged = xml.with_name(xml.stem + ".half.xml")
    ov.save_model(model, str(staged), compress_to_fp16=True)
    del model
    os.replace(staged, xml)
    os.replace(staged.with_suffix(".bin"), xml.with_suffix(".bin"))


# ----------------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("export", __doc__)
    parser.add_argument("model", type=non_empty_text, metavar="MODEL",
                        help="a saved or converted model folder (or a float32 ONNX export, to convert its graphs)")
    parser.add_argument("--format", choices=FORMATS, default="onnx",
                        help="onnx (run by ONNX Runtime) or openvino (OpenVINO IR)")
    parser.add_argument("--output_dir", required=True, type=Path, metavar="DIR",
                        help="where the graphs go: a new or empty folder, or an earlier export to replace")
    parser.add_argument("--precision", choices=sorted({p for ps in PRECISIONS.values() for p in ps}), default="float32",
                        help="float32 (OpenVINO runs it in bfloat16 when loaded so); int8: int8 weights "
                             "(ONNX Runtime dynamic quantization / NNCF weight compression, or with --calibration "
                             "static quantization of activations too); float16 (openvino): half-size weights")
    parser.add_argument("--calibration", nargs="+", default=None, metavar="IMAGE",
                        help="images (or folders of images) to calibrate int8 activations on (static quantization)")
    add_progress_option(parser)
    return parser


def _calibration_images(paths: Sequence[str]) -> list:
    from .inputs import read_image_file
    from .loading import IMAGE_SUFFIXES

    files = []  # every file named; in folders, the image files (as `eovseg predict` finds them)
    for path in map(Path, paths):
        files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) \
            if path.is_dir() else [path]
    images = [read_image_file(str(p)) for p in files]
    if not images:
        raise CommandError(f"--calibration {' '.join(paths)}: no image files found.")
    return images


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with progress_switch(not args.no_progress):
        return _export_command(args)


def required_packages(format: str, precision: str) -> list[str]:
    """The packages an export in `format` and `precision` imports that are not installed (the `onnx` / `openvino`
    extras hold them)."""
    needed = ["onnx", "onnxscript"] + (["openvino"] if format == "openvino" else [])
    if precision == "int8":
        needed.append("nncf" if format == "openvino" else "onnxruntime")
    return [name for name in needed if not _installed(name)]


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _export_command(args) -> int:
    if args.calibration and args.precision != "int8":
        raise CommandError("--calibration calibrates int8 quantization: give --precision int8 too.")
    missing = required_packages(args.format, args.precision)
    if missing:
        raise CommandError(f"--format {args.format} needs {', '.join(missing)}, not installed: "
                           f"pip install 'eovseg[{args.format}]'.")
    if not Path(args.model).is_dir() or not (Path(args.model) / "config.json").is_file():
        raise CommandError(f"{args.model!r} is not a model folder (a folder with a config.json).")
    images = _calibration_images(args.calibration) if args.calibration else None
    files = export_model_folder(args.model, args.output_dir, args.format, args.precision, images)
    print(f"wrote {len(files)} files to {args.output_dir} ({args.format}, {args.precision})")
    return 0


main = command_main(_main, "export")


if __name__ == "__main__":
    sys.exit(main())

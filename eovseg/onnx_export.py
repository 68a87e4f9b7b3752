"""`eovseg export`: a model folder as graphs other runtimes run (ONNX Runtime, OpenVINO), with no PyTorch model.

    eovseg export MODEL --format onnx --output_dir eovseg-onnx            # ONNX Runtime
    eovseg export MODEL --format openvino --output_dir eovseg-openvino    # OpenVINO IR
    eovseg export MODEL --format onnx --precision int8 --output_dir ...   # weights quantized to int8

The output folder holds two graphs and what is needed to feed them:

- `image` (`image.onnx`, or `image.xml` + `image.bin`): the whole image path (CLIP backbone, ViT block, light
  aggregator, decoder, out-of-vocabulary branch, geometric ensemble). Inputs: `pixel_values` (B, 3, H, W) as the
  processor makes them (any H and W that are multiples of `config.size_divisibility`), the vocabulary's
  `text_embeddings` (S, D), its `synonym_index` (K, M: each class's rows of `text_embeddings`, -1 padded) and
  `class_seen_mask` (K,). Outputs: `class_queries_logits` (B, Q, K + 1), `masks_queries_logits` (B, Q, H/4, W/4),
  `out_of_vocabulary_logits` (B, Q, K + 1) and, with Mask Filtering, `iou_scores` (B, Q).
- `text` (`text.onnx` / `text.xml`): the CLIP text tower: `input_ids` (P, L) of a vocabulary's prompts (the
  processor's `encode_vocabulary`) to the synonym embeddings (S, D), so a new class list needs no PyTorch model.
- the processor's files and the model's `config.json` (class names, thing flags, the training vocabulary), the
  default vocabulary's embeddings (`default_text_embeddings.npy`) and `eovseg_export.json` (what was written, how).

`eovseg.runtime.load(DIR)` runs such a folder. The modulated deformable convolutions of the neck become ONNX's
`DeformConv` (opset 19, which ONNX Runtime's CPU provider implements) in the ONNX export, and OpenVINO's own
`DeformableConvolution` (through its ONNX front end's `org.openvinotoolkit.DeformableConv2D`) in the OpenVINO export.

The output folder must be new, empty or an earlier export (only the files that export wrote are replaced); the
graphs are written to a staging folder beside it and moved in when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .command_line import CommandError, command_main, non_empty_text

FORMATS = ("onnx", "openvino")
PRECISIONS = {"onnx": ("float32", "float16", "int8"), "openvino": ("float32", "bfloat16", "float16", "int8")}
MANIFEST = "eovseg_export.json"
DEFAULT_EMBEDDINGS = "default_text_embeddings.npy"
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


def image_graph(model):
    """The image path of `model` as a module whose inputs are tensors only (see the module's docstring): the vocabulary
    comes as its embeddings and synonym index, whose sizes stay symbolic in a traced program (the model's own forward
    takes the synonym counts as Python numbers, which a trace would fix)."""
    import torch
    import torch.nn.functional as F

    from .modeling_eovseg import _Vocabulary

    class EovSegImageGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values, text_embeddings, synonym_index, class_seen_mask):
            m = self.model
            pixel_values = m._check_pixel_values(pixel_values)
            embeddings = text_embeddings.to(pixel_values.dtype)
            void = F.normalize(m.void_embedding.weight, dim=-1).to(pixel_values.dtype)
            vocabulary = _Vocabulary(embeddings, torch.cat([embeddings, void]), synonym_index, class_seen_mask, False)
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
            optimize=True, verify=False, report=False,
        )
    program.save(str(path), external_data=False)


def export_graphs(model, folder: Path) -> dict[str, Path]:
    """Write `image.onnx` and `text.onnx` of `model` (float32, eval mode) into `folder`. Returns the paths by graph
    name."""
    import torch

    config = model.config
    div = config.size_divisibility
    text_embeddings = torch.randn(4, config.embed_dim)
    text_embeddings = text_embeddings / text_embeddings.norm(dim=-1, keepdim=True)
    # one image (the decoder's dynamic convolutions group by batch x queries, and ONNX wants a constant group count);
    # traced at 4 x 6 multiples, 3 classes, 2 synonyms at most: a size-1 dimension would be taken as a constant
    example = (torch.randn(1, 3, 4 * div, 6 * div), text_embeddings,
               torch.tensor([[0, 1], [2, -1], [3, -1]]), torch.tensor([True, False, False]))
    Dim = torch.export.Dim
    classes, synonyms = Dim("classes", max=100000), Dim("synonyms", max=1000000)
    image_shapes = ({2: div * Dim("height", min=2, max=512), 3: div * Dim("width", min=2, max=512)},
                    {0: synonyms}, {0: classes, 1: Dim("max_synonyms", max=1000)}, {0: classes})
    paths = {"image": folder / "image.onnx", "text": folder / "text.onnx"}
    _export(image_graph(model), example, paths["image"], IMAGE_INPUTS, image_output_names(config), image_shapes)
    from .processing import EovSegProcessor

    ids = EovSegProcessor.from_config(config).encode_vocabulary(["cat", "dog, puppy"])["input_ids"]
    context = model.clip_backbone.clip_model.positional_embedding.shape[0]
    _export(text_graph(model), (ids,), paths["text"], TEXT_INPUTS, TEXT_OUTPUTS,
            ({0: Dim("prompts", max=10000000), 1: Dim("length", min=3, max=context)},))
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

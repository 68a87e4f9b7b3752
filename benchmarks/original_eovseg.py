"""Build the original EOV-Seg (nhw649/EOV-Seg, detectron2) model of a published variant on CPU, for side-by-side
benchmarks and reference dumps (`benchmarks/dump_original.py`).

This repository neither ships nor installs the original code. Point `EOVSEG_ORIGINAL` at it: a list of folders
separated by `os.pathsep`, the EOV-Seg checkout first, then whatever else its imports need on `sys.path` (a detectron2
checkout, a folder holding fvcore / iopath / omegaconf / cv2 ...), e.g.

    export EOVSEG_ORIGINAL=/work/ext/EOV-Seg:/work/ext/detectron2:/work/ext/pydeps

The original is run as it was for the fixture in `tests/fixtures` / `shared/fixtures/original-r50`: detectron2's
modulated deformable convolution (CUDA only) replaced by `torchvision.ops.deform_conv2d` with the same offset layout,
the ResNet mask-pooling crash (`.to()` on an int) fixed to its intent, the towers built without downloading weights
(the openai ones with QuickGELU, as open_clip builds them for those weights; LAION's ConvNeXt with its config's GELU),
and open_clip < 2.24 semantics restored on open_clip >= 2.24 (sequence-first text transformer and ViT block). One
more change lets it run in float64: the decoder's 0/1 hard masks are made in the features' dtype rather than always
float32 (identical in float32). detectron2's compiled `_C` extension is not needed: when it is missing an empty module
stands in for it (none of its kernels is used on this path).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import textwrap
import types
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import deform_conv2d

ENV = "EOVSEG_ORIGINAL"
# the released config of each published variant, under the checkout's configs/eov_seg/
VARIANT_CONFIGS = {
    "r50": "eov_seg_R50.yaml",
    "r50x4": "eov_seg_r50x4.yaml",
    "convnext_l": "eov_seg_convnext_l.yaml",
}


class OriginalUnavailable(RuntimeError):
    pass


def original_paths() -> list[Path]:
    value = os.environ.get(ENV, "").strip()
    if not value:
        raise OriginalUnavailable(
            f"{ENV} is not set: point it at the original EOV-Seg checkout (then detectron2 and its Python "
            f"dependencies), separated by '{os.pathsep}', to run the original side by side."
        )
    paths = [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p]
    if not (paths[0] / "eov_seg" / "modeling" / "meta_arch" / "segmentator.py").is_file():
        raise OriginalUnavailable(f"{ENV}: {paths[0]} is not an EOV-Seg checkout (no eov_seg/modeling/meta_arch).")
    return paths


class TorchvisionModulatedDeformConv(nn.Module):
    """Stand-in for detectron2's `ModulatedDeformConv` (same constructor, parameters and call) on torchvision."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deformable_groups=1, bias=True, norm=None, activation=None):
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.norm, self.activation = norm, activation
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x, offset, mask):
        x = deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                          dilation=self.dilation, mask=mask)
        if self.norm is not None:
            x = self.norm(x)
        return self.activation(x) if self.activation is not None else x


def _prepare_imports(paths: list[Path]) -> None:
    for path in reversed(paths):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    try:
        import detectron2._C  # noqa: F401
    except ImportError:
        sys.modules["detectron2._C"] = types.ModuleType("detectron2._C")
    import detectron2.layers
    import detectron2.layers.deform_conv

    detectron2.layers.ModulatedDeformConv = TorchvisionModulatedDeformConv
    detectron2.layers.deform_conv.ModulatedDeformConv = TorchvisionModulatedDeformConv

    import open_clip

    if not getattr(open_clip.create_model_and_transforms, "_eovseg_offline", False):
        create = open_clip.create_model_and_transforms

        def offline_create(model_name, pretrained=None, **kwargs):
            # open_clip builds the openai towers with QuickGELU to load those weights; LAION's keep their config's
            # GELU. The weights come from the state dict, not the hub.
            return create(model_name, pretrained=None, force_quick_gelu=pretrained == "openai", **kwargs)

        offline_create._eovseg_offline = True
        open_clip.create_model_and_transforms = offline_create


def _fix_resnet_mask_pooling(clip_class) -> None:
    """Re-define the released `visual_prediction_forward_resnet` with its two typos fixed (int `.to()`, interpolate)."""
    name = "visual_prediction_forward_resnet"
    source = textwrap.dedent(inspect.getsource(getattr(clip_class, name)))
    fixed = source.replace("num_masks = num_masks.to(query.device)", "pass").replace("F.inteprolate", "F.interpolate")
    module = sys.modules[clip_class.__module__]
    namespace: dict = {}
    exec(compile(fixed, inspect.getsourcefile(clip_class), "exec"), module.__dict__, namespace)
    setattr(clip_class, name, namespace[name])


def _hard_masks_in_feature_dtype(head_class) -> None:
    """Re-define the decoder stage's `forward` with its 0/1 hard masks in the features' dtype rather than always
    float32 (`.float()`), so that the original runs in float64 too; in float32 nothing changes."""
    source = textwrap.dedent(inspect.getsource(head_class.forward))
    old = "hard_sigmoid_masks = nonzero_inds.float()"
    if old not in source:
        raise RuntimeError(f"{head_class.__qualname__}.forward: no `{old}` to patch (another version of the original?)")
    fixed = source.replace(old, "hard_sigmoid_masks = nonzero_inds.to(features.dtype)")
    module = sys.modules[head_class.__module__]
    namespace: dict = {}
    exec(compile(fixed, inspect.getsourcefile(head_class), "exec"), module.__dict__, namespace)
    head_class.forward = namespace["forward"]


def _sequence_first_towers(model) -> None:
    """open_clip >= 2.24 runs its transformers batch-first; the original feeds them sequence-first tensors."""
    for backbone in (model.cnn_backbone, model.vit_backbone):
        clip = backbone.clip_model
        if hasattr(clip.transformer, "batch_first"):
            clip.transformer.batch_first = False  # encode_text: the stack transposes, its blocks stay batch-first
        visual = getattr(clip.visual, "transformer", None)
        if visual is not None and hasattr(visual, "batch_first"):
            for block in visual.resblocks:  # the original calls resblocks[0] directly with (N, B, C)
                block.attn.batch_first = False


def build_original_r50(state_dict: dict[str, torch.Tensor] | None = None, config_overrides: list | None = None):
    """The original EOV-Seg R50 model in eval mode on CPU (ADE20K-150 test vocabulary, COCO training vocabulary)."""
    return build_original("r50", state_dict, config_overrides)


def build_original(variant: str, state_dict: dict[str, torch.Tensor] | None = None,
                   config_overrides: list | None = None):
    """The original EOV-Seg model of `variant` (a key of `VARIANT_CONFIGS`) in eval mode on CPU, from its released
    config (ADE20K-150 test vocabulary, COCO training vocabulary; `set_metadata` changes them)."""
    if variant not in VARIANT_CONFIGS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANT_CONFIGS)}")
    paths = original_paths()
    _prepare_imports(paths)
    with contextlib.chdir(paths[0]):  # the original registers its vocabularies by relative path at import
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model

        import eov_seg
        from eov_seg.modeling.backbone.clip import CLIP
        from eov_seg.modeling.head.head import CrossAttenHead

        _fix_resnet_mask_pooling(CLIP)
        _hard_masks_in_feature_dtype(CrossAttenHead)
        cfg = get_cfg()
        eov_seg.add_eov_config(cfg)
        cfg.merge_from_file(str(paths[0] / "configs" / "eov_seg" / VARIANT_CONFIGS[variant]))
        cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + list(config_overrides or []))
        cfg.freeze()
        model = build_model(cfg)
    _sequence_first_towers(model)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.endswith("attn_mask")]
        if missing or unexpected:
            raise RuntimeError(f"original state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()

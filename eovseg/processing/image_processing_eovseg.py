"""Image processor for EOV-Seg: test-time resizing, normalization and padding of images, training
targets (panoptic or semantic annotations turned into per-segment binary masks), and the semantic,
instance and panoptic post-processing of the model's outputs.

Pre-processing reproduces the evaluation pipeline of the released EOV-Seg (detectron2) code:

1. every input is decoded to an 8-bit RGB array (see "Input formats" below);
2. the shorter side is resized to `size["shortest_edge"]` (640) unless the longer side would then
   exceed `size["longest_edge"]` (2560), in which case the longer side is resized to that length;
   each new side is `int(side * scale + 0.5)`. Resizing is done by PIL on the 8-bit image with
   bilinear resampling, as detectron2's `ResizeShortestEdge` test transform does;
3. the 0-255 values are normalized channel-wise with `image_mean` / `image_std` (given in 0-255
   units: the ImageNet statistics the released configs use), optionally after multiplying by
   `rescale_factor` when `do_rescale=True` (then give mean/std in the rescaled units);
4. the batch is zero-padded at the bottom and right (after normalization) to a common size that
   is a multiple of `size_divisibility` (32). `pixel_mask` is 1 on the image, 0 on padding.

Input formats: PIL images (any mode), NumPy arrays and torch tensors (any bit depth, channels first or last), a
single image, a list of images or a 4-d batch; decoded to 8-bit RGB by `eovseg.inputs.decode_image`, whose docstring
gives the rule. EXIF orientation is not applied to images given as objects (`eovseg.inputs.load_image` applies it
to files, as transformers' `load_image` does).

Post-processing takes the model output (`class_queries_logits` `(B, Q, K + 1)` with the void class
last, `masks_queries_logits` `(B, Q, Hp / 4, Wp / 4)` at a quarter of the padded input size, and
`image_sizes` `(B, 2)`, the valid height and width of each image in the padded input) and gives the
same results as the original code: masks are upsampled bilinearly to the padded size, cropped to the
valid region and resized bilinearly to the requested output size before any decision is made.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from ..configuration_eovseg import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD, EovSegInputError
from ..inputs import (
    decode_image,
    decode_segmentation_map,
    describe,
    get_resize_output_shape,
    normalize,
    pad_batch,
    padded_size,
    resize_nearest,
)


logger = logging.get_logger(__name__)

__all__ = ["EovSegImageProcessingMixin", "EovSegImageProcessor"]


_IMAGE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor)
# Masks come out of the model at 1/4 of the padded input size.
_MASK_STRIDE = 4
# Upper bound on the number of full-resolution floats one chunk of masks may hold during panoptic
# post-processing (the queries are processed in chunks with a running argmax).
_PANOPTIC_CHUNK_ELEMENTS = 2_000_000


class EovSegImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    size_divisibility (`int`, *optional*, defaults to 32):
        The padded height and width of a batch are rounded up to a multiple of this number.
    ignore_index (`int`, *optional*, defaults to 255):
        Label of the pixels of a semantic segmentation map that belong to no target.
    """

    size_divisibility: int | None
    ignore_index: int | None


# ---------------------------------------------------------------------------------------------
# Input decoding
# ---------------------------------------------------------------------------------------------


def _split_batch(images: Any, name: str = "images") -> list:
    """Turns `images` (one image, a list/tuple of images or a 4-d batch) into a list of images."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"`{name}` is an empty list; pass at least one image.")
        for i, image in enumerate(images):
            if not isinstance(image, _IMAGE_TYPES):
                raise ValueError(
                    f"{name}[{i}] is a {describe(image)}; expected a PIL.Image.Image, a numpy.ndarray or a "
                    "torch.Tensor."
                )
            if not isinstance(image, PIL.Image.Image) and image.ndim not in (2, 3):
                raise ValueError(
                    f"{name}[{i}] has {image.ndim} dimensions (shape {tuple(image.shape)}); an image in a list "
                    "must have 2 (height, width) or 3 (channels first or last) dimensions."
                )
        return list(images)
    if isinstance(images, PIL.Image.Image):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            if images.shape[0] == 0:
                raise ValueError(f"`{name}` is an empty batch (shape {tuple(images.shape)}).")
            return list(images)
        raise ValueError(
            f"`{name}` has {images.ndim} dimensions (shape {tuple(images.shape)}); expected 2 (height, width), "
            "3 (channels first or last) or 4 (a batch of images)."
        )
    raise ValueError(
        f"`{name}` is a {describe(images)}; expected a PIL.Image.Image, a numpy.ndarray, a torch.Tensor or a "
        "list of them."
    )


# ---------------------------------------------------------------------------------------------
# Mask resizing shared by the post-processing methods
# ---------------------------------------------------------------------------------------------


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of `(n, h, w)` maps, as one call like the original's."""
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


class _MaskResizer:
    """Brings the low-resolution mask logits `(Q, h, w)` of one image to the output size exactly as the original
    does: bilinear upsampling (align_corners=False) of all queries to the padded size `(stride * h, stride * w)`,
    crop to the valid `image_size`, bilinear resize to `target_size` (skipped when it is the crop size: a
    same-size bilinear resize returns its input).

    `resizer(index)` gives the result for the queries in `index` only, computed without touching the others. The
    upsampling only reads the low-resolution rows and columns the crop depends on, and runs on a few queries at a
    time into a reused buffer, so that each query's full-resolution intermediate is still in cache when the second
    resize reads it. These shortcuts are bit-for-bit exact on PyTorch's generic CPU interpolation kernel, whose
    per-pixel weights depend neither on the number of channels nor on the input extent for an integer upsampling
    factor. PyTorch switches to a channels-last kernel for small outputs (height + width <= 128) and, with one
    thread, for exactly 3 channels; that kernel's rounding depends on the number of channels, so where the
    original's call would take it, all queries are resized together as the original does and the requested ones
    are picked afterwards.
    """

    # Queries upsampled together: two 640x960 float intermediates (4.9 MB) stay in the CPU's cache.
    queries_per_resize = 2

    def __init__(self, masks: torch.Tensor, image_size: tuple[int, int], target_size: tuple[int, int],
                 stride: int = _MASK_STRIDE):
        self.masks = masks
        self.num_queries, self.low_h, self.low_w = masks.shape
        self.stride = stride
        self.padded = (self.low_h * stride, self.low_w * stride)
        self.image_size = tuple(image_size)
        self.target_size = tuple(target_size)
        self.same_size = self.target_size == self.image_size
        on_cpu = masks.device.type == "cpu"
        one_thread_rgb = on_cpu and torch.get_num_threads() == 1 and self.num_queries == 3
        self.all_at_stage1 = on_cpu and (sum(self.padded) <= 128 or one_thread_rgb)
        self.all_at_stage2 = on_cpu and not self.same_size and (sum(self.target_size) <= 128 or one_thread_rgb)
        self._stage1_all = None
        self._stage2_all = None
        # Output row `height - 1` reads input rows floor((height - 0.5) / stride - 0.5) and the next one.
        height, width = self.image_size
        need_h = min(self.low_h, (2 * height - 1 - stride) // (2 * stride) + 2)
        need_w = min(self.low_w, (2 * width - 1 - stride) // (2 * stride) + 2)
        if stride * (need_h + need_w) <= 128:  # keep the call on the generic kernel
            need_h, need_w = self.low_h, self.low_w
        self.need = (need_h, need_w)

    def _stage1_of_all(self) -> torch.Tensor:
        if self._stage1_all is None:
            height, width = self.image_size
            self._stage1_all = _bilinear(self.masks, self.padded)[:, :height, :width]
        return self._stage1_all

    def __call__(self, index: torch.Tensor | None = None) -> torch.Tensor:
        if self.all_at_stage2:
            if self._stage2_all is None:
                self._stage2_all = _bilinear(self._stage1_of_all(), self.target_size)
            return self._stage2_all if index is None else self._stage2_all[index]
        if self.all_at_stage1:
            cropped = self._stage1_of_all()
            return self._few_at_a_time(cropped if index is None else cropped[index], upsample=False)
        need_h, need_w = self.need
        masks = self.masks if index is None else self.masks[index]
        return self._few_at_a_time(masks[:, :need_h, :need_w], upsample=True)

    def _few_at_a_time(self, masks: torch.Tensor, upsample: bool) -> torch.Tensor:
        """Resizes `queries_per_resize` queries per call (never 3: see the class docstring): low-resolution logits
        through both stages when `upsample`, else already upsampled and cropped ones through the second stage."""
        count = masks.shape[0]
        height, width = self.image_size
        # Contiguous like the original's interpolation output, so that element-wise kernels run the same way.
        result = masks.new_empty((count, *self.target_size))
        step = self.queries_per_resize
        if upsample:
            up_size = (masks.shape[-2] * self.stride, masks.shape[-1] * self.stride)
            buffer = masks.new_empty((1, min(step, count), *up_size))
        for start in range(0, count, step):
            stop = min(count, start + step)
            part = masks[None, start:stop]
            if upsample:
                up = buffer[:, : stop - start]
                interpolate_bilinear_into(part, up_size, up)
                part = up[:, :, :height, :width]
            if self.same_size:
                result[start:stop] = part[0]
            else:
                interpolate_bilinear_into(part, self.target_size, result[None, start:stop])
        return result


# F.interpolate's own bilinear kernel, whose private entry point writes into a given tensor (no allocation per call).
_UPSAMPLE_BILINEAR2D = getattr(getattr(torch._C, "_nn", None), "upsample_bilinear2d", None)


def interpolate_bilinear_into(values: torch.Tensor, size: tuple[int, int], out: torch.Tensor, private: bool = True):
    """`F.interpolate(values, size, mode="bilinear", align_corners=False)` written into `out` (same shape).

    Runs torch's private `upsample_bilinear2d(..., out=)`, the kernel `F.interpolate` itself calls, hence the same
    numbers without a temporary; when that entry point is absent or its signature changed (or `private=False`),
    the public `F.interpolate` and a copy.
    """
    if private and _UPSAMPLE_BILINEAR2D is not None:
        try:
            return _UPSAMPLE_BILINEAR2D(values, size, False, out=out)
        except TypeError:
            pass
    return out.copy_(F.interpolate(values, size=size, mode="bilinear", align_corners=False))


def _panoptic_argmax(resizer, candidates: torch.Tensor, cand_scores: torch.Tensor, mask_threshold: float):
    """Panoptic post-processing's pixel assignment: per pixel, the candidate with the largest score * sigmoid(mask)
    (the first one on ties), whether that winner's own mask (sigmoid >= mask_threshold) covers the pixel, and each
    candidate's own mask area.

    A running argmax over chunks of candidates: within a chunk `max(0)` gives the first maximal query, across chunks
    a later chunk wins only where it is strictly larger, so ties go to the earliest query, as a single argmax over
    all candidates does.
    """
    n = candidates.numel()
    height, width = resizer.target_size
    chunk = max(1, _PANOPTIC_CHUNK_ELEMENTS // max(1, height * width))
    own_area = torch.zeros(n, dtype=torch.int64, device=cand_scores.device)
    best = winner = winner_own = None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        probs = resizer(candidates[start:stop]).sigmoid_()
        own = probs >= mask_threshold
        # (whole-tensor count_nonzero per query is much faster on CPU than any reduction along a dim)
        own_area[start:stop] = torch.stack([mask.count_nonzero() for mask in own])
        probs.mul_(cand_scores[start:stop].view(-1, 1, 1).to(probs.dtype))
        value, index = _max_with_first_index(probs)
        index_own = own.gather(0, index[None])[0]
        del probs, own
        if start:
            index += start
        if best is None:
            best, winner, winner_own = value, index, index_own
        else:
            better = value > best
            best = torch.maximum(best, value)
            winner = torch.where(better, index, winner)
            winner_own = torch.where(better, index_own, winner_own)
    return winner, winner_own, own_area


def _panoptic_segments(winner, winner_own, own_area, cand_labels, cand_scores, fuse, overlap_mask_area_threshold):
    """The segments of the candidates that keep enough of their own mask (`overlap_mask_area_threshold`), stuff
    classes in `fuse` merged into their first segment: (segment id of each candidate, segments_info)."""
    n = len(cand_labels)
    won_area = torch.bincount(winner.flatten(), minlength=n)
    kept_area = torch.bincount(winner.masked_select(winner_own), minlength=n)
    ratio = won_area.to(torch.float64) / own_area.clamp(min=1).to(torch.float64)
    valid = (won_area > 0) & (own_area > 0) & (kept_area > 0) & (ratio >= overlap_mask_area_threshold)
    segment_of = [0] * n
    segments_info = []
    first_segment_of_class: dict[int, int] = {}
    for k in valid.nonzero().flatten().tolist():
        label = cand_labels[k]
        if label in fuse and label in first_segment_of_class:
            segment_of[k] = first_segment_of_class[label]
            continue
        segment_id = len(segments_info) + 1
        segment_of[k] = segment_id
        if label in fuse:
            first_segment_of_class[label] = segment_id
        segments_info.append(
            {"id": segment_id, "label_id": int(label), "was_fused": label in fuse, "score": float(cand_scores[k])}
        )
    return segment_of, segments_info


def _max_with_first_index(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`values.max(0)`: the maximum along the first dimension and the first index where it is reached, computed
    as `amax` plus a search for the first equal entry, which is about twice as fast on CPU as the indexed
    reduction over a non-contiguous dimension. Falls back to `max(0)` for more than 255 maps and for NaN."""
    best = values.amax(0)
    count = values.shape[0]
    if count > 255 or bool(best.isnan().any()):
        return values.max(0)
    # the first maximal map has the largest rank among the maps equal to the maximum
    rank = torch.arange(count, 0, -1, dtype=torch.uint8, device=values.device).view(-1, *[1] * (values.dim() - 1))
    first = (values == best).view(torch.uint8).mul_(rank).amax(0)
    return best, count - first.long()


def _label_set(label_ids: Iterable[int] | torch.Tensor | None, name: str = "label ids",
               num_classes: int | None = None) -> set[int]:
    """The class ids of `label_ids` as a set; with `num_classes`, ids outside the vocabulary (0 to num_classes - 1)
    are refused: such an id can match no segment, so it would be silently ignored."""
    if label_ids is None:
        return set()
    if isinstance(label_ids, torch.Tensor):
        label_ids = label_ids.flatten().tolist()
    if isinstance(label_ids, (str, bytes)) or not isinstance(label_ids, Iterable):
        raise ValueError(f"{name} must be a collection of class ids (ints), got {label_ids!r}.")
    ids = set()
    for x in label_ids:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) and not (isinstance(x, float) and x.is_integer()):
            raise ValueError(f"{name} must hold class ids (ints), got {x!r}; give ids, not class names.")
        ids.add(int(x))
    outside = sorted(i for i in ids if num_classes is not None and not 0 <= i < num_classes)
    if outside:
        raise ValueError(
            f"{name} holds {outside[:5]}{' ...' if len(outside) > 5 else ''}, outside the vocabulary of the outputs "
            f"({num_classes} classes: ids 0 to {num_classes - 1})."
        )
    return ids


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _describe_value(value: Any) -> str:
    """A value for an error message: its repr when short (a string, a number, a small list), else its type."""
    text = repr(value)
    return text if len(text) <= 60 else describe(value)


def _checked_logits(outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The class and mask logits of a model output. Refused with a one-line message: anything that is not a model
    output (a dict, the tuple of `return_dict=False`, None), logits of inconsistent shapes, and logits holding NaN or
    infinity (a diverged or corrupted model: the argmax over NaN gives one class everywhere, silently)."""
    class_logits = getattr(outputs, "class_queries_logits", None)
    mask_logits = getattr(outputs, "masks_queries_logits", None)
    if not isinstance(class_logits, torch.Tensor) or not isinstance(mask_logits, torch.Tensor):
        got = "None" if outputs is None else f"a {describe(outputs)}"
        hint = " (from return_dict=False: call the model with return_dict=True)" if isinstance(outputs, tuple) else ""
        raise EovSegInputError(
            f"`outputs` must be the model's output (an EovSegOutput with class_queries_logits and "
            f"masks_queries_logits tensors), got {got}{hint}."
        )
    if class_logits.dim() != 3 or class_logits.shape[-1] < 2:
        raise EovSegInputError(
            f"outputs.class_queries_logits must be (batch, queries, classes + 1), got shape {tuple(class_logits.shape)}."
        )
    if mask_logits.dim() != 4 or mask_logits.shape[:2] != class_logits.shape[:2]:
        raise EovSegInputError(
            f"outputs.masks_queries_logits must be (batch, queries, height, width) with the batch and queries of "
            f"class_queries_logits {tuple(class_logits.shape[:2])}, got shape {tuple(mask_logits.shape)}."
        )
    for name, logits in (("class_queries_logits", class_logits), ("masks_queries_logits", mask_logits)):
        if not bool(torch.isfinite(logits).all()):
            raise EovSegInputError(
                f"outputs.{name} holds NaN or infinite values: the model's output is unusable (non-finite weights "
                "or input?); no segmentation can be made from it."
            )
    return class_logits, mask_logits


def _checked_target_sizes(target_sizes: Any, batch_size: int) -> list[tuple[int, int]]:
    """`target_sizes` as one positive (height, width) pair of ints per image, from a list of pairs or a (batch, 2)
    tensor or array; anything else is refused with a message naming `target_sizes`."""
    expected = "one (height, width) pair of positive ints per image (a list of pairs or a (batch, 2) tensor)"
    if isinstance(target_sizes, (torch.Tensor, np.ndarray)):
        if target_sizes.ndim != 2 or target_sizes.shape[-1] != 2:
            raise ValueError(f"`target_sizes` must be {expected}, got {describe(target_sizes)}.")
        target_sizes = target_sizes.tolist()
    elif isinstance(target_sizes, (str, bytes)) or not isinstance(target_sizes, Sequence):
        raise ValueError(f"`target_sizes` must be {expected}, got {_describe_value(target_sizes)}.")
    if len(target_sizes) != batch_size:
        raise ValueError(
            f"`target_sizes` has {len(target_sizes)} entries but the batch has {batch_size} images; give one "
            "(height, width) per image."
        )
    targets = []
    for i, target in enumerate(target_sizes):
        if isinstance(target, (torch.Tensor, np.ndarray)):
            target = target.tolist()
        values = list(target) if isinstance(target, Sequence) and not isinstance(target, (str, bytes)) else None
        if values is not None:
            values = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
        if values is None or len(values) != 2 or not all(_is_int(v) and v >= 1 for v in values):
            raise ValueError(f"target_sizes[{i}] must be a positive (height, width) pair of ints, got "
                             f"{_describe_value(target)}.")
        targets.append((int(values[0]), int(values[1])))
    return targets


def _check_post_process_arguments(**values) -> None:
    """Probability thresholds in [0, 1] (beyond, every result is silently empty) and a positive `top_k`."""
    for name, value in values.items():
        if value is None:
            continue
        if name == "top_k":
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"top_k must be a positive int, got {value!r}.")
        elif isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}.")


SCORE_MODES = ("class", "iou", "class_iou")


def _checked_iou_scores(outputs, score_mode: str, iou_threshold: float) -> torch.Tensor | None:
    """The predicted IoUs (B, Q) that `score_mode` / `iou_threshold` need, None when they need none."""
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {', '.join(SCORE_MODES)}, got {score_mode!r}.")
    if score_mode == "class" and iou_threshold <= 0:
        return None
    iou_scores = getattr(outputs, "iou_scores", None)
    if iou_scores is None:
        raise ValueError(
            f"score_mode={score_mode!r} / iou_threshold={iou_threshold} need predicted IoUs, but the outputs have none: "
            "this model has no trained IoU head (train one with config.mask_filtering=True)."
        )
    return iou_scores


def _instance_candidates(class_logits: torch.Tensor, top_k: int, keep_labels: set[int] | None):
    """The `top_k` (query, class) pairs of one image by class probability (void excluded), as the original ranks
    them, then only those of `keep_labels` when given: their scores, labels and queries."""
    num_classes = class_logits.shape[-1] - 1
    class_probs = F.softmax(class_logits, dim=-1)[:, :-1]
    k = min(int(top_k), class_probs.numel())
    cand_scores, flat_index = class_probs.flatten().topk(k, sorted=True)
    cand_labels = flat_index % num_classes
    cand_queries = torch.div(flat_index, num_classes, rounding_mode="floor")
    if keep_labels is not None:
        keep = torch.tensor([int(c) in keep_labels for c in cand_labels.tolist()], dtype=torch.bool)
        keep = keep.to(cand_labels.device)
        cand_scores, cand_labels, cand_queries = cand_scores[keep], cand_labels[keep], cand_queries[keep]
    return cand_scores, cand_labels, cand_queries


def _instance_masks(resizer, target, cand_queries, cand_scores, mask_threshold: float, device):
    """Binary masks of the candidates at the output size and their scores `class_prob * mean mask probability`.

    Each distinct query is resized once (a query can be a candidate for several classes).
    """
    height, width = target
    if cand_queries.numel() == 0:
        return torch.zeros((0, height, width), dtype=torch.bool, device=device), cand_scores
    queries, inverse = torch.unique(cand_queries, return_inverse=True)
    logits = resizer(queries)
    if mask_threshold == 0.5:
        binary_f = (logits > 0).to(logits.dtype)
    else:
        binary_f = (logits.sigmoid() > mask_threshold).to(logits.dtype)
    mask_scores = (logits.sigmoid().flatten(1) * binary_f.flatten(1)).sum(1) / (binary_f.flatten(1).sum(1) + 1e-6)
    scores = cand_scores * mask_scores[inverse].to(cand_scores.dtype)
    return (binary_f > 0)[inverse], scores


def _instance_ranked(scores, labels, binary, threshold: float):
    """The instances scoring at least `threshold`, by decreasing score (stable: ties keep the top-k order)."""
    keep = scores >= threshold
    scores, labels, binary = scores[keep], labels[keep], binary[keep]
    order = torch.sort(scores, descending=True, stable=True).indices
    return scores[order], labels[order], binary[order]


def _instance_id_map(binary: torch.Tensor, target) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(height, width)` map of instance ids (-1: none) and the indices of the instances visible in it.

    Paints the lowest score first so that the highest-scoring instance shows where masks overlap, then keeps (and
    numbers 0, 1, ... by decreasing score) only the instances left with pixels in the map.
    """
    height, width = target
    segmentation = torch.full((height, width), -1, dtype=torch.int32, device=binary.device)
    for j in range(binary.shape[0] - 1, -1, -1):
        segmentation[binary[j]] = j
    present = torch.zeros(binary.shape[0] + 1, dtype=torch.bool, device=binary.device)
    present[segmentation.flatten().long() + 1] = True
    visible = present[1:].nonzero().flatten()
    lookup = torch.full((binary.shape[0] + 1,), -1, dtype=torch.int32, device=binary.device)
    lookup[visible + 1] = torch.arange(visible.numel(), dtype=torch.int32, device=binary.device)
    return lookup[segmentation.long() + 1], visible


def _default_label_ids_to_fuse(outputs, label_ids_to_fuse):
    """The classes to merge: those given, else the stuff classes the outputs carry, else none (with a warning,
    since the original merges its stuff classes)."""
    if label_ids_to_fuse is None and getattr(outputs, "stuff_class_ids", None) is not None:
        label_ids_to_fuse = outputs.stuff_class_ids.unique().tolist()  # (batch_size, num_stuff), the same rows
    if label_ids_to_fuse is None:
        logger.warning_once(
            "`label_ids_to_fuse` unset: no segments are merged. Pass the stuff class ids to merge them as the "
            "original EOV-Seg does."
        )
    return label_ids_to_fuse


def _panoptic_candidates(class_logits, iou, score_mode: str, iou_threshold: float, threshold: float):
    """The candidate queries (not void, IoU above `iou_threshold` when predicted, score above `threshold`), their
    scores and their most probable classes (a list)."""
    num_classes = class_logits.shape[-1] - 1
    scores, labels = F.softmax(class_logits, dim=-1).max(-1)
    keep = labels.ne(num_classes)
    if iou is not None:
        iou = iou.to(scores.dtype)
        scores = iou if score_mode == "iou" else scores * iou if score_mode == "class_iou" else scores
        keep &= iou > iou_threshold
    keep &= scores > threshold
    candidates = keep.nonzero().flatten()
    return candidates, scores[candidates], labels[candidates].tolist()


def _paint_segments(segmentation, winner, winner_own, segment_of, segments_info):
    """Each pixel a candidate wins inside its own mask takes the id of that candidate's segment (0: none)."""
    if segments_info:
        lookup = torch.tensor(segment_of, dtype=torch.int32, device=segmentation.device)
        segmentation = torch.where(winner_own, lookup[winner], segmentation)
    return segmentation


def _binary_mask_to_coco_rle(mask: torch.Tensor) -> dict:
    """COCO run-length encoding (column-major, `{"size": [H, W], "counts": str}`) of a binary mask."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.to(torch.uint8).cpu().numpy()))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class EovSegImageProcessingMixin:
    r"""
    What the two image processors of EOV-Seg share: their settings, the pre-processing pipeline (decoding, the
    shortest-edge rule, normalization, padding, training targets) and all the post-processing. A backend class puts
    it before transformers' backend ([`EovSegImageProcessor`]: `TorchvisionBackend`, [`EovSegImageProcessorPil`]:
    `PilBackend`), whose `resize` is the one step that differs, and says in `_backend_image` how a decoded uint8
    `(H, W, 3)` array becomes that backend's channels-first image. See the module docstring for the rules.

    Args:
        do_resize (`bool`, *optional*, defaults to `True`):
            Whether to resize the images with the shortest-edge rule.
        size (`dict[str, int]` or `int`, *optional*, defaults to `{"shortest_edge": 640, "longest_edge": 2560}`):
            Target shorter side and maximum longer side. An int sets the shorter side (longer side 2560).
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BILINEAR`):
            PIL resampling filter for the images (annotations always use nearest).
        do_rescale (`bool`, *optional*, defaults to `False`):
            Whether to multiply the 0-255 values by `rescale_factor` before normalizing.
        rescale_factor (`float`, *optional*, defaults to `1/255`):
            Factor used when `do_rescale=True`.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalize with `image_mean` and `image_std`.
        image_mean (`list[float]`, *optional*, defaults to `[123.675, 116.28, 103.53]`):
            Channel means, in 0-255 units.
        image_std (`list[float]`, *optional*, defaults to `[58.395, 57.12, 57.375]`):
            Channel standard deviations, in 0-255 units.
        size_divisibility (`int`, *optional*, defaults to 32):
            The padded batch height and width are multiples of this number (0 or 1: no rounding).
        ignore_index (`int`, *optional*, defaults to 255):
            Label of unlabeled pixels in semantic segmentation maps.
    """

    model_input_names = ["pixel_values", "pixel_mask"]
    valid_kwargs = EovSegImageProcessorKwargs

    do_resize = True
    size = {"shortest_edge": 640, "longest_edge": 2560}
    resample = PILImageResampling.BILINEAR
    do_rescale = False
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = list(IMAGENET_PIXEL_MEAN)
    image_std = list(IMAGENET_PIXEL_STD)
    size_divisibility = 32
    ignore_index = 255

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | int | None = None,
        resample: PILImageResampling | int = PILImageResampling.BILINEAR,
        do_rescale: bool = False,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        size_divisibility: int = 32,
        ignore_index: int | None = 255,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.size = self._standardize_size(size)
        self.resample = PILImageResampling(int(resample))
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = self._standardize_stats(image_mean, IMAGENET_PIXEL_MEAN, "image_mean")
        self.image_std = self._standardize_stats(image_std, IMAGENET_PIXEL_STD, "image_std")
        self.size_divisibility = int(size_divisibility)
        self.ignore_index = ignore_index

    # -- configuration helpers ----------------------------------------------------------------

    @staticmethod
    def _standardize_size(size: Any) -> dict[str, int]:
        """`size` as `{"shortest_edge", "longest_edge"}` positive ints; anything else (a string, a list, a float) is
        refused with a message naming `size`."""
        if size is None:
            return {"shortest_edge": 640, "longest_edge": 2560}
        expected = "an int (the shorter side) or a dict {'shortest_edge': int, 'longest_edge': int}"
        if _is_int(size):
            size = {"shortest_edge": int(size), "longest_edge": 2560}
        elif isinstance(size, Mapping):
            size = {key: size[key] for key in size if size[key] is not None}
        else:
            raise ValueError(f"`size` must be {expected}, got {_describe_value(size)}.")
        if "shortest_edge" not in size or set(size) - {"shortest_edge", "longest_edge"}:
            raise ValueError(f"`size` must be {expected}, got {size}.")
        for key, value in size.items():
            if not _is_int(value) or value < 1:
                raise ValueError(f"`size['{key}']` must be a positive int, got {_describe_value(value)}.")
        return {key: int(value) for key, value in size.items()}

    @staticmethod
    def _standardize_stats(values: Any, default: tuple[float, ...], name: str) -> list[float]:
        if values is None:
            return list(default)
        if isinstance(values, (int, float)):
            return [float(values)] * 3
        values = [float(v) for v in values]
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise ValueError(f"`{name}` must have 1 or 3 values, got {len(values)}.")
        return values

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["resample"] = int(self.resample)
        output.pop("_valid_kwargs_names", None)
        return output

    # -- pre-processing -----------------------------------------------------------------------

    def __call__(self, images, segmentation_maps=None, segments_info=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, segmentation_maps=segmentation_maps, segments_info=segments_info, **kwargs)

    def preprocess(
        self,
        images,
        segmentation_maps=None,
        segments_info=None,
        do_resize: bool | None = None,
        size: dict[str, int] | int | None = None,
        resample: PILImageResampling | int | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        size_divisibility: int | None = None,
        ignore_index: int | None = None,
        input_data_format: ChannelDimension | str | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        r"""
        Resize, normalize and pad a batch of images, and optionally build training targets.

        Args:
            images (`ImageInput`):
                One image, a list of images, or a 4-d batch array (see the module docstring for formats).
            segmentation_maps (`ImageInput`, *optional*):
                One annotation per image, the same size as its image (before resizing). With `segments_info`: a COCO
                panoptic annotation, either the RGB-encoded PNG (id = R + 256 G + 256^2 B) or a 2-d map of segment
                ids. Without: a 2-d semantic label map whose `ignore_index` pixels belong to no target.
            segments_info (`list[list[dict]]`, *optional*):
                Per image, the COCO `segments_info` list: dicts with `"id"`, `"category_id"` (a contiguous class
                index) and optionally `"iscrowd"`. A single image may give the list of dicts directly. An entry
                `None` makes that image's map a semantic label map.
            input_data_format (`ChannelDimension` or `str`, *optional*):
                `"channels_first"` or `"channels_last"` for 3-d array inputs; inferred when unset.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` (or None) for torch tensors, `"np"` for NumPy arrays.
            Other arguments override the processor's attributes of the same name for this call.

        Returns:
            [`BatchFeature`] with `pixel_values` `(B, 3, Hp, Wp)` float32, `pixel_mask` `(B, Hp, Wp)` int64 and, when
            `segmentation_maps` is given, `mask_labels` (a list of `(N_i, Hp, Wp)` float32 binary masks, padded with
            zeros like the images) and `class_labels` (a list of `(N_i,)` int64 class indices).

            Panoptic targets follow the original training mapper: one target per non-crowd entry of `segments_info`,
            in its order (after nearest-neighbour resizing a tiny segment may leave an empty mask; it is kept, as in
            the original). Crowd segments and pixels whose id is not listed in `segments_info` (e.g. 0, unlabeled)
            are covered by no target mask. Semantic targets: one mask per class present, in increasing class order.
        """
        unknown = {k for k, v in kwargs.items() if v is not None} - {"data_format", "device", "image_processor_type"}
        if unknown:
            logger.warning_once(f"{type(self).__name__}.preprocess ignores the unknown arguments {sorted(unknown)}.")
        options = self._call_options(
            do_resize, size, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
            size_divisibility, ignore_index, return_tensors,
        )
        image_list = _split_batch(images, "images")
        decoded = [decode_image(image, f"images[{i}]", input_data_format) for i, image in enumerate(image_list)]
        original_sizes = [image.shape[:2] for image in decoded]
        new_sizes = [self._output_size(h, w, options) for h, w in original_sizes]
        tensors = [self._resize_and_normalize(image, new_size, options) for image, new_size in zip(decoded, new_sizes)]
        pixel_values, pixel_mask = pad_batch(tensors, options.size_divisibility)
        data: dict[str, Any] = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}

        if segmentation_maps is not None:
            data["mask_labels"], data["class_labels"] = self._encode_targets(
                segmentation_maps, segments_info, original_sizes, new_sizes, tuple(pixel_values.shape[-2:]),
                options.ignore_index,
            )
        elif segments_info is not None:
            raise ValueError("`segments_info` was given without `segmentation_maps`.")

        if options.return_tensors == "np":
            data = {
                k: ([t.numpy() for t in v] if isinstance(v, list) else v.numpy()) for k, v in data.items()
            }
        return BatchFeature(data=data)

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) of the `pixel_values` this processor makes, with its own settings, of one image of that
        size: resized, then padded to `size_divisibility`. Batched with images of another processed size, an image is
        padded further, which changes what the model finds in it (the borders, the interpolated positional
        embeddings)."""
        if min(int(height), int(width)) < 2:
            raise ValueError(f"an image is {height}x{width} pixels; both sides must be at least 2 pixels.")
        options = self._call_options(*[None] * 11)
        return padded_size([self._output_size(int(height), int(width), options)], options.size_divisibility)

    def group_by_processed_size(self, sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
        """The indices of images of these (height, width) sizes, grouped by `processed_size` (groups in the order of
        their first image): the images a batch can hold so that each gets the result it gets alone."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (height, width) in enumerate(sizes):
            groups.setdefault(self.processed_size(height, width), []).append(index)
        return list(groups.values())

    def _call_options(
        self, do_resize, size, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
        size_divisibility, ignore_index, return_tensors,
    ) -> SimpleNamespace:
        """This call's options: the arguments given, else the processor's attributes; checked."""
        options = SimpleNamespace(
            do_resize=self.do_resize if do_resize is None else do_resize,
            size=self.size if size is None else self._standardize_size(size),
            resample=self.resample if resample is None else PILImageResampling(int(resample)),
            do_rescale=self.do_rescale if do_rescale is None else do_rescale,
            rescale_factor=self.rescale_factor if rescale_factor is None else rescale_factor,
            do_normalize=self.do_normalize if do_normalize is None else do_normalize,
            image_mean=self.image_mean if image_mean is None else self._standardize_stats(image_mean, (), "image_mean"),
            image_std=self.image_std if image_std is None else self._standardize_stats(image_std, (), "image_std"),
            size_divisibility=self.size_divisibility if size_divisibility is None else int(size_divisibility),
            ignore_index=self.ignore_index if ignore_index is None else ignore_index,
            return_tensors=return_tensors,
        )
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"`return_tensors` must be 'pt' or 'np', got {return_tensors!r}.")
        if options.do_normalize and any(s == 0 for s in options.image_std):
            raise ValueError(f"`image_std` must not contain zeros, got {options.image_std}.")
        return options

    @staticmethod
    def _output_size(height: int, width: int, options: SimpleNamespace) -> tuple[int, int]:
        if not options.do_resize:
            return height, width
        return get_resize_output_shape(height, width, options.size["shortest_edge"], options.size.get("longest_edge"))

    def _resize_and_normalize(self, image: np.ndarray, new_size: tuple[int, int], options: SimpleNamespace) -> torch.Tensor:
        """One decoded uint8 (H, W, 3) image resized by the backend's `resize` (bilinear on 8-bit values, as
        detectron2's test transform), rescaled and normalized: (3, h, w) float32."""
        backend_image = self._backend_image(image)
        if options.do_resize and tuple(image.shape[:2]) != tuple(new_size):
            size = SizeDict(height=int(new_size[0]), width=int(new_size[1]))
            backend_image = self.resize(backend_image, size, resample=options.resample)
        # contiguous channels-first: normalizing and padding a channels-last view is several times slower
        tensor = torch.as_tensor(backend_image).to(torch.float32, memory_format=torch.contiguous_format)
        if options.do_rescale:
            tensor = tensor * options.rescale_factor
        if options.do_normalize:
            tensor = normalize(tensor, options.image_mean, options.image_std)
        return tensor

    def _backend_image(self, image: np.ndarray):
        """A decoded uint8 (H, W, 3) array as the backend's channels-first (3, H, W) image (no copy)."""
        raise NotImplementedError(f"{type(self).__name__} must define `_backend_image` (see EovSegImageProcessingMixin).")

    def _encode_targets(self, segmentation_maps, segments_info, original_sizes, new_sizes, padded_size, ignore_index):
        batch_size = len(original_sizes)
        maps = _split_batch(segmentation_maps, "segmentation_maps")
        if isinstance(segmentation_maps, (np.ndarray, torch.Tensor)) and segmentation_maps.ndim == 3 and batch_size > 1:
            # A (B, H, W) stack of 2-d maps, not one RGB map.
            maps = list(segmentation_maps)
        if len(maps) != batch_size:
            raise ValueError(f"Got {len(maps)} segmentation maps for {batch_size} images.")

        if segments_info is None:
            infos = [None] * batch_size
        elif isinstance(segments_info, (list, tuple)) and (
            len(segments_info) == 0 or all(isinstance(s, dict) for s in segments_info)
        ):
            if batch_size != 1:
                raise ValueError(
                    f"`segments_info` must hold one list of segment dicts per image ({batch_size} images)."
                )
            infos = [list(segments_info)]
        elif isinstance(segments_info, (list, tuple)):
            infos = list(segments_info)
            if len(infos) != batch_size:
                raise ValueError(f"Got {len(infos)} `segments_info` entries for {batch_size} images.")
        else:
            raise ValueError(f"`segments_info` must be a list, got {type(segments_info).__name__}.")

        mask_labels, class_labels = [], []
        for i, (seg_map, info) in enumerate(zip(maps, infos)):
            where = f"segmentation_maps[{i}]"
            label_map = decode_segmentation_map(seg_map, where, panoptic=info is not None)
            if label_map.shape != tuple(original_sizes[i]):
                raise ValueError(
                    f"{where} is {label_map.shape[0]}x{label_map.shape[1]} but images[{i}] is "
                    f"{original_sizes[i][0]}x{original_sizes[i][1]}; an annotation must have the size of its image."
                )
            if info is not None:
                if not isinstance(info, (list, tuple)):
                    raise ValueError(f"segments_info[{i}] must be a list of dicts, got {type(info).__name__}.")
                ids, classes = [], []
                present = set(np.unique(label_map).tolist())
                for j, segment in enumerate(info):
                    if not isinstance(segment, dict) or "id" not in segment or "category_id" not in segment:
                        raise ValueError(f"segments_info[{i}][{j}] must be a dict with 'id' and 'category_id'.")
                    segment_id = int(segment["id"])
                    if segment_id not in present:
                        raise ValueError(
                            f"segments_info[{i}][{j}] has id {segment_id}, which does not occur in {where} (image {i})."
                        )
                    if not segment.get("iscrowd", 0):
                        ids.append(segment_id)
                        classes.append(int(segment["category_id"]))
                label_map = resize_nearest(label_map, new_sizes[i], where)
                values = ids
            else:
                label_map = resize_nearest(label_map, new_sizes[i], where)
                values = np.unique(label_map)
                if ignore_index is not None:
                    values = values[values != ignore_index]
                if values.size and values.min() < 0:
                    raise ValueError(f"{where} holds negative class labels ({int(values.min())}).")
                values = values.tolist()
                classes = values
            label_tensor = torch.from_numpy(label_map)
            masks = torch.zeros((len(values), *padded_size), dtype=torch.float32)
            if values:
                masks[:, : label_tensor.shape[0], : label_tensor.shape[1]] = (
                    label_tensor[None] == torch.tensor(values, dtype=torch.int64).view(-1, 1, 1)
                ).to(torch.float32)
            mask_labels.append(masks)
            class_labels.append(torch.tensor(classes, dtype=torch.int64))
        return mask_labels, class_labels

    # -- post-processing ----------------------------------------------------------------------

    @staticmethod
    def _output_geometry(outputs, target_sizes) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Valid image sizes in the padded input and the requested output sizes, one per image."""
        masks = outputs.masks_queries_logits
        batch_size = masks.shape[0]
        padded = (masks.shape[-2] * _MASK_STRIDE, masks.shape[-1] * _MASK_STRIDE)
        image_sizes = getattr(outputs, "image_sizes", None)
        if image_sizes is None:
            sizes = [padded] * batch_size
        else:
            if isinstance(image_sizes, torch.Tensor):
                image_sizes = image_sizes.tolist()
            sizes = [(int(h), int(w)) for h, w in image_sizes]
            if len(sizes) != batch_size:
                raise ValueError(f"`outputs.image_sizes` has {len(sizes)} entries for a batch of {batch_size}.")
            for i, (h, w) in enumerate(sizes):
                if not (0 < h <= padded[0] and 0 < w <= padded[1]):
                    raise ValueError(
                        f"outputs.image_sizes[{i}] = ({h}, {w}) does not fit the padded size {padded} implied by "
                        "`masks_queries_logits` (4x its spatial size)."
                    )
        if target_sizes is None:
            return sizes, list(sizes)
        return sizes, _checked_target_sizes(target_sizes, batch_size)

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: list[tuple[int, int]] | None = None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """
        Semantic segmentation maps: per pixel, the argmax over classes of
        `sum_q softmax(class_logits)[q, c] * sigmoid(mask_logits)[q]` (void excluded), with the masks resized to the
        output size first, as the original's `semantic_inference`.

        Args:
            outputs: model output with `class_queries_logits`, `masks_queries_logits` and `image_sizes`.
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor`, *optional*):
                Output (height, width) per image; defaults to each image's `image_sizes` entry.
            return_segmentation_scores (`bool`, *optional*, defaults to `False`):
                Also return the per-class scores the map is the argmax of, as Mask2Former's method does.

        Returns:
            `list[torch.Tensor]`: one `(height, width)` int64 map of class indices per image; with
            `return_segmentation_scores`, one [`SemanticSegmentationPostProcessorOutput`] per image instead, with
            `segmentation` (that map) and `segmentation_scores` (`(num_classes, height, width)`, the summed
            `class probability * mask probability` of each class, void excluded).
        """
        class_logits, mask_logits = _checked_logits(outputs)
        image_sizes, targets = self._output_geometry(outputs, target_sizes)
        results = []
        for i in range(class_logits.shape[0]):
            masks = _MaskResizer(mask_logits[i], image_sizes[i], targets[i])().to(class_logits.dtype)
            class_probs = F.softmax(class_logits[i], dim=-1)[..., :-1]
            semseg = torch.einsum("qc,qhw->chw", class_probs, masks.sigmoid())
            if return_segmentation_scores:
                results.append(SemanticSegmentationPostProcessorOutput(
                    data={"segmentation": semseg.argmax(0), "segmentation_scores": semseg}
                ))
            else:
                results.append(semseg.argmax(0))
        return results

    def post_process_instance_segmentation(
        self,
        outputs,
        threshold: float = 0.0,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float | None = None,
        target_sizes: list[tuple[int, int]] | None = None,
        return_coco_annotation: bool = False,
        return_binary_maps: bool = False,
        top_k: int = 100,
        thing_ids: Iterable[int] | None = None,
    ):
        """
        Instance segmentation as the original's `instance_inference`: the `top_k` (query, class) pairs by class
        probability (void excluded), optionally restricted to the classes in `thing_ids` (the original keeps thing
        classes only when panoptic evaluation is on), each with the binary mask `sigmoid(mask_logit) > 0.5`, i.e.
        `mask_logit > 0` (after resizing to the output size), and the score
        `class_prob * sum(sigmoid * mask) / (sum(mask) + 1e-6)`. The parameter order follows Mask2Former's method.

        Args:
            outputs: model output with `class_queries_logits`, `masks_queries_logits` and `image_sizes`.
            threshold (`float`, *optional*, defaults to 0.0):
                Instances with a score below this are dropped (the default keeps all of them, as the original).
            mask_threshold (`float`, *optional*, defaults to 0.5):
                A pixel is in an instance mask when its mask probability is above this (0.5: `mask_logit > 0`).
            overlap_mask_area_threshold (`float`, *optional*):
                Accepted for compatibility with the `image-segmentation` pipeline; unused (instances may overlap).
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor`, *optional*):
                Output (height, width) per image; defaults to each image's `image_sizes` entry.
            top_k (`int`, *optional*, defaults to 100):
                Number of (query, class) candidates (the original's `TEST.DETECTIONS_PER_IMAGE`).
            thing_ids (`Iterable[int]`, *optional*):
                If given, only candidates of these classes are kept (after the top-k selection, as the original).
            return_binary_maps (`bool`, *optional*, defaults to `False`):
                Return `segmentation` as a `(num_instances, height, width)` bool tensor of the instance masks.
            return_coco_annotation (`bool`, *optional*, defaults to `False`):
                Return `segmentation` as a list of COCO RLE dicts (`{"size", "counts"}`), one per instance.

        Returns:
            `list[dict]`, one per image, with
            - **segmentation**: with `return_binary_maps`, the `(num_instances, height, width)` bool masks of all
              the instances, overlapping ones and empty ones (score 0) included, as the original returns them; with
              `return_coco_annotation`, their RLEs; by default a `(height, width)` int32 map of instance ids, -1
              where there is none, showing the highest-scoring instance where masks overlap. The map cannot hold
              hidden or empty instances, so by default only the instances visible in it are listed.
            - **segments_info**: one dict per instance (in the same order as the binary masks), by decreasing
              score: `id` (0, 1, ...), `label_id`, `score` and `was_fused` (always False).
        """
        if return_binary_maps and return_coco_annotation:
            raise ValueError("`return_binary_maps` and `return_coco_annotation` cannot both be True.")
        _check_post_process_arguments(threshold=threshold, mask_threshold=mask_threshold,
                                      overlap_mask_area_threshold=overlap_mask_area_threshold, top_k=top_k)
        class_logits, mask_logits = _checked_logits(outputs)
        image_sizes, targets = self._output_geometry(outputs, target_sizes)
        num_classes = class_logits.shape[-1] - 1
        keep_labels = None if thing_ids is None else _label_set(thing_ids, "thing_ids", num_classes)
        results = []
        for i in range(class_logits.shape[0]):
            cand_scores, cand_labels, cand_queries = _instance_candidates(class_logits[i], top_k, keep_labels)
            binary, scores = _instance_masks(
                _MaskResizer(mask_logits[i], image_sizes[i], targets[i]), targets[i], cand_queries, cand_scores,
                mask_threshold, mask_logits.device,
            )
            scores, labels, binary = _instance_ranked(scores, cand_labels, binary, threshold)
            if return_binary_maps:
                segmentation = binary
            elif return_coco_annotation:
                segmentation = [_binary_mask_to_coco_rle(m) for m in binary]
            else:
                segmentation, visible = _instance_id_map(binary, targets[i])
                scores, labels = scores[visible], labels[visible]
            segments = [
                {"id": j, "label_id": int(c), "was_fused": False, "score": float(s)}
                for j, (c, s) in enumerate(zip(labels.tolist(), scores.tolist()))
            ]
            results.append({"segmentation": segmentation, "segments_info": segments})
        return results

    def post_process_panoptic_segmentation(
        self,
        outputs,
        threshold: float = 0.0,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: Iterable[int] | None = None,
        target_sizes: list[tuple[int, int]] | None = None,
        score_mode: str = "class",
        iou_threshold: float = 0.0,
    ):
        """
        Panoptic segmentation, segment for segment the original's `panoptic_inference` (after its mask resizing).

        A query is a candidate when its most probable class (softmax over the class logits, void included) is not
        void and that probability is above `threshold`. Each pixel goes to the candidate with the largest
        `probability * sigmoid(mask)` (the first one on ties). A candidate makes a segment when the pixels it wins
        and the pixels of its own mask (`sigmoid >= mask_threshold`) both exist and intersect, and when it wins at
        least `overlap_mask_area_threshold` of its own mask's area; the segment is that intersection. Candidates of a
        class in `label_ids_to_fuse` (pass the stuff classes: the original merges exactly the non-thing classes)
        join the first segment of their class; the others (things) each make their own. Segment ids are 1, 2, ... in
        query order; 0 marks pixels of no segment.

        Only the candidate queries are resized to full resolution, in chunks with a running argmax, and the
        per-segment tests are done for all candidates at once.

        Args:
            outputs: model output with `class_queries_logits`, `masks_queries_logits` and `image_sizes`.
            threshold (`float`, *optional*, defaults to 0.0):
                Class-probability threshold for candidates (the original's `OBJECT_MASK_THRESHOLD`).
            mask_threshold (`float`, *optional*, defaults to 0.5):
                Threshold on the mask probability for a query's own mask.
            overlap_mask_area_threshold (`float`, *optional*, defaults to 0.8):
                Minimum fraction of its own mask a query must win (the original's `OVERLAP_THRESHOLD`).
            label_ids_to_fuse (`Iterable[int]`, *optional*):
                Classes whose segments are merged into one per image (the stuff classes). None: the stuff classes of
                the model's default vocabulary when the outputs carry them (`outputs.stuff_class_ids`, set when the
                model ran on its default vocabulary), else nothing is merged.
            target_sizes (`list[tuple[int, int]]` or `torch.Tensor`, *optional*):
                Output (height, width) per image; defaults to each image's `image_sizes` entry.
            score_mode (`str`, *optional*, defaults to `"class"`):
                The score of a query (OPSNet's Mask Filtering): `"class"` its class probability (the original),
                `"iou"` its predicted IoU, `"class_iou"` their product. The class is the most probable one in every
                mode; the IoU modes need a model with an IoU head (`config.mask_filtering`, `outputs.iou_scores`).
            iou_threshold (`float`, *optional*, defaults to 0.0):
                Queries whose predicted IoU is not above this are dropped (needs `outputs.iou_scores` when > 0).

        Returns:
            `list[dict]`, one per image, with
            - **segmentation**: `(height, width)` int32 tensor of segment ids, 0 where there is no segment;
            - **segments_info**: one dict per segment: `id`, `label_id`, `was_fused` (True when `label_id` is in
              `label_ids_to_fuse`) and `score`, the class probability of the query that opened the segment.
        """
        class_logits, mask_logits = _checked_logits(outputs)
        label_ids_to_fuse = _default_label_ids_to_fuse(outputs, label_ids_to_fuse)
        _check_post_process_arguments(threshold=threshold, mask_threshold=mask_threshold,
                                      overlap_mask_area_threshold=overlap_mask_area_threshold)
        fuse = _label_set(label_ids_to_fuse, "label_ids_to_fuse", class_logits.shape[-1] - 1)
        image_sizes, targets = self._output_geometry(outputs, target_sizes)
        iou_scores = _checked_iou_scores(outputs, score_mode, iou_threshold)
        results = []
        for i in range(class_logits.shape[0]):
            candidates, cand_scores, cand_labels = _panoptic_candidates(
                class_logits[i], None if iou_scores is None else iou_scores[i], score_mode, iou_threshold, threshold
            )
            segmentation = torch.zeros(targets[i], dtype=torch.int32, device=mask_logits.device)
            if candidates.numel() == 0:
                results.append({"segmentation": segmentation, "segments_info": []})
                continue
            resizer = _MaskResizer(mask_logits[i], image_sizes[i], targets[i])
            winner, winner_own, own_area = _panoptic_argmax(resizer, candidates, cand_scores, mask_threshold)
            segment_of, segments_info = _panoptic_segments(
                winner, winner_own, own_area, cand_labels, cand_scores, fuse, overlap_mask_area_threshold
            )
            segmentation = _paint_segments(segmentation, winner, winner_own, segment_of, segments_info)
            results.append({"segmentation": segmentation, "segments_info": segments_info})
        return results


class EovSegImageProcessor(EovSegImageProcessingMixin, TorchvisionBackend):
    r"""
    Image processor of EOV-Seg on transformers' torchvision backend: images are resized by torchvision (antialiased
    bilinear on uint8 tensors). Arguments, outputs and post-processing are those of [`EovSegImageProcessingMixin`],
    shared with [`EovSegImageProcessorPil`].

    The two backends differ in the resize only: equal bit for bit when an image is upscaled, up to 2 grey levels in a
    few percent of the pixels when it is downscaled (short side above `size["shortest_edge"]`). The released weights
    were trained and evaluated with PIL's resize, so `AutoImageProcessor.from_pretrained` and
    `EovSegProcessor.from_pretrained` choose the PIL backend for an EOV-Seg folder unless `backend="torchvision"` is
    given (see `eovseg.auto_registration`).
    """

    def _backend_image(self, image: np.ndarray) -> torch.Tensor:
        if not image.flags.writeable:
            image = image.copy()
        # (H, W, 3) viewed as (3, H, W): torchvision's uint8 resize is fastest on this channels-last layout.
        return torch.from_numpy(image).permute(2, 0, 1)

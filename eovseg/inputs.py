"""Input and target conversion shared by the image processor, training, evaluation, pipelines, demo and `predict`.

One place for each step from what a user or a data set holds to what the model takes:

* [`load_image`]: a path opened as it is stored (16-bit, float and palette images keep their values for
  [`decode_image`]; EXIF orientation applied, as transformers' `load_image` does); URLs and base64 strings through
  transformers' `load_image`;
* [`decode_image`]: any image (PIL of any mode, NumPy array, torch tensor; any bit depth) to 8-bit RGB, by the rule
  below; [`to_rgb_image`] gives it as a PIL image (for overlays and the web demo);
* [`decode_panoptic_ids`] and [`decode_label_map`] ([`decode_segmentation_map`] picks one): panoptic annotations
  (COCO's RGB-encoded PNGs, palette ones included, through transformers' `rgb_to_id`, or 2-d id maps) and semantic
  label maps (2-d, single-channel, palette or 16-bit images) to int64 maps, from PIL images, paths, arrays, tensors or
  nested lists; [`normalize_segments`] reads their `segments_info`; [`resize_nearest`] resizes them on 32-bit
  integers;
* [`resize_image`] (PIL, as detectron2) and [`get_resize_output_shape`]: the test-time resize rule;
* [`normalize`] and [`pad_batch`]: per-channel normalisation with the statistics of the configuration
  (`IMAGENET_PIXEL_MEAN` / `IMAGENET_PIXEL_STD`) and zero padding of a batch to a multiple of 32, with its
  `pixel_mask`.

Image formats (a single image; the processor also takes lists and 4-d batches): arrays may be `(H, W)`,
channels-last `(H, W, C)` or channels-first `(C, H, W)` with C in {1, 3, 4}. Unless `input_data_format` says
otherwise the layout is inferred: the axis that can hold channels; if both can, the one of size 3; if still
ambiguous (e.g. `(3, 5, 3)`), channels-first for torch tensors and channels-last for NumPy arrays. One channel is
replicated to RGB; a fourth (alpha) channel is dropped. Values are brought to 8 bits by this rule:

- `uint8`: as is; `bool`: False -> 0, True -> 255;
- `uint16` (and PIL modes `I;16*`): `round(v / 257)`, i.e. 0-65535 mapped onto 0-255;
- other integer types (and PIL mode `I`): must already lie in 0-255;
- floating point (and PIL mode `F`): if every value lies in [0, 1] the image is taken as already rescaled and is
  multiplied by 255; otherwise the values must lie in [0, 255]. Either way the result is rounded to the nearest
  integer. (An all-dark 0-255 float image whose maximum is <= 1 is therefore read as a [0, 1] image; pass such
  images as `uint8` to avoid the ambiguity.)

Other PIL modes (`L`, `LA`, `P`, `RGBA`, `CMYK`, ...) are converted with `Image.convert("RGB")`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_transforms import rgb_to_id as _transformers_rgb_to_id
from transformers.image_utils import ChannelDimension, infer_channel_dimension_format

__all__ = [
    "as_int",
    "decode_image",
    "decode_label_map",
    "decode_panoptic_ids",
    "decode_segmentation_map",
    "get_resize_output_shape",
    "load_image",
    "read_image_file",
    "normalize",
    "normalize_segments",
    "pad_batch",
    "resize_image",
    "resize_nearest",
    "rgb_to_id",
    "segmentation_map_array",
    "to_rgb_image",
]

_VALID_CHANNELS = (1, 3, 4)


def describe(obj: Any) -> str:
    """A short description of an input for error messages."""
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return f"{type(obj).__name__} of shape {tuple(obj.shape)}"
    return type(obj).__name__



# ----------------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------------


def load_image(source: Any, timeout: float | None = None) -> Any:
    """An image from a path (str or `os.PathLike`), a URL or a base64 string; anything else is returned as it is.

    A file is opened with its stored mode (a 16-bit PNG stays 16-bit, so that [`decode_image`] scales it rather
    than `convert("RGB")` saturating it) and its EXIF orientation applied. URLs and base64 strings go through
    transformers' `load_image`.
    """
    if isinstance(source, os.PathLike) or (isinstance(source, str) and os.path.isfile(source)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"image file {os.fspath(source)!r} not found.")
        with PIL.Image.open(source) as image:
            image.load()
            return PIL.ImageOps.exif_transpose(image)
    if isinstance(source, str) and _names_a_file(source):
        if os.path.isdir(source):
            raise IsADirectoryError(f"{source!r} is a folder, not an image file.")
        raise FileNotFoundError(f"image file {source!r} not found.")
    if isinstance(source, str):
        from transformers.image_utils import load_image as load_remote_image

        return load_remote_image(source, timeout=timeout)
    return source


_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n\r")


def _names_a_file(source: str) -> bool:
    """Whether a string that is no existing file was meant as a path: not a URL, not a data URI, and not base64 (a
    character outside its alphabet, such as the dot of a suffix, or too short to hold an image)."""
    if source.startswith(("http://", "https://", "data:")):
        return False
    return len(source) < 64 or not set(source) <= _BASE64


def read_image_file(path: str | os.PathLike, where: str | None = None) -> PIL.Image.Image:
    """An image file decoded to 8-bit RGB by the rule of the module docstring: what `eovseg predict`, the demo and
    the web page read, so that one file gives one result. Errors are one line naming the file: `FileNotFoundError`
    for a missing file, `ValueError` for one that is no image or holds values the rule refuses."""
    where = where or repr(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{where} is a folder, not an image file.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {where} not found.")
    try:
        image = load_image(os.fspath(path))
    except Exception as err:  # PIL raises several types for files that are no image
        raise ValueError(f"cannot read {where} as an image ({type(err).__name__}: {err}).") from None
    return to_rgb_image(image, where)


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.numpy()


def to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """Brings pixel values to uint8 following the rule in the module docstring."""
    dtype = array.dtype
    if dtype == np.uint8:
        return array
    if dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if dtype == np.uint16:
        # v / 257 maps 0-65535 onto 0-255 (65535 = 255 * 257); 257 is odd so there are no ties.
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{where} has dtype {dtype} with values in [{low}, {high}]; integer images other than uint16 must "
                "hold 0-255 values (pass 16-bit data as uint16)."
            )
        return array.astype(np.uint8)
    if np.issubdtype(dtype, np.floating):
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise ValueError(f"{where} contains NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low >= 0.0 and high <= 1.0:
            array = array * 255.0
        elif low < 0.0 or high > 255.0:
            raise ValueError(
                f"{where} is a floating-point image with values in [{low:g}, {high:g}]; expected values in [0, 1] "
                "(rescaled) or in [0, 255]."
            )
        return np.rint(array).astype(np.uint8)
    raise ValueError(f"{where} has unsupported dtype {dtype}.")


def decode_image(image: Any, where: str = "image", input_data_format: ChannelDimension | str | None = None) -> np.ndarray:
    """An image (PIL of any mode, NumPy array, torch tensor, or a path) as a contiguous uint8 (H, W, 3) RGB array,
    by the rule of the module docstring."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, PIL.Image.Image):
        if image.width < 2 or image.height < 2:
            raise ValueError(f"{where} is {image.height}x{image.width} pixels; both sides must be at least 2 pixels.")
        if image.mode.startswith("I;16") or image.mode in ("I", "F"):
            array = np.array(image)
            if array.dtype.byteorder not in ("=", "|"):
                array = array.astype(array.dtype.newbyteorder("="))
            array = to_uint8(array, where)
            return np.ascontiguousarray(np.repeat(array[:, :, None], 3, axis=2))
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.array(image, dtype=np.uint8)

    array = tensor_to_numpy(image) if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        first_ok, last_ok = array.shape[0] in _VALID_CHANNELS, array.shape[-1] in _VALID_CHANNELS
        if input_data_format is not None:
            layout = ChannelDimension(input_data_format)
        elif not first_ok and not last_ok:
            raise ValueError(
                f"{where} has shape {tuple(array.shape)}: neither its first nor its last axis holds 1 (grayscale), "
                "3 (RGB) or 4 (RGBA) channels."
            )
        elif first_ok != last_ok:
            layout = infer_channel_dimension_format(array, num_channels=_VALID_CHANNELS)
        elif (array.shape[0] == 3) != (array.shape[-1] == 3):
            layout = ChannelDimension.FIRST if array.shape[0] == 3 else ChannelDimension.LAST
        else:
            # Still ambiguous (e.g. (3, 5, 3)): tensors are usually channels-first, arrays channels-last.
            layout = ChannelDimension.FIRST if isinstance(image, torch.Tensor) else ChannelDimension.LAST
        if layout == ChannelDimension.FIRST:
            array = np.moveaxis(array, 0, -1)
        if array.shape[-1] not in _VALID_CHANNELS:
            raise ValueError(
                f"{where} has {array.shape[-1]} channels (shape {tuple(image.shape)}); expected 1 (grayscale), "
                "3 (RGB) or 4 (RGBA)."
            )
    else:
        raise ValueError(
            f"{where} has {array.ndim} dimensions (shape {tuple(array.shape)}); expected 2 (height, width) or 3 "
            "(channels first or last)."
        )
    height, width = array.shape[:2]
    if height < 2 or width < 2:
        raise ValueError(f"{where} is {height}x{width} pixels; both sides must be at least 2 pixels.")
    array = to_uint8(array, where)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[-1] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def to_rgb_image(image: Any, where: str = "image") -> PIL.Image.Image:
    """[`decode_image`] as a PIL RGB image (16-bit and float images scaled, not saturated)."""
    return PIL.Image.fromarray(decode_image(image, where))


def resize_image(image: np.ndarray, new_hw: tuple[int, int], resample: int = PIL.Image.BILINEAR) -> np.ndarray:
    """A uint8 (H, W, 3) image resized by PIL (as detectron2 resizes images), to `new_hw` = (height, width)."""
    if image.shape[:2] == tuple(new_hw):
        return image  # PIL's resize to the same size is a copy
    return np.array(PIL.Image.fromarray(image).resize((new_hw[1], new_hw[0]), resample))


def get_resize_output_shape(height: int, width: int, shortest_edge: int, longest_edge: int | None) -> tuple[int, int]:
    """The output (height, width) of detectron2's `ResizeShortestEdge` test transform: the shorter side becomes
    `shortest_edge` unless the longer one would then exceed `longest_edge`, in which case the longer side becomes
    `longest_edge`; each side is rounded with `int(x + 0.5)`."""
    scale = shortest_edge / min(height, width)
    if height < width:
        new_h, new_w = float(shortest_edge), scale * width
    else:
        new_h, new_w = scale * height, float(shortest_edge)
    if longest_edge is not None and max(new_h, new_w) > longest_edge:
        rescale = longest_edge / max(new_h, new_w)
        new_h, new_w = new_h * rescale, new_w * rescale
    # A very thin image (20000x2) would round its short side to 0 pixels: keep at least one.
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))



# ----------------------------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------------------------


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Segment ids (int64) of a COCO-panoptic RGB-encoded (H, W, 3) map: transformers' `rgb_to_id`,
    `R + 256 * G + 256**2 * B`, computed in 64 bits whatever the array's integer type."""
    return np.asarray(_transformers_rgb_to_id(np.asarray(rgb).astype(np.int64)), dtype=np.int64)


# PIL modes of a panoptic annotation whose colours encode the ids (a palette PNG included); a semantic label map
# keeps the values of its mode instead ("P": the palette indices, "L" / "I" / "I;16": the values).
_COLOUR_ENCODED_MODES = ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr")


def segmentation_map_array(seg_map: Any, where: str, panoptic: bool) -> np.ndarray:
    """The array of an annotation given as a PIL image, a path to an image file (read as stored), a NumPy array, a
    torch tensor or nested lists. A panoptic annotation's colour image is read as RGB (see [`decode_panoptic_ids`])."""
    if isinstance(seg_map, (str, os.PathLike)):
        with PIL.Image.open(seg_map) as image:
            return segmentation_map_array(image, where, panoptic)
    if isinstance(seg_map, PIL.Image.Image):
        if panoptic and seg_map.mode in _COLOUR_ENCODED_MODES:
            seg_map = seg_map.convert("RGB")
        array = np.array(seg_map)
        return array.astype(array.dtype.newbyteorder("=")) if array.dtype.byteorder not in ("=", "|") else array
    if isinstance(seg_map, torch.Tensor):
        return tensor_to_numpy(seg_map)
    if isinstance(seg_map, np.ndarray):
        return seg_map
    if isinstance(seg_map, (list, tuple)):
        return np.asarray(seg_map)
    raise ValueError(
        f"{where} is a {describe(seg_map)}; expected a PIL image, a path to one, a numpy.ndarray, a torch.Tensor or "
        "nested lists."
    )


def _channels_last(array: np.ndarray, where: str) -> np.ndarray:
    """A (H, W) map, or a (H, W, 3) colour map from channels-last or channels-first arrays (alpha dropped, a single
    channel squeezed; the last axis is read as channels when both could be)."""
    if array.ndim != 3:
        return array
    if array.shape[-1] in (3, 4):
        return array[..., :3]
    if array.shape[0] in (3, 4):
        return np.moveaxis(array[:3], 0, -1)
    if array.shape[-1] == 1:
        return array[..., 0]
    if array.shape[0] == 1:
        return array[0]
    raise ValueError(f"{where} has shape {tuple(array.shape)}; expected (H, W), (H, W, 3) or (3, H, W).")


def _integer_map(array: np.ndarray, where: str) -> np.ndarray:
    """A 2-d map of integers (bool, integer, or integral floating-point values) as int64."""
    if array.ndim != 2:
        raise ValueError(f"{where} has {array.ndim} dimensions (shape {tuple(array.shape)}); expected a 2-d map.")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{where} is a floating-point map with non-integer values.")
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"{where} has unsupported dtype {array.dtype}.")
    return array.astype(np.int64)


def decode_panoptic_ids(seg_map: Any, where: str) -> np.ndarray:
    """Segment ids (int64, (H, W)) of a panoptic annotation: a COCO-panoptic RGB-encoded map (a PNG of any colour
    mode, palette included, or a (H, W, 3) / (3, H, W) array of 0-255 integers) through `rgb_to_id`, or a 2-d map
    of ids."""
    array = _channels_last(segmentation_map_array(seg_map, where, panoptic=True), where)
    if array.ndim == 3:
        if not (array.dtype == np.uint8 or _holds_bytes(array)):
            raise ValueError(
                f"{where} is an RGB-encoded panoptic map and must hold integers in 0-255 (uint8), got {array.dtype}."
            )
        return rgb_to_id(array)
    return _integer_map(array, where)


def _holds_bytes(array: np.ndarray) -> bool:
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        return False
    return array.size == 0 or bool(np.all(array == np.round(array)) and array.min() >= 0 and array.max() <= 255)


def decode_label_map(seg_map: Any, where: str) -> np.ndarray:
    """Class labels (int64, (H, W)) of a semantic label map: a 2-d map, a single-channel image (a palette PNG gives
    its indices, as Pascal VOC stores labels) or a 16-bit one."""
    array = _channels_last(segmentation_map_array(seg_map, where, panoptic=False), where)
    if array.ndim == 3:
        raise ValueError(
            f"{where} is a 3-channel map; a semantic label map is 2-d (height, width). COCO panoptic (RGB-encoded) "
            "annotations need their `segments_info`."
        )
    return _integer_map(array, where)


def decode_segmentation_map(seg_map: Any, where: str, panoptic: bool) -> np.ndarray:
    """[`decode_panoptic_ids`] for a panoptic annotation, [`decode_label_map`] for a semantic one."""
    return decode_panoptic_ids(seg_map, where) if panoptic else decode_label_map(seg_map, where)


def as_int(value: Any, where: str) -> int:
    """An integer annotation field (a segment id, a category id) from an int, a NumPy / torch scalar or an
    integral float."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)):
        raise TypeError(f"{where}: expected an integer, got {value!r}.")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{where}: expected an integer, got {value!r}.")
    return int(value)


def normalize_segments(segments: Any, where: str) -> list[Mapping]:
    """`segments_info` as a list of dicts, from a list of dicts or the columns-of-lists form a `datasets.Sequence`
    of a struct gives (`{"id": [...], "category_id": [...]}`)."""
    if segments is None:
        return []
    if isinstance(segments, Mapping):
        # Column-oriented form, as `datasets` may store a sequence of structs.
        keys = list(segments)
        lengths = {len(segments[k]) for k in keys}
        if len(lengths) > 1:
            raise ValueError(f"{where}: the columns of segments_info have different lengths {sorted(lengths)}.")
        n = lengths.pop() if lengths else 0
        return [{k: segments[k][i] for k in keys} for i in range(n)]
    if not isinstance(segments, Sequence):
        raise TypeError(f"{where}: segments_info must be a list of dicts, got {type(segments).__name__}.")
    for i, segment in enumerate(segments):
        if not isinstance(segment, Mapping):
            raise TypeError(f"{where}: segments_info[{i}] must be a dict, got {type(segment).__name__}.")
    return list(segments)


def resize_nearest(label_map: np.ndarray, new_hw: tuple[int, int], where: str) -> np.ndarray:
    """Nearest-neighbour resize through PIL (as detectron2 resizes annotations), on 32-bit integers."""
    if label_map.shape == tuple(new_hw):
        return label_map
    if label_map.size and (label_map.min() < np.iinfo(np.int32).min or label_map.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{where} holds values that do not fit in 32 bits.")
    pil = PIL.Image.fromarray(label_map.astype(np.int32))  # mode "I"
    resized = pil.resize((new_hw[1], new_hw[0]), PIL.Image.NEAREST)
    return np.array(resized).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------------
# Normalisation and padding
# ----------------------------------------------------------------------------------------------------------------------


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(image - mean) / std per channel of a float (3, H, W) tensor (statistics in the image's units)."""
    mean = torch.as_tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    return (image - mean) / std


def padded_size(sizes: Sequence[tuple[int, int]], size_divisibility: int) -> tuple[int, int]:
    """The common (height, width) of a batch: the largest of each, rounded up to a multiple of `size_divisibility`."""
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    if size_divisibility > 1:
        height = math.ceil(height / size_divisibility) * size_divisibility
        width = math.ceil(width / size_divisibility) * size_divisibility
    return height, width


def pad_batch(
    images: Sequence[torch.Tensor], size_divisibility: int, valid_sizes: Sequence[tuple[int, int]] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pixel_values` (B, 3, Hp, Wp): the (3, h, w) images zero-padded at the bottom and right to a common size
    divisible by `size_divisibility`; `pixel_mask` (B, Hp, Wp) int64: 1 on each image's valid region (its size, or
    `valid_sizes` when an augmentation padded it already)."""
    sizes = [tuple(image.shape[-2:]) for image in images]
    height, width = padded_size(sizes, size_divisibility)
    pixel_values = torch.zeros((len(images), 3, height, width), dtype=torch.float32)
    pixel_mask = torch.zeros((len(images), height, width), dtype=torch.int64)
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        pixel_values[i, :, :h, :w] = image
        valid_h, valid_w = valid_sizes[i] if valid_sizes is not None else (h, w)
        pixel_mask[i, :valid_h, :valid_w] = 1
    return pixel_values, pixel_mask

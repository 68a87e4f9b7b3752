"""Tests of the EOV-Seg image processors (PIL and torchvision backends): pre-processing rules, training targets and
post-processing. The rules are tested on the PIL backend, the default, whose resize is the original's; the
torchvision backend is tested against it."""

import math
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from eovseg.processing.image_processing_eovseg import EovSegImageProcessor, get_resize_output_shape
from eovseg.processing.image_processing_pil_eovseg import EovSegImageProcessorPil


MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


@pytest.fixture(scope="module")
def processor():
    return EovSegImageProcessorPil()


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# Resizing, normalization, padding
# ---------------------------------------------------------------------------------------------

# (height, width) -> resized (height, width), worked out by hand from the detectron2 rule:
# scale = 640 / short side; if the long side would exceed 2560, scale = 2560 / long side; int(x * scale + 0.5).
RESIZE_CASES = [
    ((480, 640), (640, 853)),  # 640 * 640 / 480 = 853.33
    ((640, 480), (853, 640)),
    ((333, 500), (640, 961)),  # 500 * 640 / 333 = 960.96
    ((427, 640), (640, 959)),  # 640 * 640 / 427 = 959.25
    ((1000, 1000), (640, 640)),
    ((100, 1000), (256, 2560)),  # 1000 * 6.4 = 6400 > 2560 -> scale 0.4 overall
    ((10, 4000), (6, 2560)),  # 10 * 640 / 10 * 2560 / 256000 = 6.4
    ((7, 5), (896, 640)),
]


@pytest.mark.parametrize("size,expected", RESIZE_CASES)
def test_resize_rule(size, expected):
    assert get_resize_output_shape(*size, 640, 2560) == expected


@pytest.mark.parametrize("size,expected", RESIZE_CASES[:5] + RESIZE_CASES[7:])
def test_resized_shape_padding_and_mask(processor, size, expected):
    out = processor(random_image(*size))
    h, w = expected
    hp, wp = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
    assert tuple(out["pixel_values"].shape) == (1, 3, hp, wp)
    assert out["pixel_values"].dtype == torch.float32
    assert tuple(out["pixel_mask"].shape) == (1, hp, wp)
    assert out["pixel_mask"].dtype == torch.int64
    assert int(out["pixel_mask"].sum()) == h * w
    assert out["pixel_mask"][0, :h, :w].all()
    assert not out["pixel_mask"][0, h:, :].any() and not out["pixel_mask"][0, :, w:].any()
    # zero padding after normalization
    assert out["pixel_values"][0, :, h:, :].abs().sum() == 0
    assert out["pixel_values"][0, :, :, w:].abs().sum() == 0
    assert processor.processed_size(*size) == (hp, wp)


def test_custom_size_and_no_resize():
    processor = EovSegImageProcessorPil(size={"shortest_edge": 100, "longest_edge": 150})
    assert tuple(processor(random_image(50, 100))["pixel_values"].shape) == (1, 3, 96, 160)  # 75x150
    assert processor.processed_size(50, 100) == (96, 160)
    out = EovSegImageProcessor(do_resize=False)(random_image(50, 70))
    assert tuple(out["pixel_values"].shape) == (1, 3, 64, 96)
    assert EovSegImageProcessor(do_resize=False).processed_size(50, 70) == (64, 96)
    assert int(out["pixel_mask"].sum()) == 50 * 70


def test_normalization_values(processor):
    color = (10, 200, 255)
    image = np.empty((48, 64, 3), dtype=np.uint8)
    image[:] = color
    out = processor(image)["pixel_values"]
    for c in range(3):
        expected = (color[c] - MEAN[c]) / STD[c]
        assert out[0, c, 5, 7].item() == pytest.approx(expected, abs=1e-6)
        assert out[0, c, 639, 852].item() == pytest.approx(expected, abs=1e-6)
    assert out[0, 0, 5, 7].item() == pytest.approx(-1.946656, abs=1e-6)


def test_pixels_match_pil_bilinear_resize(processor):
    image = random_image(30, 40, seed=3)
    resized = np.asarray(PIL.Image.fromarray(image).resize((853, 640), PIL.Image.BILINEAR)).astype(np.float64)
    out = processor(image)["pixel_values"][0].numpy()
    for c in range(3):
        np.testing.assert_allclose(out[c, :640, :853], (resized[:, :, c] - MEAN[c]) / STD[c], atol=1e-5)


def test_rescale_option():
    image = random_image(32, 32, seed=1)
    out = EovSegImageProcessor(do_resize=False, do_rescale=True, image_mean=[0.5] * 3, image_std=[0.25] * 3)(image)
    expected = (image[5, 6, 1] / 255.0 - 0.5) / 0.25
    assert out["pixel_values"][0, 1, 5, 6].item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Input formats
# ---------------------------------------------------------------------------------------------


def test_input_formats_give_identical_pixels(processor):
    rgb = random_image(37, 53, seed=2)
    reference = processor(rgb)["pixel_values"]
    variants = {
        "pil": PIL.Image.fromarray(rgb),
        "np_chw": np.ascontiguousarray(rgb.transpose(2, 0, 1)),
        "torch_chw": torch.from_numpy(rgb.transpose(2, 0, 1).copy()),
        "torch_hwc": torch.from_numpy(rgb.copy()),
        "float_01": rgb.astype(np.float32) / 255.0,
        "float_0255": rgb.astype(np.float64),
        "torch_float_01": torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 255.0),
        "uint16": rgb.astype(np.uint16) * 257,
        "rgba": np.concatenate([rgb, np.full((37, 53, 1), 17, dtype=np.uint8)], axis=2),
        "pil_rgba": PIL.Image.fromarray(np.concatenate([rgb, np.zeros((37, 53, 1), np.uint8)], axis=2)),
        "list": [rgb],
        "batch_4d": rgb[None],
    }
    for name, image in variants.items():
        assert torch.equal(processor(image)["pixel_values"], reference), name


def test_grayscale_formats(processor):
    gray = random_image(33, 45, seed=4)[:, :, 0]
    reference = processor(np.repeat(gray[:, :, None], 3, axis=2))["pixel_values"]
    for name, image in {
        "2d": gray,
        "hw1": gray[:, :, None],
        "1hw": gray[None],
        "pil_L": PIL.Image.fromarray(gray),
        "torch_2d": torch.from_numpy(gray.copy()),
        "pil_I16": PIL.Image.fromarray(gray.astype(np.uint16) * 257),
    }.items():
        assert torch.equal(processor(image)["pixel_values"], reference), name


def test_channel_layout_inference():
    p = EovSegImageProcessor(do_resize=False, do_normalize=False, size_divisibility=0)
    # only one axis can hold channels / both can but only one is 3 / still ambiguous: arrays HWC, tensors CHW
    assert tuple(p(np.zeros((4, 6, 3), np.uint8))["pixel_values"].shape) == (1, 3, 4, 6)
    assert tuple(p(np.zeros((3, 7, 6), np.uint8))["pixel_values"].shape) == (1, 3, 7, 6)
    assert tuple(p(np.zeros((4, 5, 1), np.uint8))["pixel_values"].shape) == (1, 3, 4, 5)
    assert tuple(p(np.zeros((3, 5, 3), np.uint8))["pixel_values"].shape) == (1, 3, 3, 5)
    assert tuple(p(torch.zeros((3, 5, 3), dtype=torch.uint8))["pixel_values"].shape) == (1, 3, 5, 3)
    chw = p(np.zeros((3, 5, 3), np.uint8), input_data_format="channels_first")["pixel_values"]
    assert tuple(chw.shape) == (1, 3, 5, 3)


def test_value_rules(processor):
    p = EovSegImageProcessor(do_resize=False, do_normalize=False)
    # uint16: round(v / 257); float in [0, 1]: times 255, rounded; bool: 0 / 255
    image16 = np.full((4, 4), 1000, dtype=np.uint16)  # 1000 / 257 = 3.89 -> 4
    assert p(image16)["pixel_values"][0, 0, 0, 0].item() == 4.0
    halves = np.full((4, 4, 3), 0.5, dtype=np.float32)  # 127.5 -> 128 (round half to even)
    assert p(halves)["pixel_values"][0, 0, 0, 0].item() == 128.0
    wide = np.full((4, 4, 3), 2.4, dtype=np.float32)  # > 1: taken as 0-255
    assert p(wide)["pixel_values"][0, 0, 0, 0].item() == 2.0
    assert p(np.ones((4, 4), dtype=bool))["pixel_values"][0, 2, 1, 1].item() == 255.0
    assert p(np.full((4, 4), 200, dtype=np.int32))["pixel_values"][0, 1, 0, 0].item() == 200.0


def test_mixed_size_batch_matches_single_images(processor):
    images = [random_image(40, 60, seed=5), random_image(70, 30, seed=6), random_image(64, 64, seed=7)]
    batch = processor(images)
    assert tuple(batch["pixel_values"].shape) == (3, 3, 1504, 960)  # 640x960, 1493x640, 640x640 padded
    for i, image in enumerate(images):
        alone = processor(image)
        h, w = int(alone["pixel_mask"][0].sum(0).max()), int(alone["pixel_mask"][0].sum(1).max())
        assert torch.equal(batch["pixel_values"][i, :, :h, :w], alone["pixel_values"][0, :, :h, :w])
        assert batch["pixel_values"][i, :, h:, :].abs().sum() == 0
        assert batch["pixel_values"][i, :, :, w:].abs().sum() == 0
        assert int(batch["pixel_mask"][i].sum()) == h * w


def test_return_numpy(processor):
    out = processor(random_image(20, 20), return_tensors="np")
    assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].shape == (1, 3, 640, 640)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images,match",
    [
        (np.zeros((1, 10, 3), np.uint8), r"images\[0\] is 1x10 pixels"),
        (np.zeros((10, 0), np.uint8), r"images\[0\] is 10x0 pixels"),
        (PIL.Image.new("RGB", (1, 5)), r"images\[0\] is 5x1 pixels"),
        (np.zeros((8, 8, 5), np.uint8), "neither its first nor its last axis"),
        (np.zeros((6, 8, 8), np.uint8), "neither its first nor its last axis"),
        (np.zeros((10,), np.uint8), "has 1 dimensions"),
        (np.zeros((1, 1, 8, 8, 3), np.uint8), "has 5 dimensions"),
        ([np.zeros((8, 8, 3), np.uint8), "cat.png"], r"images\[1\] is a str"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.uint8)], r"images\[1\] has 4 dimensions"),
        ([], "empty list"),
        (np.full((8, 8), 300, np.int32), "values in \\[300, 300\\]"),
        (np.full((8, 8), -0.5, np.float32), "floating-point image with values"),
    ],
)
def test_input_errors(processor, images, match):
    with pytest.raises(ValueError, match=match):
        processor(images)


def make_outputs(class_probs, mask_logits, image_sizes=None):
    """A stand-in for the model output: log class probabilities (void last), low-resolution mask logits."""
    class_probs = torch.tensor(class_probs, dtype=torch.float32)
    mask_logits = torch.as_tensor(mask_logits, dtype=torch.float32)
    if image_sizes is None:
        image_sizes = [[mask_logits.shape[-2] * 4, mask_logits.shape[-1] * 4]] * mask_logits.shape[0]
    return SimpleNamespace(
        class_queries_logits=torch.log(class_probs),
        masks_queries_logits=mask_logits,
        image_sizes=torch.tensor(image_sizes, dtype=torch.int64),
    )


def test_target_sizes_length_mismatch(processor):
    outputs = make_outputs([[[0.5, 0.5]]], torch.zeros(1, 1, 8, 8))
    for method in (
        processor.post_process_panoptic_segmentation,
        processor.post_process_semantic_segmentation,
        processor.post_process_instance_segmentation,
    ):
        with pytest.raises(ValueError, match="target_sizes` has 2 entries but the batch has 1"):
            method(outputs, target_sizes=[(10, 10), (20, 20)])


# ---------------------------------------------------------------------------------------------
# Training targets
# ---------------------------------------------------------------------------------------------


def panoptic_png():
    """A 4x6 COCO-panoptic annotation: ids 1 (R=1), 256 (G=1, crowd), 65538 (B=1, R=2) and 9 (not listed)."""
    ids = np.array(
        [
            [1, 1, 1, 256, 256, 9],
            [1, 1, 1, 256, 256, 9],
            [65538, 65538, 1, 1, 9, 9],
            [65538, 65538, 65538, 1, 1, 1],
        ]
    )
    rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)
    info = [
        {"id": 1, "category_id": 5, "iscrowd": 0},
        {"id": 256, "category_id": 7, "iscrowd": 1},
        {"id": 65538, "category_id": 3},
    ]
    return ids, rgb, info


def test_panoptic_targets_without_resize():
    ids, rgb, info = panoptic_png()
    processor = EovSegImageProcessor(do_resize=False)
    out = processor(random_image(4, 6), segmentation_maps=PIL.Image.fromarray(rgb), segments_info=info)
    masks, labels = out["mask_labels"][0], out["class_labels"][0]
    assert labels.tolist() == [5, 3]  # crowd segment 256 is not a target
    assert labels.dtype == torch.int64
    assert tuple(masks.shape) == (2, 32, 32) and masks.dtype == torch.float32
    assert torch.equal(masks[0, :4, :6], torch.from_numpy((ids == 1).astype(np.float32)))
    assert torch.equal(masks[1, :4, :6], torch.from_numpy((ids == 65538).astype(np.float32)))
    assert masks[:, 4:, :].sum() == 0 and masks[:, :, 6:].sum() == 0
    # pixels of the crowd segment and of the unlisted id 9 belong to no target
    covered = masks.sum(0)[:4, :6]
    assert torch.equal(covered == 0, torch.from_numpy((ids == 256) | (ids == 9)))
    assert int(masks.sum()) == 11 + 5


def test_panoptic_targets_resized_nearest(processor):
    ids, rgb, info = panoptic_png()
    # 32x48 annotation (each cell 8x8) -> 640x960: an exact factor of 20, so nearest gives 160x160 blocks
    big_rgb = np.kron(rgb, np.ones((8, 8, 1), dtype=np.uint8))
    out = processor(random_image(32, 48), segmentation_maps=big_rgb, segments_info=[info])
    masks = out["mask_labels"][0]
    assert tuple(masks.shape) == (2, 640, 960)
    expected = np.kron((ids == 1).astype(np.float32), np.ones((160, 160), dtype=np.float32))
    assert torch.equal(masks[0], torch.from_numpy(expected))
    # the decoded id map also works
    out2 = processor(random_image(32, 48), segmentation_maps=np.kron(ids, np.ones((8, 8), int)), segments_info=[info])
    assert torch.equal(out2["mask_labels"][0], masks)


def test_semantic_targets():
    label_map = np.array([[0, 0, 3, 3], [255, 255, 3, 3], [7, 0, 0, 255]], dtype=np.uint8)
    out = EovSegImageProcessor(do_resize=False)(random_image(3, 4), segmentation_maps=label_map)
    assert out["class_labels"][0].tolist() == [0, 3, 7]
    masks = out["mask_labels"][0]
    assert tuple(masks.shape) == (3, 32, 32)
    for k, c in enumerate([0, 3, 7]):
        assert torch.equal(masks[k, :3, :4], torch.from_numpy((label_map == c).astype(np.float32)))
    assert masks.sum() == 9  # all but the three 255 pixels


def test_target_errors(processor):
    ids, rgb, info = panoptic_png()
    images = [random_image(4, 6), random_image(4, 6)]
    with pytest.raises(ValueError, match=r"segmentation_maps\[1\] is 4x5 but images\[1\] is 4x6"):
        processor(images, segmentation_maps=[rgb, rgb[:, :5]], segments_info=[info, info])
    missing = info + [{"id": 42, "category_id": 1}]
    with pytest.raises(ValueError, match=r"segments_info\[1\]\[3\] has id 42, which does not occur .*image 1"):
        processor(images, segmentation_maps=[rgb, rgb], segments_info=[info, missing])
    with pytest.raises(ValueError, match="Got 1 `segments_info` entries for 2 images"):
        processor(images, segmentation_maps=[rgb, rgb], segments_info=[info])


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------


def stripes(columns_positive, low_h=8, low_w=8, value=20.0):
    """Low-resolution logits +value on the given low-resolution columns, -value elsewhere. After 4x bilinear
    upsampling the sign changes exactly at 4 * (column boundary)."""
    logits = torch.full((low_h, low_w), -value)
    logits[:, list(columns_positive)] = value
    return logits


def test_panoptic_stuff_split_in_two_queries_is_merged(processor):
    # classes 0, 1: things; 2, 3: stuff; void last
    probs = [
        [0.05, 0.05, 0.80, 0.05, 0.05],  # query 0: stuff class 2, left half
        [0.05, 0.05, 0.80, 0.05, 0.05],  # query 1: stuff class 2, right half
        [0.90, 0.02, 0.02, 0.02, 0.04],  # query 2: thing class 0, the top 4 rows
    ]
    block = torch.full((8, 8), -20.0)
    block[:1, :] = 20.0
    masks = torch.stack([stripes(range(0, 4)), stripes(range(4, 8)), block])[None]
    result = processor.post_process_panoptic_segmentation(make_outputs([probs], masks), label_ids_to_fuse={2, 3})[0]
    seg = result["segmentation"]
    assert seg.dtype == torch.int32 and tuple(seg.shape) == (32, 32)
    # each stuff query wins 28 of its 32 rows (0.875 >= 0.8)
    expected = torch.ones(32, 32, dtype=torch.int32)
    expected[:4, :] = 2
    assert torch.equal(seg, expected)
    info = result["segments_info"]
    assert [(s["id"], s["label_id"], s["was_fused"]) for s in info] == [(1, 2, True), (2, 0, False)]
    assert info[0]["score"] == pytest.approx(0.80, abs=1e-6)
    assert info[1]["score"] == pytest.approx(0.90, abs=1e-6)

    # without fusing, the two stuff queries stay apart (ids in query order)
    unfused = processor.post_process_panoptic_segmentation(make_outputs([probs], masks), label_ids_to_fuse=[])[0]
    expected = torch.full((32, 32), 2, dtype=torch.int32)
    expected[:, :16] = 1
    expected[:4, :] = 3
    assert torch.equal(unfused["segmentation"], expected)
    assert [s["label_id"] for s in unfused["segments_info"]] == [2, 2, 0]

    # outputs of the default vocabulary carry its stuff ids: used when the caller passes none (pipeline case)
    outputs = make_outputs([probs], masks)
    outputs.stuff_class_ids = torch.tensor([[2, 3]])  # batch-first, as the model gives them
    from_outputs = processor.post_process_panoptic_segmentation(outputs)[0]
    assert torch.equal(from_outputs["segmentation"], result["segmentation"])
    assert from_outputs["segments_info"] == result["segments_info"]

    # an output size: 32x32 -> 16x16 halves every boundary
    small = processor.post_process_panoptic_segmentation(
        make_outputs([probs], masks), label_ids_to_fuse={2, 3}, target_sizes=[(16, 16)]
    )[0]["segmentation"]
    expected = torch.ones(16, 16, dtype=torch.int32)
    expected[:2, :] = 2
    assert torch.equal(small, expected)


def test_panoptic_thing_mostly_covered_by_another_query_is_dropped(processor):
    # 8x24 low-res masks (32x96 input). Query B (thing 1, score 0.6) owns low-res columns 0-19 (80 px wide);
    # query A (thing 0, score 0.9) owns columns 0-16 and so wins 17/20 = 85% of B's mask: B keeps 15%.
    probs = [[0.90, 0.05, 0.05], [0.30, 0.60, 0.10]]
    masks = torch.stack([stripes(range(0, 17), 8, 24), stripes(range(0, 20), 8, 24)])[None]
    outputs = make_outputs([probs], masks)
    result = processor.post_process_panoptic_segmentation(
        outputs, overlap_mask_area_threshold=0.8, label_ids_to_fuse=[]
    )
    seg = result[0]["segmentation"]
    expected = torch.zeros(32, 96, dtype=torch.int32)
    expected[:, :68] = 1  # A's own mask; A also wins columns 80-95 but its own mask does not cover them
    assert torch.equal(seg, expected)
    assert [(s["id"], s["label_id"]) for s in result[0]["segments_info"]] == [(1, 0)]

    # B wins 3 * 4 * 32 = 384 of its 20 * 4 * 32 = 2560 pixels: ratio 0.15, kept at a 0.1 threshold
    kept = processor.post_process_panoptic_segmentation(outputs, overlap_mask_area_threshold=0.1, label_ids_to_fuse=[])
    expected[:, 68:80] = 2
    assert torch.equal(kept[0]["segmentation"], expected)
    assert [(s["id"], s["label_id"]) for s in kept[0]["segments_info"]] == [(1, 0), (2, 1)]


def test_panoptic_all_void_gives_empty_segmentation(processor):
    probs = [[[0.01, 0.01, 0.98]] * 4, [[0.2, 0.1, 0.7]] * 4]
    masks = torch.randn(2, 4, 8, 8) * 5
    results = processor.post_process_panoptic_segmentation(
        make_outputs(probs, masks, [[32, 32], [20, 28]]), label_ids_to_fuse=[1], target_sizes=[(10, 12), (20, 28)]
    )
    for result, size in zip(results, [(10, 12), (20, 28)]):
        assert result["segments_info"] == []
        assert tuple(result["segmentation"].shape) == size
        assert result["segmentation"].dtype == torch.int32 and not result["segmentation"].any()


def test_panoptic_threshold_and_padding(processor):
    # one image 16x20 inside a 32x32 padded input: output defaults to the valid size
    probs = [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]
    masks = torch.stack([stripes(range(0, 2)), stripes(range(2, 8))])[None]
    outputs = make_outputs([probs], masks, [[16, 20]])
    result = processor.post_process_panoptic_segmentation(outputs, label_ids_to_fuse=[])[0]
    expected = torch.full((16, 20), 2, dtype=torch.int32)
    expected[:, :8] = 1
    assert torch.equal(result["segmentation"], expected)
    # query 0 (score 0.6) below the threshold: query 1 wins its pixels but its own mask does not cover them
    result = processor.post_process_panoptic_segmentation(outputs, threshold=0.65, label_ids_to_fuse=[])[0]
    expected = torch.full((16, 20), 1, dtype=torch.int32)
    expected[:, :8] = 0
    assert torch.equal(result["segmentation"], expected)
    assert [(s["id"], s["label_id"]) for s in result["segments_info"]] == [(1, 1)]


def test_batch_post_processing_equals_single_images(processor):
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 10, 6, generator=gen) * 3, -1)
    masks = torch.randn(2, 10, 16, 24, generator=gen) * 6
    sizes = [[64, 96], [50, 70]]
    batch = make_outputs(probs.tolist(), masks, sizes)
    targets = [(40, 60), (100, 140)]
    pan = processor.post_process_panoptic_segmentation(batch, label_ids_to_fuse=[3, 4], target_sizes=targets)
    sem = processor.post_process_semantic_segmentation(batch, target_sizes=targets)
    for i in range(2):
        single = make_outputs(probs[i : i + 1].tolist(), masks[i : i + 1], sizes[i : i + 1])
        alone = processor.post_process_panoptic_segmentation(
            single, label_ids_to_fuse=[3, 4], target_sizes=targets[i : i + 1]
        )
        assert torch.equal(pan[i]["segmentation"], alone[0]["segmentation"])
        assert pan[i]["segments_info"] == alone[0]["segments_info"]
        sem_alone = processor.post_process_semantic_segmentation(single, target_sizes=targets[i : i + 1])
        assert torch.equal(sem[i], sem_alone[0])
    assert tuple(sem[1].shape) == (100, 140) and sem[1].dtype == torch.int64


def two_query_outputs():
    # query 0: class 0 (0.7), left half; query 1: class 1 (0.6), right half; void last
    probs = [[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]]
    masks = torch.stack([stripes(range(0, 4)), stripes(range(4, 8))])[None]
    return make_outputs(probs, masks)


def test_semantic_segmentation_by_hand(processor):
    # left: class 0 = 0.7 * 1 + 0.1 * 0, class 1 = 0.2 * 1 + 0.6 * 0 -> 0; right: 0.1 vs 0.6 -> 1
    result = processor.post_process_semantic_segmentation(two_query_outputs())
    expected = torch.zeros(32, 32, dtype=torch.int64)
    expected[:, 16:] = 1
    assert torch.equal(result[0], expected)
    small = processor.post_process_semantic_segmentation(two_query_outputs(), target_sizes=torch.tensor([[16, 8]]))
    expected = torch.zeros(16, 8, dtype=torch.int64)
    expected[:, 4:] = 1
    assert torch.equal(small[0], expected)


def test_semantic_segmentation_scores(processor):
    """return_segmentation_scores gives, as Mask2Former's method, the per-class scores the map is the argmax of:
    sum over queries of class probability (void excluded) x mask probability, at the output size."""
    from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput

    outputs = two_query_outputs()
    for target_sizes, size in ((None, (32, 32)), ([(16, 8)], (16, 8))):
        maps = processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)
        scored = processor.post_process_semantic_segmentation(
            outputs, target_sizes=target_sizes, return_segmentation_scores=True
        )
        assert len(scored) == 1 and isinstance(scored[0], SemanticSegmentationPostProcessorOutput)
        assert torch.equal(scored[0].segmentation, maps[0])
        masks = resize_all_queries(outputs.masks_queries_logits[0], (32, 32), size).sigmoid()
        probs = torch.tensor([[0.7, 0.2], [0.1, 0.6]])  # the class probabilities, void dropped
        expected = (probs[:, :, None, None] * masks[:, None]).sum(0)
        assert scored[0].segmentation_scores.shape == (2, *size)
        torch.testing.assert_close(scored[0].segmentation_scores, expected, rtol=1e-5, atol=1e-6)
        # left half: class 0 scores 0.7 * sigmoid(20); right half: class 1 scores 0.6 * sigmoid(20)
        assert scored[0].segmentation_scores[0, 0, 0].item() == pytest.approx(0.7 * sig(20) + 0.1 * sig(-20), rel=1e-5)


def _post_processing_methods(processor):
    return (
        processor.post_process_panoptic_segmentation,
        processor.post_process_semantic_segmentation,
        processor.post_process_instance_segmentation,
    )


@pytest.mark.parametrize("field", ["class_queries_logits", "masks_queries_logits"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_post_processing_refuses_non_finite_outputs(processor, field, value):
    """NaN class logits gave one class everywhere without a word: non-finite outputs are refused, naming them."""
    from eovseg.configuration_eovseg import EovSegInputError

    outputs = two_query_outputs()
    getattr(outputs, field)[0, 0, 0, ...] = value
    for method in _post_processing_methods(processor):
        with pytest.raises(EovSegInputError, match=f"outputs.{field} holds NaN or infinite values"):
            method(outputs, label_ids_to_fuse=[]) if method.__name__.endswith("panoptic_segmentation") else method(outputs)


@pytest.mark.parametrize("outputs,name", [
    ({"class_queries_logits": torch.zeros(1, 1, 2), "masks_queries_logits": torch.zeros(1, 1, 4, 4)}, "a dict"),
    ((torch.zeros(1, 1, 2), torch.zeros(1, 1, 4, 4)), "a tuple .*return_dict=True"),
    (None, "None"),
    ("outputs", "a str"),
])
def test_post_processing_refuses_what_is_not_a_model_output(processor, outputs, name):
    for method in _post_processing_methods(processor):
        with pytest.raises(ValueError, match=f"`outputs` must be the model's output .*got {name}"):
            method(outputs)


def test_post_processing_refuses_inconsistent_logits(processor):
    outputs = two_query_outputs()
    outputs.masks_queries_logits = outputs.masks_queries_logits[:, :1]
    for method in _post_processing_methods(processor):
        with pytest.raises(ValueError, match="masks_queries_logits must be .* got shape"):
            method(outputs)


@pytest.mark.parametrize("target_sizes,shown", [
    ("640x480", "'640x480'"),
    (["640x480"], "'640x480'"),
    ([("640", "480")], r"\('640', '480'\)"),
    ([(640, 480, 3)], r"\(640, 480, 3\)"),
    ([(0, 480)], r"\(0, 480\)"),
    ([(10.5, 20)], r"\(10.5, 20\)"),
    (torch.tensor([[640, 480, 1]]), "Tensor of shape"),
    (640, "640"),
])
def test_post_processing_names_bad_target_sizes(processor, target_sizes, shown):
    outputs = two_query_outputs()
    for method in _post_processing_methods(processor):
        with pytest.raises(ValueError, match=f"target_sizes.* must be .*got {shown}"):
            method(outputs, target_sizes=target_sizes)


def test_target_sizes_as_float_tensor_or_numpy(processor):
    outputs = two_query_outputs()
    expected = processor.post_process_semantic_segmentation(outputs, target_sizes=[(16, 8)])[0]
    for target_sizes in (torch.tensor([[16.0, 8.0]]), np.array([[16, 8]]), [torch.tensor([16, 8])]):
        assert torch.equal(processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)[0], expected)


@pytest.mark.parametrize("size", ["640", ["640"], {"shortest_edge": "640"}, {"shortest_edge": 64.5}, 0, True])
def test_size_named_when_wrong(processor, size):
    with pytest.raises(ValueError, match=r"`size(\['shortest_edge'\])?` must be"):
        EovSegImageProcessorPil(size=size)
    with pytest.raises(ValueError, match=r"`size(\['shortest_edge'\])?` must be"):
        processor(random_image(8, 8), size=size)


@pytest.mark.parametrize("ids", [[2], [-1], [0, 7]])
def test_label_ids_outside_the_vocabulary_are_refused(processor, ids):
    """Two classes (ids 0 and 1, void is 2): an id outside can match no segment; it was silently ignored."""
    outputs = two_query_outputs()
    with pytest.raises(ValueError, match=r"label_ids_to_fuse holds \[.*\], outside the vocabulary .*2 classes"):
        processor.post_process_panoptic_segmentation(outputs, label_ids_to_fuse=ids)
    with pytest.raises(ValueError, match=r"thing_ids holds \[.*\], outside the vocabulary .*2 classes"):
        processor.post_process_instance_segmentation(outputs, thing_ids=ids)
    processor.post_process_panoptic_segmentation(outputs, label_ids_to_fuse=[0, 1])  # inside: accepted
    processor.post_process_instance_segmentation(outputs, thing_ids=[1])


def test_instance_segmentation_by_hand(processor):
    # Upsampled left-half logits, per row: 14 columns at 20, then 15 and 5 next to the boundary.
    mean_sigmoid = (14 * sig(20) + sig(15) + sig(5)) / (16 + 1e-6)
    results = processor.post_process_instance_segmentation(two_query_outputs(), top_k=3, return_binary_maps=True)
    info = results[0]["segments_info"]
    # candidates by class probability: (q0, c0) 0.7, (q1, c1) 0.6, (q0, c1) 0.2; scores times mean sigmoid
    assert [s["label_id"] for s in info] == [0, 1, 1]
    assert [s["id"] for s in info] == [0, 1, 2]
    for s, p in zip(info, [0.7, 0.6, 0.2]):
        assert s["score"] == pytest.approx(p * mean_sigmoid, abs=1e-6)
        assert s["was_fused"] is False
    left = torch.zeros(32, 32, dtype=torch.bool)
    left[:, :16] = True
    binary = results[0]["segmentation"]
    assert binary.dtype == torch.bool and tuple(binary.shape) == (3, 32, 32)
    assert torch.equal(binary[0], left) and torch.equal(binary[1], ~left) and torch.equal(binary[2], left)

    # id map: where instances overlap (left half: instances 0 and 2) the higher score shows; the hidden one is
    # not listed
    id_result = processor.post_process_instance_segmentation(two_query_outputs(), top_k=3)[0]
    id_map = id_result["segmentation"]
    assert id_map.dtype == torch.int32
    assert (id_map[:, :16] == 0).all() and (id_map[:, 16:] == 1).all()
    assert [(s["id"], s["label_id"]) for s in id_result["segments_info"]] == [(0, 0), (1, 1)]
    # an instance partly covered keeps its visible pixels; a lower-score one on a free area gets the next id
    probs = [[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.05, 0.05, 0.9]]]
    masks = torch.stack([stripes(range(0, 4)), stripes(range(2, 8)), stripes(range(0, 8))])[None]
    partial = processor.post_process_instance_segmentation(make_outputs(probs, masks), top_k=2)[0]
    assert (partial["segmentation"][:, :16] == 0).all() and (partial["segmentation"][:, 16:] == 1).all()
    assert [s["label_id"] for s in partial["segments_info"]] == [0, 1]

    # thing_ids keeps only those classes (after the top-k); threshold drops low scores
    things = processor.post_process_instance_segmentation(two_query_outputs(), top_k=3, thing_ids=[1])[0]
    assert [s["label_id"] for s in things["segments_info"]] == [1, 1]
    high = processor.post_process_instance_segmentation(two_query_outputs(), top_k=3, threshold=0.5)[0]
    assert [s["label_id"] for s in high["segments_info"]] == [0, 1]
    # mask_threshold 0.995 drops the boundary column at logit 5 (sigmoid 0.9933) from each half
    narrow = processor.post_process_instance_segmentation(
        two_query_outputs(), mask_threshold=0.995, top_k=1, return_binary_maps=True
    )[0]["segmentation"]
    assert narrow[0, :, :15].all() and not narrow[0, :, 15:].any()

    rle = processor.post_process_instance_segmentation(two_query_outputs(), top_k=1, return_coco_annotation=True)
    assert rle[0]["segmentation"][0]["size"] == [32, 32]
    from pycocotools import mask as mask_utils

    decoded = mask_utils.decode({"size": [32, 32], "counts": rle[0]["segmentation"][0]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), left.numpy())


# ---------------------------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_class", [EovSegImageProcessorPil, EovSegImageProcessor])
def test_save_and_load_round_trip(tmp_path, backend_class):
    processor = backend_class(size={"shortest_edge": 512, "longest_edge": 1024}, size_divisibility=64)
    processor.save_pretrained(tmp_path)
    loaded = backend_class.from_pretrained(tmp_path)
    assert type(loaded) is backend_class
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.size == {"shortest_edge": 512, "longest_edge": 1024}
    assert loaded.size_divisibility == 64 and loaded.image_mean == list(MEAN) and loaded.image_std == list(STD)
    assert loaded.do_rescale is False and loaded.ignore_index == 255
    image = random_image(30, 50, seed=9)
    assert torch.equal(loaded(image)["pixel_values"], processor(image)["pixel_values"])
    assert tuple(loaded(image)["pixel_values"].shape) == (1, 3, 512, 896)  # 512x853 padded to 64
    default = backend_class()
    default.save_pretrained(tmp_path / "default")
    assert backend_class.from_pretrained(tmp_path / "default").to_dict() == default.to_dict()


# ---------------------------------------------------------------------------------------------
# The two backends
# ---------------------------------------------------------------------------------------------


def test_both_backends_save_the_same_settings():
    """A folder does not depend on the backend that saved it (transformers strips "Pil" from the saved type)."""
    torchvision_dict = EovSegImageProcessor(size=320, size_divisibility=16).to_dict()
    assert torchvision_dict == EovSegImageProcessorPil(size=320, size_divisibility=16).to_dict()
    assert torchvision_dict["image_processor_type"] == "EovSegImageProcessor"


@pytest.mark.parametrize("saved_with", [EovSegImageProcessor, EovSegImageProcessorPil])
def test_auto_image_processor_selects_the_backend(tmp_path, saved_with, caplog):
    from transformers import AutoImageProcessor

    import eovseg  # noqa: F401  (registers the classes)

    saved_with(size_divisibility=16).save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        default = AutoImageProcessor.from_pretrained(tmp_path)
        pil = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
        torchvision = AutoImageProcessor.from_pretrained(tmp_path, backend="torchvision")
    assert "backend" not in caplog.text  # no "Requested torchvision backend is not available" fallback
    assert type(default) is EovSegImageProcessorPil and type(pil) is EovSegImageProcessorPil
    assert type(torchvision) is EovSegImageProcessor
    assert default.size_divisibility == torchvision.size_divisibility == 16


def grey_levels(pixel_values: torch.Tensor) -> torch.Tensor:
    """Normalized pixel values back in 0-255 units."""
    return pixel_values * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


# Upscaled by the same exact factor on both axes (x1.6: the fixture photo's 400x600 -> 640x960; x4; x2).
EXACT_UPSCALES = [(400, 600), (160, 240), (320, 480)]


@pytest.mark.parametrize("size", EXACT_UPSCALES)
def test_backends_are_equal_when_upscaling(size):
    image = random_image(*size, seed=11)
    pil = EovSegImageProcessorPil()(image)
    torchvision = EovSegImageProcessor()(image)
    assert pil.keys() == torchvision.keys()
    for key in pil:
        assert torch.equal(pil[key], torchvision[key]), key


@pytest.mark.parametrize("size", [(300, 400), (480, 640), (900, 1200), (1200, 1800), (700, 2100)])
def test_backends_differ_by_at_most_two_grey_levels(size):
    """Downscaling (and upscaling where the two axes' factors round differently, 480x640 -> 640x853) differs by a
    few grey levels at most, identically normalized; masks and shapes are equal."""
    image = random_image(*size, seed=12)
    pil = EovSegImageProcessorPil()(image)
    torchvision = EovSegImageProcessor()(image)
    assert torch.equal(pil["pixel_mask"], torchvision["pixel_mask"])
    difference = (grey_levels(pil["pixel_values"]) - grey_levels(torchvision["pixel_values"])).abs()
    assert difference.max() <= 2 + 1e-3
    assert (difference > 0.5).float().mean() < 0.1


def test_backends_share_post_processing():
    """Post-processing is written once (EovSegImageProcessingMixin) and gives the same results on both backends."""
    for name in ("post_process_semantic_segmentation", "post_process_instance_segmentation",
                 "post_process_panoptic_segmentation", "_encode_targets", "preprocess"):
        assert getattr(EovSegImageProcessor, name) is getattr(EovSegImageProcessorPil, name)
    class_probs = [[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]]
    outputs = make_outputs(class_probs, torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0)) * 4)
    for a, b in zip(EovSegImageProcessor().post_process_panoptic_segmentation(outputs, label_ids_to_fuse=[1]),
                    EovSegImageProcessorPil().post_process_panoptic_segmentation(outputs, label_ids_to_fuse=[1])):
        assert a["segments_info"] == b["segments_info"] and torch.equal(a["segmentation"], b["segmentation"])


# --- exactness of the shortcuts against the plain algorithm ---------------------------------------------------


def resize_all_queries(mask_logits, image_size, target_size):
    """What the original does: every query upsampled 4x to the padded size, cropped, resized to the target."""
    padded = (mask_logits.shape[-2] * 4, mask_logits.shape[-1] * 4)
    up = torch.nn.functional.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)
    up = up[:, :, : image_size[0], : image_size[1]]
    if tuple(target_size) != tuple(image_size):
        up = torch.nn.functional.interpolate(up, size=target_size, mode="bilinear", align_corners=False)
    return up[0]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "num_queries, low_hw, image_size, target_size",
    [
        (9, (160, 240), (640, 960), (400, 600)),  # the benchmark's geometry, sub-batches of 2 with a single last one
        (7, (40, 60), (150, 230), (150, 230)),  # padded crop, no second resize
        (3, (40, 60), (160, 240), (97, 131)),  # 3 queries: the one-thread channels-last kernel in the original call
        (5, (8, 12), (30, 45), (50, 60)),  # small outputs (height + width <= 128): channels-last kernel
        (6, (30, 20), (117, 80), (60, 40)),
    ],
)
def test_mask_resizer_is_bit_identical_to_resizing_all_queries(threads, num_queries, low_hw, image_size, target_size):
    from eovseg.processing.image_processing_eovseg import _MaskResizer

    gen = torch.Generator().manual_seed(num_queries)
    masks = torch.randn(num_queries, *low_hw, generator=gen) * 8
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        expected = resize_all_queries(masks, image_size, target_size)
        resizer = _MaskResizer(masks, image_size, target_size)
        assert torch.equal(resizer(), expected)
        for index in ([num_queries - 1], list(range(0, num_queries, 2)), [1, 2, 0]):
            assert torch.equal(resizer(torch.tensor(index)), expected[index])
    finally:
        torch.set_num_threads(previous)


def plain_panoptic(class_logits, mask_logits, image_size, target_size, stuff_ids, overlap=0.8):
    """The original's panoptic rules written out query by query on full-resolution maps."""
    masks = resize_all_queries(mask_logits, image_size, target_size).sigmoid()
    scores, labels = class_logits.softmax(-1).max(-1)
    keep = labels.ne(class_logits.shape[-1] - 1) & (scores > 0)
    masks, scores, labels = masks[keep], scores[keep], labels[keep]
    segmentation = torch.zeros(target_size, dtype=torch.int32)
    segments, stuff_segment = [], {}
    if len(masks) == 0:
        return segmentation, segments
    winner = (scores.view(-1, 1, 1) * masks).argmax(0)
    for k in range(len(masks)):
        label = int(labels[k])
        own = masks[k] >= 0.5
        won = winner == k
        segment = won & own
        if won.sum() == 0 or own.sum() == 0 or segment.sum() == 0 or won.sum() / own.sum() < overlap:
            continue
        if label in stuff_ids and label in stuff_segment:
            segmentation[segment] = stuff_segment[label]
            continue
        segments.append((len(segments) + 1, label, label in stuff_ids))
        if label in stuff_ids:
            stuff_segment[label] = len(segments)
        segmentation[segment] = len(segments)
    return segmentation, segments


@pytest.mark.parametrize("seed", range(4))
def test_panoptic_equals_plain_rules_on_random_overlapping_masks(processor, seed):
    gen = torch.Generator().manual_seed(seed)
    num_queries, num_classes, low_hw = 40, 12, (60, 80)
    image_size, target_size = (230, 310), (150, 200)
    # a partition of the image into 12 regions, each claimed by several queries with different edges and
    # strengths, and every third query a round blob on top, plus noise: queries compete for pixels
    yy, xx = torch.meshgrid(torch.arange(low_hw[0]) / low_hw[0], torch.arange(low_hw[1]) / low_hw[1], indexing="ij")
    centres = torch.rand(12, 2, generator=gen)
    dist = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2).sqrt()
    region = dist.argmin(0)
    masks = torch.empty(num_queries, *low_hw)
    for q in range(num_queries):
        if q % 3 == 2:
            cy, cx, r = torch.rand(3, generator=gen).tolist()
            inside = r * 0.3 + 0.05 - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        else:
            inside = (region == q % 12).float() - 0.5 + 0.2 * torch.rand(1, generator=gen)
        masks[q] = 30 * inside + torch.randn(*low_hw, generator=gen)
    logits = torch.randn(num_queries, num_classes + 1, generator=gen) * 3
    logits[:, :4] += 2  # classes 0-3 frequent, so that stuff classes appear in several queries
    outputs = make_outputs(logits.softmax(-1)[None].tolist(), masks[None], [image_size])
    stuff_ids = {0, 1, 5, 7}
    expected, expected_segments = plain_panoptic(
        outputs.class_queries_logits[0], masks, image_size, target_size, stuff_ids
    )
    result = processor.post_process_panoptic_segmentation(
        outputs, label_ids_to_fuse=sorted(stuff_ids), target_sizes=[target_size]
    )[0]
    assert len(expected_segments) >= 5
    assert torch.equal(result["segmentation"], expected)
    assert [(s["id"], s["label_id"], s["was_fused"]) for s in result["segments_info"]] == expected_segments


def test_max_with_first_index_equals_max_with_ties_and_nan():
    from eovseg.processing.image_processing_eovseg import _max_with_first_index

    gen = torch.Generator().manual_seed(0)
    values = torch.rand(7, 30, 40, generator=gen).mul(4).round()  # few distinct values: many ties
    for maps in (values, values[:1], torch.rand(300, 3, 4, generator=gen)):
        best, index = _max_with_first_index(maps)
        expected_best, expected_index = maps.max(0)
        assert torch.equal(best, expected_best) and torch.equal(index, expected_index)
    values[3, 0, 0] = float("nan")
    best, index = _max_with_first_index(values)
    assert torch.isnan(best[0, 0]) and index[0, 0] == 3


@pytest.mark.parametrize("source, size", [((2, 7, 9), (28, 36)), ((3, 40, 30), (13, 17)), ((1, 16, 16), (16, 16))])
def test_private_bilinear_kernel_and_public_fallback_agree(source, size):
    from eovseg.processing.image_processing_eovseg import interpolate_bilinear_into

    values = torch.randn(1, *source, generator=torch.Generator().manual_seed(0)) * 5
    expected = F.interpolate(values, size=size, mode="bilinear", align_corners=False)
    results = []
    for private in (True, False):
        # write into a slice of a bigger tensor, as post-processing does
        target = torch.full((1, source[0] + 1, *size), float("nan"))
        interpolate_bilinear_into(values, size, target[:, 1:], private=private)
        assert torch.isnan(target[:, 0]).all()
        results.append(target[:, 1:])
    assert torch.equal(results[0], expected) and torch.equal(results[1], expected)

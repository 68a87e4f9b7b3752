"""One decoder for every input (eovseg/inputs.py): 16-bit images read from files are scaled, not saturated, by every
entry point (processor, pipeline, demo, predict), and the shared steps give what the processor always gave."""

import numpy as np
import PIL.Image
import pytest
import torch

from eovseg.inputs import decode_image, load_image, normalize, pad_batch, rgb_to_id, to_rgb_image


@pytest.fixture()
def sixteen_bit_png(tmp_path):
    values = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(values).save(path)
    with PIL.Image.open(path) as image:
        assert image.mode.startswith("I;16") or image.mode == "I"
    # round(v / 257): 0-65535 onto 0-255, computed here independently of the decoder
    expected = np.repeat(np.floor(values.astype(np.float64) / 257 + 0.5).astype(np.uint8)[:, :, None], 3, axis=2)
    return path, expected


def test_sixteen_bit_file_is_scaled_not_saturated(sixteen_bit_png):
    path, expected = sixteen_bit_png
    with PIL.Image.open(path) as image:
        saturated = np.asarray(image.convert("RGB"))  # what reading with convert("RGB") gives
        assert np.array_equal(decode_image(image), expected)
    assert (saturated == 255).mean() > 0.9
    assert np.array_equal(decode_image(str(path)), expected)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(PIL.Image.open(path)))
    assert np.array_equal(np.asarray(to_rgb_image(load_image(str(path)))), expected)


def test_pipeline_demo_and_predict_read_sixteen_bit_files_as_the_processor(sixteen_bit_png, monkeypatch):
    import eovseg.demo
    from eovseg import EovSegConfig, EovSegForPanopticSegmentation, EovSegProcessor
    from eovseg.pipeline_eovseg import OpenVocabularySegmentationPipeline
    from eovseg.predict import read_image

    path, expected = sixteen_bit_png
    config = EovSegConfig.from_variant("tiny")
    processor = EovSegProcessor.from_config(config)
    reference = processor(images=expected, return_tensors="pt")["pixel_values"]
    pipe = OpenVocabularySegmentationPipeline(
        model=EovSegForPanopticSegmentation(config).eval(), image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
    )
    inputs = pipe.preprocess(str(path), candidate_labels=["sky", "road"])["inputs"]
    assert torch.equal(inputs["pixel_values"], reference)
    assert np.array_equal(np.asarray(read_image(str(path))), expected)

    seen = []

    class Stop(Exception):
        pass

    def recording_processor(images, **kwargs):
        seen.append(np.asarray(images))
        raise Stop

    model = EovSegForPanopticSegmentation(config).eval()
    monkeypatch.setattr(eovseg.demo, "load_model", lambda *a, **k: (model, recording_processor))
    with pytest.raises(Stop):
        eovseg.demo.run(path, None, ["sky", "road"], None, path.parent / "out")
    assert np.array_equal(seen[0], expected)


def test_shared_steps_are_the_processors():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    wide = rgb.astype(np.int64)
    ids = wide[..., 0] + 256 * wide[..., 1] + 65536 * wide[..., 2]
    assert np.array_equal(rgb_to_id(rgb), ids) and rgb_to_id(rgb).dtype == np.int64
    assert np.array_equal(rgb_to_id(rgb.astype(np.uint16)), ids)  # no 16-bit overflow
    images = [torch.rand(3, 5, 7) * 255, torch.rand(3, 9, 4) * 255]
    normalized = [normalize(x, (1.0, 2.0, 3.0), (2.0, 4.0, 8.0)) for x in images]
    torch.testing.assert_close(normalized[0][2], (images[0][2] - 3.0) / 8.0, rtol=0, atol=0)
    pixel_values, pixel_mask = pad_batch(normalized, 32, valid_sizes=[(5, 7), (8, 4)])
    assert pixel_values.shape == (2, 3, 32, 32) and pixel_mask.dtype == torch.int64
    assert torch.equal(pixel_values[1, :, :9, :4], normalized[1]) and pixel_values[1, :, 9:].abs().sum() == 0
    assert int(pixel_mask[0].sum()) == 35 and int(pixel_mask[1].sum()) == 32


def _readers():
    """Every place that reads an annotation: the processor, training and evaluation (each through eovseg.inputs)."""
    from eovseg.evaluation.panoptic import decode_panoptic_ids as evaluation_ids
    from eovseg.evaluation.semantic import decode_label_map as evaluation_labels
    from eovseg.processing.image_processing_eovseg import decode_segmentation_map
    from eovseg.training.data import decode_label_map as training_labels
    from eovseg.training.data import decode_panoptic_ids as training_ids

    panoptic = [lambda x: decode_segmentation_map(x, "map", panoptic=True), lambda x: training_ids(x, "map"),
                lambda x: evaluation_ids(x, "map")]
    semantic = [lambda x: decode_segmentation_map(x, "map", panoptic=False), lambda x: training_labels(x, "map"),
                lambda x: evaluation_labels(x, "map")]
    return panoptic, semantic


def test_annotation_formats_decode_alike_everywhere(tmp_path):
    panoptic, semantic = _readers()
    ids = np.array([[0, 1000, 70000, 1000, 5], [5, 5, 16777215, 0, 0]], dtype=np.int64)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)  # COCO: id = R + 256 G + 256^2 B
    rgb_path = tmp_path / "pan.png"
    PIL.Image.fromarray(rgb).save(rgb_path)
    colours, index = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    palette = PIL.Image.fromarray(index.reshape(2, 5).astype(np.uint8), mode="P")  # the same colours, as a palette
    palette.putpalette(colours.flatten().tolist())
    rgba = PIL.Image.fromarray(np.concatenate([rgb, np.full((2, 5, 1), 255, np.uint8)], -1))
    for reader in panoptic:
        for value in (rgb, rgb_path, str(rgb_path), PIL.Image.open(rgb_path), palette, rgba, np.moveaxis(rgb, -1, 0),
                      torch.as_tensor(rgb), rgb.astype(np.int32), ids, ids.tolist(), ids.astype(np.float32)):
            assert np.array_equal(reader(value), ids), type(value)
        for bad, message in ((rgb.astype(np.int32) + 200, "0-255"), (ids + 0.5, "non-integer"), ({"a": 1}, "dict")):
            with pytest.raises(ValueError, match=message):
                reader(bad)
    labels = np.array([[0, 1, 2], [255, 2, 1]], dtype=np.uint8)
    voc = PIL.Image.fromarray(labels, mode="P")  # Pascal VOC stores labels as palette indices
    voc.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    voc_path = tmp_path / "voc.png"
    voc.save(voc_path)
    sixteen = PIL.Image.fromarray(labels.astype(np.uint16) * 257)
    for reader in semantic:
        for value in (labels, voc, voc_path, labels[:, :, None], labels.tolist(), torch.as_tensor(labels)):
            assert np.array_equal(reader(value), labels), type(value)
        assert np.array_equal(reader(sixteen), labels.astype(np.int64) * 257)  # 16-bit values kept, not scaled
        with pytest.raises(ValueError, match="3-channel map"):
            reader(rgb)

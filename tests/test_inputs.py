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
    monkeypatch.setattr(eovseg.demo, "load_model_and_processor", lambda *a, **k: (model, recording_processor))
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

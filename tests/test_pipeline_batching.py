"""`pipeline(images, batch_size=N)` gives what `batch_size=1` gives image by image, for transformers'
image-segmentation pipeline and eovseg's open-vocabulary one, every subtask, on images of different sizes.

transformers' pipeline batches by slicing every output field along its first dimension and concatenating the
images' `pixel_values`, so it batches images of one processed size (as for DETR); eovseg's pipeline groups a list by
processed size itself."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

import eovseg  # noqa: F401  (registers the Auto classes and pipelines)
from eovseg.demo import default_image_path, default_model_path
from eovseg.synthetic import toy_world_categories

TOY_STUFF = [c["name"] for c in toy_world_categories() if not c["isthing"]]

# The bundled demo model (shortest edge 128): sizes that all become 128 x 170..188, padded to 128 x 192
# (transformers' pipeline can batch these) ...
SAME_PADDED_SIZE = [(48, 64), (60, 80), (42, 60), (50, 72), (30, 44)]
# ... and sizes padded to 224 x 128, 256 x 128 and 128 x 128, which eovseg's pipeline batches apart
OTHER_PADDED_SIZES = [(64, 40), (50, 50), (70, 35), (44, 44)]
BATCH_SIZES = (1, 2, 3, 4, 8)


def _images(sizes):
    # the demo model's shapes scene (things, and stuff to merge) at 64 px, cropped and stretched to each size
    scene = Image.open(default_image_path()).convert("RGB").resize((64, 64), Image.BILINEAR)
    return [scene.crop((i % 3 * 4, i % 2 * 4, 64 - i % 4 * 3, 64)).resize((w, h), Image.BILINEAR)
            for i, (h, w) in enumerate(sizes)]


def _comparable(results):
    return [[(r["label"], r["score"], np.asarray(r["mask"])) for r in result] for result in results]


def _assert_same(batched, one_by_one, sizes):
    assert len(batched) == len(one_by_one) == len(sizes)
    for together, alone, (height, width) in zip(_comparable(batched), _comparable(one_by_one), sizes):
        assert [label for label, _, _ in together] == [label for label, _, _ in alone]
        for (_, score, mask), (_, score_alone, mask_alone) in zip(together, alone):
            assert mask.shape == (height, width) and np.array_equal(mask, mask_alone)
            # batched CPU kernels round differently (about 1e-6 on the logits): scores agree to that
            assert score == score_alone or abs(score - score_alone) < 1e-5


def _forward_once_per_batch(model):
    """The model's forward computed once per distinct batch: the three subtasks post-process the same batches, so
    the test runs each batch through the model once (what is compared is the pipeline's batching and unbatching)."""
    forward, outputs = model.forward, {}

    def key(value):
        return (tuple(value.shape), value.cpu().numpy().tobytes()) if torch.is_tensor(value) else repr(value)

    def once(**inputs):
        signature = tuple(sorted((name, key(value)) for name, value in inputs.items()))
        if signature not in outputs:
            outputs[signature] = forward(**inputs)
        return outputs[signature]

    model.forward = once


@pytest.fixture(scope="module")
def segmenters():
    made = {task: pipeline(task, model=str(default_model_path()))
            for task in ("image-segmentation", "open-vocabulary-segmentation")}
    for segmenter in made.values():
        _forward_once_per_batch(segmenter.model)
    return made


@pytest.mark.parametrize("task", ["image-segmentation", "open-vocabulary-segmentation"])
@pytest.mark.parametrize("subtask", ["panoptic", "semantic", "instance"])
def test_batch_size_gives_the_one_by_one_results(segmenters, task, subtask):
    segmenter = segmenters[task]
    kwargs = {"subtask": subtask}
    if task == "image-segmentation":
        sizes = SAME_PADDED_SIZE
        if subtask != "semantic":  # the original's thresholds, as eovseg's pipeline has them by default
            kwargs.update(threshold=0.0, overlap_mask_area_threshold=0.8)
    else:
        sizes = [SAME_PADDED_SIZE[0], *(size for pair in zip(OTHER_PADDED_SIZES, SAME_PADDED_SIZE[1:]) for size in pair)]
    images = _images(sizes)
    one_by_one = [segmenter(image, **kwargs) for image in images]
    assert all(len(result) >= 2 for result in one_by_one)  # results to compare, not empty lists
    if subtask == "panoptic":  # the default vocabulary's stuff classes are merged: one segment each at most
        for result in one_by_one:
            stuff = [r["label"] for r in result if r["label"] in TOY_STUFF]
            assert len(stuff) == len(set(stuff))
    for batch_size in BATCH_SIZES:
        _assert_same(segmenter(images, batch_size=batch_size, **kwargs), one_by_one, sizes)


def test_images_waiting_for_a_batch_are_bounded(segmenters, monkeypatch):
    # five processed sizes, twice, at batch_size=2: with 2 x batch_size images of four sizes waiting, the fullest
    # group (of one) runs before any batch fills; every result is still batch 1's, in input order
    segmenter = segmenters["open-vocabulary-segmentation"]
    sizes = [(48, 64), (64, 40), (50, 50), (40, 80), (64, 20), (48, 64), (64, 40), (50, 50), (40, 80), (64, 20)]
    images = _images(sizes)
    one_by_one = [segmenter(image) for image in images]
    run_batch, groups = type(segmenter)._run_batch, []
    monkeypatch.setattr(type(segmenter), "_run_batch",
                        lambda self, group, *args: groups.append(len(group)) or run_batch(self, group, *args))
    _assert_same(segmenter(images, batch_size=2), one_by_one, sizes)
    assert sum(groups) == len(images) and groups[0] == 1


def test_batch_size_must_be_a_positive_integer():
    segmenter = pipeline("open-vocabulary-segmentation", model=str(default_model_path()))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        segmenter(_images([(48, 64)]), batch_size=0)

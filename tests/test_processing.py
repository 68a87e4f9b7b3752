"""EovSegProcessor: vocabulary encoding, image pass-through, save/load and post-processing delegation."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eovseg.configuration_eovseg import EovSegConfig
from eovseg.processing.image_processing_eovseg import EovSegImageProcessor
from eovseg.processing.image_processing_pil_eovseg import EovSegImageProcessorPil
from eovseg.processing.processing_eovseg import EovSegProcessor
from eovseg.processing.tokenization_eovseg import ClipTokenizerError, build_clip_tokenizer, write_vocab_files
from eovseg.vocabulary import PROMPT_TEMPLATES, VocabularyError, build_prompts


open_clip = pytest.importorskip("open_clip")

VOCABULARY = ["person, child, girl", "car, automobile", "tree", "lawn,grass", "sky"]
TRAIN_VOCABULARY = ["person", "road, street", "grass", "building", "carpet"]


@pytest.fixture(scope="module")
def processor():
    image_processor = EovSegImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})
    return EovSegProcessor(image_processor, build_clip_tokenizer(), train_vocabulary=TRAIN_VOCABULARY)


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("RN50")


def _image(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_keys_shapes_and_dtypes(processor):
    out = processor(images=[_image(40, 60, 0), _image(70, 50, 1)], text=VOCABULARY)
    assert set(out.keys()) == {"pixel_values", "pixel_mask", "input_ids", "synonym_counts", "class_seen_mask"}
    assert "attention_mask" not in out
    num_synonyms = 3 + 2 + 1 + 2 + 1
    assert out["input_ids"].shape[0] == num_synonyms * len(PROMPT_TEMPLATES) == 126
    assert out["input_ids"].dtype == torch.int64
    assert out["synonym_counts"].shape == (5,) and out["synonym_counts"].dtype == torch.int64
    assert out["class_seen_mask"].shape == (5,) and out["class_seen_mask"].dtype == torch.bool
    # 40x60 -> 32x48 and 70x50 -> 45x32, padded to multiples of 32
    assert out["pixel_values"].shape == (2, 3, 64, 64) and out["pixel_values"].dtype == torch.float32
    assert out["pixel_mask"].shape == (2, 64, 64)
    assert out["pixel_mask"][0].sum() == 32 * 48 and out["pixel_mask"][1].sum() == 45 * 32
    assert processor.model_input_names == ["pixel_values", "pixel_mask", "input_ids", "synonym_counts", "class_seen_mask"]


def test_hand_written_counts_and_seen_mask(processor):
    out = processor(text=VOCABULARY)
    assert set(out.keys()) == {"input_ids", "synonym_counts", "class_seen_mask"}
    assert out["synonym_counts"].tolist() == [3, 2, 1, 2, 1]
    # person: a training synonym; car: "carpet" is not "car"; lawn,grass: "grass" is a training class
    assert out["class_seen_mask"].tolist() == [True, False, False, True, False]
    # an empty training vocabulary makes every class unseen
    unseen = EovSegProcessor(processor.image_processor, processor.tokenizer)(text=VOCABULARY)
    assert unseen["class_seen_mask"].tolist() == [False] * 5


def test_input_ids_equal_open_clip_and_are_trimmed(processor, reference):
    out = processor(text=VOCABULARY)
    ids = out["input_ids"]
    prompts = build_prompts(VOCABULARY)
    expected = reference(prompts)
    length = ids.shape[1]
    # L = the longest prompt including start and end tokens = max end-token position + 1
    assert length == int(expected.argmax(dim=1).max()) + 1 == int(ids.argmax(dim=1).max()) + 1
    assert length < 77
    assert torch.equal(ids, expected[:, :length])
    assert (expected[:, length:] == 0).all()  # the trimmed columns held only padding
    # order: class, synonym, template
    assert prompts[0] == "a photo of a person." and prompts[14] == "a photo of a child."
    assert ids[0].tolist()[:8] == [49406, 320, 1125, 539, 320, 2533, 269, 49407]
    assert torch.equal(ids[14], reference(["a photo of a child."])[0, :length])
    # rows are padded with 0 after the end token, which is the largest id of each row
    end = ids.argmax(dim=1)
    assert (ids[torch.arange(len(ids)), end] == 49407).all()
    columns = torch.arange(length)[None]
    assert (ids[columns > end[:, None]] == 0).all()
    assert ids[:, length - 1].eq(49407).any()  # the last column is needed by some prompt


def test_trimming_caps_at_context_length(processor, reference):
    vocabulary = ["dog", "a very long class name " + "with many many words " * 20]
    ids = processor(text=vocabulary)["input_ids"]
    assert ids.shape == (28, 77)
    assert torch.equal(ids, reference(build_prompts(vocabulary)))
    assert (ids[14:, -1] == 49407).all()  # truncated with the end token kept last
    # a shorter context length truncates the same way open_clip does
    short = EovSegProcessor(processor.image_processor, processor.tokenizer, context_length=10)
    ids10 = short(text=vocabulary)["input_ids"]
    assert torch.equal(ids10, reference(build_prompts(vocabulary), context_length=10))


def test_unicode_and_punctuation_vocabulary(processor, reference):
    vocabulary = ["Café, CRÈME brûlée", "dog's bed", "t-shirt!", "日本語", "&amp; sign", "rock 'n' roll"]
    ids = processor(text=vocabulary)["input_ids"]
    assert torch.equal(ids, reference(build_prompts(vocabulary))[:, : ids.shape[1]])


def test_return_tensors_variants(processor):
    pt = processor.encode_vocabulary(VOCABULARY)
    np_out = processor.encode_vocabulary(VOCABULARY, return_tensors="np")
    lists = processor(text=VOCABULARY, return_tensors=None)
    assert isinstance(np_out["input_ids"], np.ndarray) and np_out["class_seen_mask"].dtype == np.bool_
    assert np.array_equal(np_out["input_ids"], pt["input_ids"].numpy())
    assert lists["synonym_counts"] == [3, 2, 1, 2, 1]
    assert lists["input_ids"] == pt["input_ids"].tolist()
    assert torch.equal(processor(text=VOCABULARY)["input_ids"], pt["input_ids"])
    with pytest.raises(ValueError, match="return_tensors"):
        processor.encode_vocabulary(VOCABULARY, return_tensors="tf")


@pytest.mark.parametrize(
    "vocabulary, error, message",
    [
        ([], VocabularyError, "empty"),
        (["dog", "cat", "dog"], VocabularyError, "duplicate"),
        (["dog", 3], VocabularyError, "only strings"),
        (["dog", None], VocabularyError, "only strings"),
        (["dog", " , "], VocabularyError, "no class name"),
        ("ade20k_15", VocabularyError, "Unknown vocabulary 'ade20k_15': the built-in vocabularies are ade20k_150,"),
        ("dog, cat", VocabularyError, "give a list of class names"),
        ({"dog": 1}, VocabularyError, "list of class-name strings"),
    ],
)
def test_bad_vocabularies(processor, vocabulary, error, message):
    with pytest.raises(error, match=message):
        processor(text=vocabulary)
    with pytest.raises(error, match=message):
        processor.encode_vocabulary(vocabulary)


def test_call_without_inputs_raises(processor):
    with pytest.raises(ValueError, match="images, a vocabulary"):
        processor()
    with pytest.raises(ValueError, match="without images"):
        processor(text=VOCABULARY, segmentation_maps=[np.zeros((4, 4), np.int64)])


def test_bad_train_vocabulary_and_tokenizer(processor, tmp_path):
    with pytest.raises(TypeError, match="train_vocabulary"):
        EovSegProcessor(processor.image_processor, processor.tokenizer, train_vocabulary="person")
    with pytest.raises(TypeError, match="only strings"):
        EovSegProcessor(processor.image_processor, processor.tokenizer, train_vocabulary=["person", 1])
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_vocab_files(tmp_path)
    with pytest.raises(ClipTokenizerError):
        EovSegProcessor(processor.image_processor, CLIPTokenizer(vocab_file=vocab_file, merges_file=merges_file))


def test_single_image_equals_its_part_of_a_mixed_size_batch(processor):
    images = [_image(40, 60, 0), _image(70, 50, 1), _image(33, 33, 2)]
    batch = processor(images=images, text=VOCABULARY)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    for i, image in enumerate(images):
        single = processor(images=image, text=VOCABULARY)
        h, w = int(single["pixel_mask"][0].sum(0).max()), int(single["pixel_mask"][0].sum(1).max())
        assert single["pixel_mask"][0].sum() == h * w
        assert torch.equal(batch["pixel_values"][i, :, :h, :w], single["pixel_values"][0, :, :h, :w])
        assert torch.equal(batch["pixel_mask"][i, :h, :w], single["pixel_mask"][0, :h, :w])
        assert batch["pixel_mask"][i].sum() == h * w  # nothing valid outside that region
        assert (batch["pixel_values"][i][:, batch["pixel_mask"][i] == 0] == 0).all()
        for key in ("input_ids", "synonym_counts", "class_seen_mask"):
            assert torch.equal(single[key], batch[key])


def test_image_kwargs_and_segmentation_maps_are_forwarded(processor):
    image = _image(40, 60, 0)
    direct = processor.image_processor(image, size={"shortest_edge": 64, "longest_edge": 128})
    out = processor(images=image, size={"shortest_edge": 64, "longest_edge": 128})
    assert out["pixel_values"].shape == (1, 3, 64, 96)
    assert torch.equal(out["pixel_values"], direct["pixel_values"])
    semantic = np.zeros((40, 60), dtype=np.int64)
    semantic[:, 30:] = 2
    semantic[:5, :5] = 255
    with_maps = processor(images=image, segmentation_maps=semantic, text=VOCABULARY)
    assert [c.tolist() for c in with_maps["class_labels"]] == [[0, 2]]
    assert with_maps["mask_labels"][0].shape == (2, 32, 64)
    assert with_maps["synonym_counts"].tolist() == [3, 2, 1, 2, 1]


@pytest.mark.parametrize("saved_with", [EovSegImageProcessor, EovSegImageProcessorPil])
@pytest.mark.parametrize("backend", [None, "pil", "torchvision"])
def test_save_load_round_trip(processor, tmp_path, saved_with, backend, caplog):
    custom = EovSegProcessor(
        saved_with(size={"shortest_edge": 32, "longest_edge": 64}, size_divisibility=16),
        processor.tokenizer,
        train_vocabulary=TRAIN_VOCABULARY,
        context_length=12,
    )
    custom.save_pretrained(tmp_path)
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    with caplog.at_level("WARNING"):
        loaded = EovSegProcessor.from_pretrained(tmp_path, **({} if backend is None else {"backend": backend}))
    assert "backend" not in caplog.text  # no "Requested torchvision backend is not available" fallback
    # the PIL backend (the original's resize) unless the torchvision one is asked for, whichever saved the folder
    assert type(loaded.image_processor) is (EovSegImageProcessor if backend == "torchvision" else EovSegImageProcessorPil)
    assert loaded.train_vocabulary == TRAIN_VOCABULARY
    assert loaded.context_length == 12
    assert loaded.image_processor.size_divisibility == 16
    assert loaded.tokenizer.pad_token_id == 0
    vocabulary = VOCABULARY + ["a very long class name " + "with many words " * 10]
    images = [_image(40, 60, 0), _image(70, 50, 1)]
    # the same settings; a saved folder also names the code files for trust_remote_code (auto_map)
    settings = {k: v for k, v in loaded.image_processor.to_dict().items() if k != "auto_map"}
    assert settings == custom.image_processor.to_dict()
    assert set(loaded.image_processor.to_dict()["auto_map"]["AutoImageProcessor"]) == {"pil", "torchvision"}
    # the same settings on the loaded backend (the two backends' downscaled pixels differ slightly)
    custom.image_processor = type(loaded.image_processor)(**custom.image_processor.to_dict())
    before = custom(images=images, text=vocabulary)
    after = loaded(images=images, text=vocabulary)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert after["input_ids"].shape[1] == 12


def test_from_config(reference):
    config = EovSegConfig.from_variant(
        "tiny", pixel_mean=[1.0, 2.0, 3.0], pixel_std=[4.0, 5.0, 6.0], size_divisibility=64
    )
    processor = EovSegProcessor.from_config(config)
    assert processor.image_processor.image_mean == [1.0, 2.0, 3.0]
    assert processor.image_processor.image_std == [4.0, 5.0, 6.0]
    assert processor.image_processor.size_divisibility == 64
    assert processor.train_vocabulary == config.train_vocabulary
    assert processor.context_length == 77
    out = processor(text=config.vocabulary)
    # tiny vocabulary: person/child/girl/boy, car/automobile, dog/puppy, chair, sky, grass/lawn, road/street, wall
    assert out["synonym_counts"].tolist() == [4, 2, 2, 1, 1, 2, 2, 1]
    assert out["class_seen_mask"].tolist() == [True, True, False, True, True, False, True, False]
    assert torch.equal(out["input_ids"], reference(build_prompts(config.vocabulary))[:, : out["input_ids"].shape[1]])
    # image processor keyword arguments override the configuration
    overridden = EovSegProcessor.from_config(config, size_divisibility=8)
    assert overridden.image_processor.size_divisibility == 8
    image = np.full((20, 30, 3), 10, dtype=np.uint8)
    pixels = processor(images=image, do_resize=False)["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor([9 / 4, 8 / 5, 7 / 6]))


def _fake_outputs(batch_size=2, num_queries=5, num_classes=3, size=(8, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        class_queries_logits=torch.randn(batch_size, num_queries, num_classes + 1, generator=generator) * 3,
        masks_queries_logits=torch.randn(batch_size, num_queries, *size, generator=generator) * 3,
        image_sizes=torch.tensor([[32, 32], [24, 28]][:batch_size]),
    )


def test_post_process_delegates_with_real_values(processor):
    outputs = _fake_outputs()
    image_processor = processor.image_processor
    semantic = processor.post_process_semantic_segmentation(outputs, target_sizes=[(16, 16), (12, 14)])
    expected = image_processor.post_process_semantic_segmentation(outputs, target_sizes=[(16, 16), (12, 14)])
    assert [s.shape for s in semantic] == [(16, 16), (12, 14)]
    assert all(torch.equal(a, b) for a, b in zip(semantic, expected))

    panoptic = processor.post_process_panoptic_segmentation(outputs, 0.1, label_ids_to_fuse=[2])
    expected = image_processor.post_process_panoptic_segmentation(outputs, 0.1, label_ids_to_fuse=[2])
    assert [p["segments_info"] for p in panoptic] == [p["segments_info"] for p in expected]
    assert all(torch.equal(a["segmentation"], b["segmentation"]) for a, b in zip(panoptic, expected))
    assert panoptic[0]["segmentation"].shape == (32, 32)

    instance = processor.post_process_instance_segmentation(outputs, top_k=4, return_binary_maps=True)
    expected = image_processor.post_process_instance_segmentation(outputs, top_k=4, return_binary_maps=True)
    assert [p["segments_info"] for p in instance] == [p["segments_info"] for p in expected]
    assert all(torch.equal(a["segmentation"], b["segmentation"]) for a, b in zip(instance, expected))
    assert len(instance[0]["segments_info"]) == 4


def test_post_process_passes_arguments_through(processor, monkeypatch):
    calls = []
    for name in ("panoptic", "semantic", "instance"):
        method = f"post_process_{name}_segmentation"
        monkeypatch.setattr(
            processor.image_processor, method, lambda *a, _n=name, **k: calls.append((_n, a, k)) or _n
        )
    assert processor.post_process_panoptic_segmentation("out", 0.3, label_ids_to_fuse={1}) == "panoptic"
    assert processor.post_process_semantic_segmentation("out", target_sizes=[(2, 3)]) == "semantic"
    assert processor.post_process_instance_segmentation("out", threshold=0.5, top_k=7) == "instance"
    assert calls == [
        ("panoptic", ("out", 0.3), {"label_ids_to_fuse": {1}}),
        ("semantic", ("out",), {"target_sizes": [(2, 3)]}),
        ("instance", ("out",), {"threshold": 0.5, "top_k": 7}),
    ]


def test_default_construction_is_offline():
    processor = EovSegProcessor()
    assert type(processor.image_processor) is EovSegImageProcessorPil
    assert processor.tokenizer.pad_token_id == 0 and processor.train_vocabulary == []
    ids = processor(text=["dog"])["input_ids"]
    assert ids.shape == (14, 11)  # longest prompt: "this is a photo of a medium dog." -> 9 tokens + start + end
    assert ids[0].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407, 0, 0, 0]


# ---------------------------------------------------------------------------------------------
# transformers' ProcessingKwargs protocol
# ---------------------------------------------------------------------------------------------


def test_image_options_flat_nested_or_common_give_the_same_result(processor):
    image = _image(40, 60, 0)
    size = {"shortest_edge": 64, "longest_edge": 128}
    flat = processor(images=image, size=size)
    assert flat["pixel_values"].shape == (1, 3, 64, 96)
    nested = processor(images=image, images_kwargs={"size": size})  # was ignored
    assert torch.equal(nested["pixel_values"], flat["pixel_values"])
    as_numpy = processor(images=image, text=VOCABULARY, images_kwargs={"size": size}, common_kwargs={"return_tensors": "np"})
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and isinstance(as_numpy["input_ids"], np.ndarray)
    np.testing.assert_array_equal(as_numpy["pixel_values"], flat["pixel_values"].numpy())


def test_defaults_come_from_the_sub_processors_and_return_tensors_is_pt(processor):
    out = processor(images=_image(40, 60, 0), text=VOCABULARY)
    direct = processor.image_processor(_image(40, 60, 0))
    assert isinstance(out["pixel_values"], torch.Tensor) and isinstance(out["input_ids"], torch.Tensor)
    assert torch.equal(out["pixel_values"], direct["pixel_values"])  # the image processor's own size (32 / 64)
    # padding "longest" by default: the last column holds the longest prompt's end token
    assert torch.equal(out["input_ids"], processor.encode_vocabulary(VOCABULARY)["input_ids"])
    assert (out["input_ids"][:, -1] == 49407).any()
    lists = processor(text=VOCABULARY, text_kwargs={"return_tensors": None})
    assert isinstance(lists["input_ids"], list)


def test_text_options_padding_and_max_length(processor, reference):
    """padding / max_length were ignored with a warning: they now shape the prompt rows, flat or nested."""
    longest = processor(text=VOCABULARY)["input_ids"]
    padded = processor(text=VOCABULARY, padding="max_length", max_length=40)["input_ids"]
    assert padded.shape == (longest.shape[0], 40)
    assert torch.equal(padded[:, : longest.shape[1]], longest) and (padded[:, longest.shape[1]:] == 0).all()
    nested = processor(text=VOCABULARY, text_kwargs={"padding": "max_length", "max_length": 40})["input_ids"]
    assert torch.equal(nested, padded)
    cut = processor(text=VOCABULARY, max_length=8)["input_ids"]
    expected = reference(build_prompts(VOCABULARY), context_length=8)  # open_clip's own cut, end token kept
    assert torch.equal(cut, expected[:, : cut.shape[1]])
    ragged = processor(text=["dog", "person, child"], padding=False, return_tensors=None)["input_ids"]
    rows = processor(text=["dog", "person, child"])["input_ids"]
    assert [len(row) for row in ragged] == (rows != 0).sum(1).tolist()
    assert len({len(row) for row in ragged}) > 1 and all(row[-1] == 49407 for row in ragged)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"padding": "max_length", "text_kwargs": {"padding": "longest"}}, ValueError, "padding was passed two times"),
    ({"size": 32, "images_kwargs": {"size": 64}}, ValueError, "size was passed two times"),
    ({"max_length": 78}, ValueError, "max_length must be an int from 3 to the text tower's context length 77"),
    ({"padding": False}, ValueError, "padding=False leaves the prompts' rows of different lengths"),
    ({"padding": "longest_first"}, ValueError, "padding must be"),
    ({"truncation": False, "max_length": 6}, ValueError, "truncation is off"),
    ({"stride": 2}, ValueError, r"text options \['stride'\] do not apply"),
    ({"colour": "red"}, TypeError, r"unexpected keyword argument\(s\) \['colour'\]"),
    ({"videos_kwargs": {"fps": 2}}, TypeError, r"unexpected keyword argument\(s\) \['videos_kwargs'\]"),
    ({"images_kwargs": [("size", 32)]}, TypeError, "images_kwargs must be a dict"),
])
def test_call_options_refused_with_a_message(processor, kwargs, error, message):
    with pytest.raises(error, match=message):
        processor(images=_image(40, 60, 0), text=VOCABULARY, **kwargs)


def test_segments_info_reaches_the_image_processor(processor):
    panoptic = np.zeros((40, 60), dtype=np.int64)
    panoptic[:, 30:] = 7
    out = processor(images=_image(40, 60, 0), segmentation_maps=panoptic,
                    segments_info=[{"id": 7, "category_id": 3}])
    assert [c.tolist() for c in out["class_labels"]] == [[3]]
    with pytest.raises(ValueError, match="without images"):
        processor(text=VOCABULARY, segments_info=[{"id": 7, "category_id": 3}])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"size": "big"}, "`size` must be one of int, list[int], tuple[int, ...], dict[str, int], None, got 'big'."),
        ({"images_kwargs": {"size": "big"}}, "`size` must be one of int, list[int], tuple[int, ...], dict[str, int]"),
        ({"do_resize": "yes"}, "`do_resize` must be one of bool, None, got 'yes'."),
    ],
)
def test_option_of_the_wrong_type_is_one_line_naming_it(processor, options, message):
    # Before: huggingface_hub's StrictDataclassFieldValidationError, several lines and no ValueError / TypeError.
    with pytest.raises(TypeError) as caught:
        processor(images=np.zeros((16, 16, 3), np.uint8), **options)
    assert str(caught.value) == message or str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)

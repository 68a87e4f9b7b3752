"""Built-in vocabularies: contents as the shared table says, open_clip-exact prompts, and names accepted wherever a
class list is."""

import json
from pathlib import Path

import pytest
import torch

from eovseg import EovSegConfig, EovSegForPanopticSegmentation, EovSegProcessor
from eovseg.vocabularies import (
    build_vocabulary,
    get_vocabulary,
    list_vocabularies,
    load_vocabulary,
    read_vocabulary_file,
    set_default_vocabulary,
)
from eovseg.vocabulary import VocabularyError, build_prompts, seen_class_mask

open_clip = pytest.importorskip("open_clip")

PACKAGE_DIR = Path(__import__("eovseg").__file__).parent / "vocabularies"
ORIGINAL_TXT = Path(__file__).parent / "data" / "original_vocabularies"

# (classes, things) from the table of the vocabularies' README (None: "-", a semantic-only set).
TABLE = {
    "coco_panoptic": (133, 80),
    "ade20k_150": (150, 100),
    "ade20k_847": (847, None),
    "cityscapes": (19, 8),
    "mapillary_vistas": (65, 37),
    "pascal_ctx_59": (59, None),
    "pascal_ctx_459": (459, None),
    "pascal_voc_21": (21, None),
    "pascal_voc_20": (20, None),
    "coco_stuff": (171, 80),
    "lvis_1203": (1203, 1203),
}


def test_names_and_counts_match_the_table():
    assert list_vocabularies() == sorted(TABLE)
    for name, (num_classes, num_things) in TABLE.items():
        vocabulary = get_vocabulary(name)
        assert len(vocabulary) == len(vocabulary.is_thing) == len(vocabulary.dataset_ids) == num_classes, name
        if num_things is not None:
            assert sum(vocabulary.is_thing) == num_things, name
        else:
            assert vocabulary.task == "semantic", name
        assert len(set(vocabulary.dataset_ids)) == num_classes, name
        if vocabulary.colors is not None:
            assert len(vocabulary.colors) == num_classes
            assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in vocabulary.colors)


def test_entries_are_the_original_text_files_lines():
    """Each entry's text is exactly the original's `*_with_prompt_eng.txt` line (placeholder line skipped)."""
    files = sorted(ORIGINAL_TXT.glob("*_with_prompt_eng.txt"))
    assert len(files) == 10
    for path in files:
        name = path.name.replace("_with_prompt_eng.txt", "")
        from_txt = read_vocabulary_file(path).class_names
        assert get_vocabulary(name).class_names == from_txt, name
    # pascal_voc_20 is pascal_voc_21 without its background class
    assert get_vocabulary("pascal_voc_20").class_names == get_vocabulary("pascal_voc_21").class_names[1:]


def test_every_prompt_tokenizes_as_open_clip():
    """Token ids of every prompt of every built-in vocabulary, through the processor, equal open_clip's."""
    reference = open_clip.get_tokenizer("RN50")
    processor = EovSegProcessor()
    prompts = {name: build_prompts(get_vocabulary(name).class_names) for name in list_vocabularies()}
    # open_clip tokenizes each distinct prompt once (many recur across vocabularies): a pure function of the text.
    unique = sorted({p for texts in prompts.values() for p in texts})
    row_of = {p: i for i, p in enumerate(unique)}
    expected_all = reference(unique)
    for name, texts in prompts.items():
        ids = processor.encode_vocabulary(name)["input_ids"]
        assert ids.shape[0] == len(texts)
        expected = expected_all[[row_of[p] for p in texts]]
        length = ids.shape[1]
        assert torch.equal(ids, expected[:, :length]), name
        assert not expected[:, length:].any(), name  # nothing cut: only padding after our length


def test_seen_classes_of_ade20k_under_the_coco_training_vocabulary():
    """64 of the 150 ADE20K classes are seen with COCO panoptic as training vocabulary (the original's figure)."""
    processor = EovSegProcessor(train_vocabulary=get_vocabulary("coco_panoptic").class_names)
    seen = processor(text="ade20k_150")["class_seen_mask"]
    assert int(seen.sum()) == 64


def test_unknown_name_lists_the_known_ones():
    processor = EovSegProcessor()
    for call in (lambda: get_vocabulary("ade20k"), lambda: processor(text="ade20k"), lambda: load_vocabulary("ade20k")):
        with pytest.raises(VocabularyError, match="ade20k_150, ade20k_847, cityscapes"):
            call()


def test_build_vocabulary_things_by_default():
    vocabulary = build_vocabulary(["car, automobile", "road, street", "sky"], stuff=["road", "sky"])
    assert vocabulary.is_thing == [True, False, False]
    assert vocabulary.display_names == ["car", "road", "sky"]
    assert vocabulary.dataset_ids == [0, 1, 2] and vocabulary.stuff_ids == [1, 2]
    assert build_vocabulary(["a", "b"]).is_thing == [True, True]
    with pytest.raises(VocabularyError, match="not in the vocabulary"):
        build_vocabulary(["a", "b"], stuff=["c"])


def test_build_vocabulary_reads_flags_by_the_rule_of_vocabulary_files(tmp_path):
    # bool("no") is True: before the fix build_vocabulary(is_thing=["no", "no"]) gave [True, True].
    assert build_vocabulary(["a", "b", "c"], is_thing=["false", 0, True]).is_thing == [False, False, True]
    listing = tmp_path / "flags.json"
    for flags in (["no", "no"], ["yes", "false"], [2, 1], "tt"):
        with pytest.raises(VocabularyError, match="a flag must be true/false or 1/0|must be a list"):
            build_vocabulary(["a", "b"], is_thing=flags)
        listing.write_text(json.dumps({"classes": ["a", "b"], "is_thing": flags}))
        with pytest.raises(VocabularyError, match="a flag must be true/false or 1/0|must be a list"):
            load_vocabulary(str(listing))


def test_returned_lists_are_copies():
    first = get_vocabulary("cityscapes")
    first.class_names.append("x")
    first.is_thing[0] = True
    assert len(get_vocabulary("cityscapes")) == 19 and not get_vocabulary("cityscapes").is_thing[0]


def test_vocabulary_files(tmp_path):
    listing = tmp_path / "v.json"
    listing.write_text(json.dumps({"classes": ["cup, mug", "table", "wall"], "is_thing": [True, True, False]}))
    assert load_vocabulary(str(listing)).is_thing == [True, True, False]
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"categories": [{"id": 7, "name": "cat", "isthing": 1}, {"id": 9, "name": "sky", "isthing": 0}]}))
    vocabulary = load_vocabulary(coco)
    assert vocabulary.dataset_ids == [7, 9] and vocabulary.is_thing == [True, False]
    assert vocabulary.categories() == [{"id": 7, "name": "cat", "isthing": 1}, {"id": 9, "name": "sky", "isthing": 0}]
    text = tmp_path / "v.txt"
    text.write_text("0:invalid_class_id\n1:cup,mug\n2:table\n")
    vocabulary = load_vocabulary(str(text))
    assert vocabulary.class_names == ["cup,mug", "table"] and vocabulary.dataset_ids == [1, 2]
    with pytest.raises(VocabularyError, match="does not exist"):
        load_vocabulary(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(VocabularyError, match="not valid JSON"):
        load_vocabulary(broken)


def test_set_default_vocabulary_stores_embeddings_and_names():
    torch.manual_seed(0)
    model = EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny")).eval()
    processor = EovSegProcessor.from_config(model.config)
    set_default_vocabulary(model, processor, "cityscapes")
    cityscapes = get_vocabulary("cityscapes")
    assert model.config.vocabulary == cityscapes.class_names and model.config.is_thing == cityscapes.is_thing
    assert model.config.id2label[0] == "road"
    expected = model.get_text_embeddings(processor.encode_vocabulary(cityscapes.class_names)["input_ids"])
    assert torch.equal(model.default_text_embeddings, expected)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        default = model(pixel_values=pixel_values).class_queries_logits
        explicit = model(pixel_values=pixel_values, **processor(text="cityscapes")).class_queries_logits
    assert default.shape[-1] == 20
    # the default path uses the model's (empty) training vocabulary for the seen mask, as the processor does
    assert torch.allclose(default, explicit, atol=1e-6)


def test_bundled_as_package_data():
    setup = (Path(__file__).parents[1] / "setup.py").read_text()
    assert '"vocabularies/*.json"' in setup and '"vocabularies/*.md"' in setup
    assert "Apache License 2.0" in (PACKAGE_DIR / "ATTRIBUTION.md").read_text()

"""OPSNet's options (eovseg/opsnet_eovseg.py): Embedding Modulation, Mask Filtering, Decoupled Supervision.
Tiny model, CPU; the full-size run of Embedding Modulation is marked slow."""

import itertools
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eovseg import EovSegConfig, EovSegForPanopticSegmentation, EovSegProcessor
from eovseg.modeling_eovseg import EovSegInputError, build_synonym_index
from eovseg.opsnet_eovseg import (
    EovSegDecoupledSupervision,
    EovSegEmbeddingModulation,
    EovSegMaskFiltering,
    class_similarity,
)
from eovseg.training import (
    SYNTHETIC_CLASS_NAMES,
    DatasetFormatError,
    EovSegDataCollator,
    ImageLabelDataset,
    MixedSegmentationDataset,
    PanopticSegmentationDataset,
    make_synthetic_image_label_dataset,
    make_synthetic_panoptic_dataset,
)
from eovseg.training.train import main as train_main

SIZE = 64
NAMES = list(SYNTHETIC_CLASS_NAMES)


from test_training import one_thread  # noqa: E402,F401  (tiny tensors: one thread, autouse)


def perturbed(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny", mask_filtering=True)
    return perturbed(EovSegForPanopticSegmentation(config)), EovSegProcessor.from_config(config)


@pytest.fixture(scope="module")
def rows():
    return make_synthetic_panoptic_dataset(6, SIZE, SIZE, seed=0)


def image():
    return np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Embedding Modulation
# ----------------------------------------------------------------------------------------------------------------------


def unit(*values):
    v = torch.tensor(values, dtype=torch.float32)
    return v / v.norm()


def test_concept_and_domain_similarity_and_fusion_by_hand():
    # test vocabulary: class 0 with synonyms a, b; class 1 with c. Training: class 0 with d; class 1 with e, f.
    a, b, c = unit(1, 0, 0), unit(0.6, 0.8, 0), unit(0, 0, 1)
    d, e, f = unit(0, 1, 0), unit(1, 1, 0), unit(0, 1, 1)
    test, train = torch.stack([a, b, c]), torch.stack([d, e, f])
    H = class_similarity(test, build_synonym_index(torch.tensor([2, 1])), train, build_synonym_index(torch.tensor([1, 2])))
    dot = lambda x, y: float(x @ y)  # noqa: E731
    expected = [
        [max(dot(a, d), dot(b, d)), max(dot(a, e), dot(a, f), dot(b, e), dot(b, f))],
        [dot(c, d), max(dot(c, e), dot(c, f))],
    ]
    assert H.flatten().tolist() == pytest.approx(sum(expected, []), abs=1e-6)
    em = EovSegEmbeddingModulation(alpha=10.0, beta=0.5, normalize=True)
    s = em.domain_similarity(H)
    assert float(s) == pytest.approx((max(expected[0]) + max(expected[1])) / 2, abs=1e-6)
    # E_m = E_q / |E_q| + alpha (1 - s) E_c / |E_c|
    eq, ec = torch.tensor([[[3.0, 0.0, 4.0]]]), torch.tensor([[[0.0, 2.0, 0.0]]])
    weight = 10.0 * (1 - float(s))
    fused = em.fuse(eq, ec, s)
    assert fused[0, 0].tolist() == pytest.approx([0.6, weight, 0.8], abs=1e-6)
    assert EovSegEmbeddingModulation(10.0, 0.5, normalize=False).fuse(eq, ec, s)[0, 0].tolist() == pytest.approx(
        [3.0, 2 * weight, 4.0], abs=1e-5
    )


def test_debiasing_keeps_a_training_class_and_boosts_a_far_one():
    em = EovSegEmbeddingModulation(beta=0.5)
    train = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    far = F.normalize(torch.randn(8, generator=torch.Generator().manual_seed(2)), dim=-1)
    test = torch.stack([train[1], far])  # class 0 is identical to a training class
    H = class_similarity(test, build_synonym_index(torch.tensor([1, 1])), train, build_synonym_index(torch.tensor([1, 1, 1])))
    assert H[0].max().item() == 1.0  # exactly, though float32 self-similarity is 1 only up to round-off
    logits = torch.tensor([[[7.5, -3.25]]])
    out = em.debias(logits, H)
    assert out[..., 0].item() == 7.5  # unchanged, bit for bit
    closeness = max(float(H[1].max()), 1e-6) ** 0.5
    assert out[..., 1].item() == pytest.approx(-3.25 / closeness, rel=1e-6)


def test_training_vocabulary_gives_query_only_logits_exactly(tiny):
    model, processor = tiny
    vocabulary = model.config.train_vocabulary
    inputs = processor(images=image(), text=vocabulary, class_ensemble="embedding_modulation")
    with torch.no_grad():
        out = model(**inputs, class_ensemble="embedding_modulation")
    assert out.domain_similarity.item() == 1.0
    # s = 1: E_m = E_q, no debiasing: the void-filtered probabilities of the decoder's own logits, bit for bit
    query = out.stage_class_queries_logits[:, -1]
    void = query.softmax(-1)[..., -1:]
    expected = torch.log(torch.cat([query[..., :-1].softmax(-1) * (1 - void), void], -1) + 1e-8)
    assert torch.equal(out.class_queries_logits, expected)


def test_embedding_modulation_on_a_new_vocabulary(tiny):
    model, processor = tiny
    vocabulary = ["zebra", "volcano", "sky", "teapot"]
    inputs = processor(images=image(), text=vocabulary, class_ensemble="embedding_modulation")
    with torch.no_grad():
        geometric = model(**inputs)
        modulated = model(**inputs, class_ensemble="embedding_modulation")
    s = modulated.domain_similarity.item()
    assert 0 < s < 1 and geometric.domain_similarity is None
    probs = modulated.class_queries_logits.exp()
    assert probs.sum(-1).sub(1).abs().max() < 1e-5
    # the void probability of the in-vocabulary head is kept
    void = modulated.stage_class_queries_logits[:, -1].softmax(-1)[..., -1]
    assert torch.allclose(probs[..., -1], void + 1e-8, atol=1e-6)
    assert not torch.allclose(modulated.class_queries_logits, geometric.class_queries_logits)
    # the configuration's default selects it too
    model.config.class_ensemble = "embedding_modulation"
    try:
        with torch.no_grad():
            again = model(**inputs)
    finally:
        model.config.class_ensemble = "geometric"
    assert torch.equal(again.class_queries_logits, modulated.class_queries_logits)


def test_embedding_modulation_errors(tiny):
    model, processor = tiny
    inputs = processor(images=image(), text=["cat", "sky"])
    with pytest.raises(EovSegInputError, match="train_input_ids"):
        model(**inputs, class_ensemble="embedding_modulation")
    with pytest.raises(EovSegInputError, match="class_ensemble must be one of"):
        model(**inputs, class_ensemble="arithmetic")
    with pytest.raises(ValueError, match="class_ensemble must be"):
        processor(text=["cat"], class_ensemble="arithmetic")
    with pytest.raises(ValueError, match="class_ensemble must be one of"):
        EovSegConfig.from_variant("tiny", class_ensemble="arithmetic")
    bare = EovSegProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer)
    with pytest.raises(ValueError, match="no training vocabulary|has none"):
        bare(text=["cat"], class_ensemble="embedding_modulation")


def test_pipeline_selects_scoring_per_call(tiny, tmp_path):
    from transformers import pipeline

    import eovseg  # noqa: F401  (registers the pipeline)
    from eovseg.auto_registration import save_model_folder

    model, processor = tiny
    save_model_folder(model, processor, tmp_path)
    segmenter = pipeline("open-vocabulary-segmentation", model=str(tmp_path))
    picture = __import__("PIL.Image").Image.fromarray(image())
    labels = ["person", "zebra", "sky"]
    plain = segmenter(picture, candidate_labels=labels, stuff_labels=["sky"])
    modulated = segmenter(picture, candidate_labels=labels, stuff_labels=["sky"], class_ensemble="embedding_modulation",
                          score_mode="class_iou")
    assert isinstance(plain, list) and isinstance(modulated, list)
    inputs = processor(images=picture, text=labels, class_ensemble="embedding_modulation")
    with torch.no_grad():
        out = segmenter.model(**inputs, class_ensemble="embedding_modulation")
    expected = processor.post_process_panoptic_segmentation(
        out, label_ids_to_fuse={2}, target_sizes=[(SIZE, SIZE)], score_mode="class_iou"
    )[0]["segments_info"]
    assert [round(r["score"], 5) for r in modulated] == [round(s["score"], 5) for s in expected]


@pytest.mark.slow
def test_embedding_modulation_on_a_converted_full_size_checkpoint(tmp_path):
    from eovseg.conversion_scripts.convert_original_checkpoint import main as convert_main
    from test_conversion import original_checkpoint

    torch.manual_seed(0)
    source = perturbed(EovSegForPanopticSegmentation(EovSegConfig.from_variant("r50")))
    ckpt = tmp_path / "model_final.pth"
    torch.save(original_checkpoint(source, extra_vit_keys=False), ckpt)
    assert convert_main(["--checkpoint_path", str(ckpt), "--variant", "r50", "--output_dir", str(tmp_path / "c")]) == 0
    model = EovSegForPanopticSegmentation.from_pretrained(tmp_path / "c").eval()
    processor = EovSegProcessor.from_pretrained(tmp_path / "c")
    processor.train_vocabulary = ["person", "car", "sky"]
    inputs = processor(images=np.zeros((96, 128, 3), np.uint8), text=["person", "zebra", "sky"],
                       class_ensemble="embedding_modulation")
    with torch.no_grad():
        out = model(**inputs, class_ensemble="embedding_modulation")
    assert out.class_queries_logits.shape == (1, 100, 4) and torch.isfinite(out.class_queries_logits).all()
    assert 0 < out.domain_similarity.item() < 1


# ----------------------------------------------------------------------------------------------------------------------
# Mask Filtering
# ----------------------------------------------------------------------------------------------------------------------


def test_default_model_has_no_iou_head_and_refuses_iou_scoring():
    config = EovSegConfig.from_variant("tiny")
    model = EovSegForPanopticSegmentation(config).eval()
    assert not any("mask_filtering" in k for k in model.state_dict())
    processor = EovSegProcessor.from_config(config)
    with torch.no_grad():
        out = model(**processor(images=image(), text=["cat", "sky"]))
    assert out.iou_scores is None
    for kwargs in ({"score_mode": "iou"}, {"score_mode": "class_iou"}, {"iou_threshold": 0.3}):
        with pytest.raises(ValueError, match="no trained IoU head"):
            processor.post_process_panoptic_segmentation(out, **kwargs)
    with pytest.raises(ValueError, match="score_mode must be one of"):
        processor.post_process_panoptic_segmentation(out, score_mode="area")


def test_iou_targets_by_hand():
    head = EovSegMaskFiltering(hidden_dim=4, num_stages=1)
    # two queries of 2x2 logits at a quarter of the 8x8 target size; query 1 matched to target 0, query 0 unmatched
    logits = torch.full((1, 2, 2, 2), -5.0)
    logits[0, 1, 0, :] = 5.0  # top half
    target = torch.zeros(1, 8, 8)
    target[0, :4, :6] = 1  # 24 px; the prediction covers the top 32 px: intersection 24, union 32
    targets = head.iou_targets(logits, [target], [(torch.tensor([1]), torch.tensor([0]))])
    assert targets.tolist() == [[0.0, pytest.approx(24 / 32)]]
    scores = torch.tensor([[0.5, 0.5]], requires_grad=True)
    loss = head.loss(scores, logits, [target], [(torch.tensor([1]), torch.tensor([0]))])
    assert loss.item() == pytest.approx(((0.5 - 0) ** 2 + (0.5 - 0.75) ** 2) / 2)


def test_iou_loss_trains_the_head_on_the_criterions_matches(tiny, rows):
    model, processor = tiny
    model.train()
    try:
        collator = EovSegDataCollator.from_processor(processor, NAMES, config=model.config)
        batch = collator([PanopticSegmentationDataset(rows)[i] for i in range(2)])
        out = model(**batch)
        assert out.iou_scores.shape == (2, model.config.num_proposals)
        assert all(f"s{s}_loss_iou" in out.loss_dict for s in range(3))
        out.loss.backward()
        assert all(head.weight.grad.abs().sum() > 0 for head in model.mask_filtering.heads)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_score_modes_and_iou_threshold(tiny):
    model, processor = tiny
    with torch.no_grad():
        out = model(**processor(images=image(), text=["person", "car", "sky"]))
    probs, labels = out.class_queries_logits.softmax(-1)[0].max(-1)
    iou = out.iou_scores[0]
    candidates = labels.ne(3).nonzero().flatten().tolist()
    assert candidates, "the random model should propose something"
    by_mode = {}
    for mode in ("class", "iou", "class_iou"):
        result = processor.post_process_panoptic_segmentation(out, score_mode=mode, label_ids_to_fuse=[])[0]
        by_mode[mode] = sorted(round(s["score"], 6) for s in result["segments_info"])
        expected = {"class": probs, "iou": iou, "class_iou": probs * iou}[mode]
        assert set(by_mode[mode]) <= {round(float(expected[q]), 6) for q in candidates}
    # a threshold above every predicted IoU leaves nothing; one below every IoU changes nothing
    high = processor.post_process_panoptic_segmentation(out, iou_threshold=float(iou.max()), label_ids_to_fuse=[])[0]
    assert high["segments_info"] == []
    low = processor.post_process_panoptic_segmentation(out, iou_threshold=float(iou.min()) / 2, label_ids_to_fuse=[])[0]
    assert sorted(round(s["score"], 6) for s in low["segments_info"]) == by_mode["class"]


# ----------------------------------------------------------------------------------------------------------------------
# Decoupled Supervision
# ----------------------------------------------------------------------------------------------------------------------


def test_match_loss_by_hand():
    ds = EovSegDecoupledSupervision(iou_threshold=0.5)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [5.0, 5.0, 5.0]])
    iou = torch.tensor([0.9, 0.6, 0.1])  # the third prediction is filtered out
    probs = logits[:2].softmax(-1)
    expected = 1 - (probs[:, 0].max() + probs[:, 2].max()) / 2
    assert ds.match_loss(logits, iou, torch.tensor([2, 0, 0])).item() == pytest.approx(expected.item())
    # none above the threshold: the best one alone
    low = torch.tensor([0.2, 0.3, 0.1])
    assert ds.match_loss(logits, low, torch.tensor([1])).item() == pytest.approx(1 - logits[1].softmax(-1)[1].item())
    assert ds.match_loss(logits, iou, torch.tensor([], dtype=torch.long)).item() == 0.0
    # with a void column (last) in the softmax: the labels' probabilities shrink by the void share
    with_void = torch.cat([logits, torch.full((3, 1), 1.0)], dim=1)
    probs = with_void[:2].softmax(-1)
    expected = 1 - (probs[:, 0].max() + probs[:, 2].max()) / 2
    assert ds.match_loss(with_void, iou, torch.tensor([2, 0])).item() == pytest.approx(expected.item())


def test_sum_loss_by_hand():
    masks = torch.zeros(2, 2, 2)
    masks[0] = torch.tensor([[10.0, -10.0], [0.0, 0.0]])
    masks[1] = torch.tensor([[-10.0, 10.0], [0.0, -10.0]])
    valid = torch.tensor([[True, True], [True, False]])
    s = torch.sigmoid
    cover = [s(torch.tensor(10.0)) + s(torch.tensor(-10.0))] * 2 + [torch.tensor(1.0)]
    expected = math.sqrt(sum(float(1 - c) ** 2 for c in cover) / 3)
    assert EovSegDecoupledSupervision.sum_loss(masks, valid).item() == pytest.approx(expected, abs=1e-6)


def test_image_label_data_mixing_and_collation(tiny, rows):
    model, processor = tiny
    image_rows = make_synthetic_image_label_dataset(4, SIZE, SIZE, seed=3)
    assert set(image_rows.column_names) == {"image", "labels"}
    panoptic = make_synthetic_panoptic_dataset(4, SIZE, SIZE, seed=3)
    for labels, segments in zip(image_rows["labels"], panoptic["segments_info"]):
        assert labels == [NAMES[c] for c in sorted({s["category_id"] for s in segments})]
    image_level = ImageLabelDataset(image_rows, NAMES)
    assert image_level[0]["image_labels"].tolist() == [NAMES.index(n) for n in image_rows[0]["labels"]]
    by_id = ImageLabelDataset([{"image": image_rows[0]["image"], "labels": [4, 0, 4]}], NAMES)
    assert by_id[0]["image_labels"].tolist() == [0, 4]
    with pytest.raises(DatasetFormatError, match="row 0.*'hexagon' is not in label_names"):
        ImageLabelDataset([{"image": image_rows[0]["image"], "labels": ["hexagon"]}], NAMES)[0]
    with pytest.raises(DatasetFormatError, match="no column 'labels'"):
        ImageLabelDataset(rows, NAMES)
    mixed = MixedSegmentationDataset(PanopticSegmentationDataset(rows), image_level, 0.25)
    assert len(mixed) == 8
    assert ["image_labels" in mixed[i] for i in range(8)] == [False, False, False, True] * 2
    collator = EovSegDataCollator.from_processor(processor, NAMES, config=model.config, image_label_names=NAMES[:3])
    batch = collator([mixed[2], mixed[3]])
    assert batch["image_labels"][0] is None and torch.equal(batch["image_labels"][1], mixed[3]["image_labels"])
    assert batch["mask_labels"][1].shape[0] == 0
    assert batch["image_label_synonym_counts"].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="image_label_vocabulary"):
        EovSegDataCollator.from_processor(processor, NAMES)([mixed[3]])


def test_decoupled_supervision_losses_in_the_model(rows):
    with pytest.raises(ValueError, match="needs mask_filtering"):
        EovSegConfig.from_variant("tiny", decoupled_supervision=True)
    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny", mask_filtering=True, decoupled_supervision=True)
    model = EovSegForPanopticSegmentation(config).train()
    processor = EovSegProcessor.from_config(config)
    image_level = ImageLabelDataset([{"image": rows[1]["image"], "labels": ["rectangle", "sky"]}], NAMES[1:])
    collator = EovSegDataCollator.from_processor(processor, NAMES, config=config, image_label_names=NAMES[1:])
    batch = collator([PanopticSegmentationDataset(rows)[0], image_level[0]])
    out = model(**batch)
    assert {"loss_match", "loss_sum", "s2_loss_iou"} <= set(out.loss_dict)
    panoptic_only = sum(
        w * out.loss_dict[f"s{s}_{k}"]
        for s in range(3)
        for k, w in (("loss_ce", 2.0), ("loss_mask", 5.0), ("loss_dice", 5.0), ("loss_iou", 1.0))
    )
    assert out.loss.item() == pytest.approx(
        (panoptic_only + 1.0 * out.loss_dict["loss_match"] + 0.4 * out.loss_dict["loss_sum"]).item(), rel=1e-5
    )
    out.loss.backward()
    # a batch of one kind only still reports every term (zero for the missing kind), as multi-process logging needs
    panoptic_batch = collator([PanopticSegmentationDataset(rows)[0]])
    only_panoptic = model(**panoptic_batch).loss_dict
    only_labels = model(**collator([image_level[0]])).loss_dict
    assert set(only_panoptic) == set(only_labels) == set(out.loss_dict)
    assert only_panoptic["loss_match"].item() == 0.0 and only_labels["s0_loss_ce"].item() == 0.0
    plain = EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny", mask_filtering=True)).train()
    with pytest.raises(EovSegInputError, match="decoupled_supervision is off"):
        plain(**batch)
    del batch["image_label_input_ids"]
    with pytest.raises(EovSegInputError, match="image_label_input_ids"):
        model(**batch)


COMMON = [
    "--model", "tiny", "--dataset", "synthetic", "--synthetic_image_size", str(SIZE), "--per_device_batch_size", "2",
    "--logging_steps", "1", "--no_progress", "--no_augmentation", "--save_steps", "0", "--synthetic_train_images", "4",
]


def read_losses(path):
    import json

    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if "loss" in line]


def test_our_loop_trains_mask_filtering_and_decoupled_supervision(tmp_path):
    out = tmp_path / "run"
    overrides = '{"mask_filtering": true, "decoupled_supervision": true}'
    train_main(COMMON + ["--max_steps", "3", "--config_overrides", overrides, "--image_label_dataset", "synthetic",
                         "--output_dir", str(out)])
    records = [r for r in read_losses(out) if "loss" in r]
    assert len(records) == 3
    assert all(np.isfinite(r["loss_match"]) and np.isfinite(r["s2_loss_iou"]) for r in records)
    model = EovSegForPanopticSegmentation.from_pretrained(out)
    assert model.config.decoupled_supervision and model.mask_filtering is not None


def test_trainer_trains_mask_filtering_and_decoupled_supervision(tmp_path, rows):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny", mask_filtering=True, decoupled_supervision=True)
    model = EovSegForPanopticSegmentation(config)
    processor = EovSegProcessor.from_config(config)
    image_level = ImageLabelDataset(make_synthetic_image_label_dataset(4, SIZE, SIZE, seed=3), NAMES)
    dataset = MixedSegmentationDataset(PanopticSegmentationDataset(rows), image_level, 0.5)
    collator = EovSegDataCollator.from_processor(processor, NAMES, config=config, image_label_names=NAMES)
    before = {k: v.clone() for k, v in model.state_dict().items() if "mask_filtering" in k}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, save_strategy="no",
                             logging_steps=1, report_to=[], use_cpu=True, remove_unused_columns=False)
    result = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())

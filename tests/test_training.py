"""Training: synthetic data, data adapters and augmentation, collator, optimizer/schedule, the Accelerate script
(loss goes down, exact resume) and transformers.Trainer. Tiny model, 64x64 images, CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.image_transforms import id_to_rgb

from eovseg import EovSegConfig, EovSegForPanopticSegmentation, EovSegProcessor
from eovseg.training import (
    DatasetFormatError,
    EovSegDataCollator,
    LargeScaleJitter,
    PanopticSegmentationDataset,
    ResizeShortestEdge,
    SemanticSegmentationDataset,
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
    get_dataset_categories,
    make_synthetic_panoptic_dataset,
    synthetic_categories,
    training_arguments,
)
from eovseg.training.trainer_utils import multistep_lr_factor, scaled_lr_steps
from eovseg.training.train import main as train_main

SIZE = 64
NAMES = [c["name"] for c in synthetic_categories()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: one thread is faster, and much faster on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rows():
    return make_synthetic_panoptic_dataset(12, SIZE, SIZE, seed=0)


def rgb_ids(label) -> np.ndarray:
    rgb = np.asarray(label).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic data set
# ----------------------------------------------------------------------------------------------------------------------


def test_synthetic_dataset_schema_and_content(rows):
    assert set(rows.column_names) == {"image_id", "file_name", "height", "width", "image", "label", "segments_info"}
    assert get_dataset_categories(rows) == synthetic_categories()
    kinds_seen, crowd, void = set(), 0, 0
    for row in rows:
        image, label = np.asarray(row["image"]), rgb_ids(row["label"])
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8 and label.shape == (SIZE, SIZE)
        ids = {s["id"] for s in row["segments_info"]}
        assert ids == set(np.unique(label).tolist()) - {0}  # every listed id is drawn, every drawn id listed
        for s in row["segments_info"]:
            mask = label == s["id"]
            assert s["area"] == mask.sum()
            ys, xs = np.nonzero(mask)
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        things = [s for s in row["segments_info"] if s["category_id"] < 3]
        stuff = [s["category_id"] for s in row["segments_info"] if s["category_id"] >= 3]
        assert len(things) >= 2 and sorted(stuff) == [3, 4]  # several instances, sky and ground
        kinds_seen |= {s["category_id"] for s in things}
        crowd += any(s["iscrowd"] for s in row["segments_info"])
        void += (label == 0).any()
    assert kinds_seen == {0, 1, 2}
    bigger = make_synthetic_panoptic_dataset(60, 32, 32, seed=1)
    flags = [any(s["iscrowd"] for s in r) for r in bigger["segments_info"]]
    assert 0 < sum(flags) < 60  # crowd flags sometimes


def test_synthetic_dataset_is_deterministic(rows):
    again = make_synthetic_panoptic_dataset(3, SIZE, SIZE, seed=0)
    other = make_synthetic_panoptic_dataset(3, SIZE, SIZE, seed=1)
    for i in range(3):
        assert np.array_equal(np.asarray(again[i]["image"]), np.asarray(rows[i]["image"]))
        assert again[i]["segments_info"] == rows[i]["segments_info"]
    assert not np.array_equal(np.asarray(other[0]["image"]), np.asarray(rows[0]["image"]))
    renamed = make_synthetic_panoptic_dataset(1, 32, 48, seed=0, class_names=["disc", "box", "wedge", "sky", "soil"])
    assert [c["name"] for c in get_dataset_categories(renamed)] == ["disc", "box", "wedge", "sky", "soil"]
    assert np.asarray(renamed[0]["image"]).shape == (32, 48, 3)


def test_synthetic_extra_thing_classes():
    # Two more thing classes, a known shape in a new colour each: categories 5 and 6, drawn with their own colour, tagged
    # in the image-level data; without extras the default data set is drawn (same rng order: see the test above).
    from eovseg.synthetic import make_synthetic_image_label_dataset

    extras = [("circle", (250, 140, 20)), ("rectangle", (20, 20, 240))]
    names = NAMES + ["orange disc", "navy box"]
    data = make_synthetic_panoptic_dataset(40, SIZE, SIZE, seed=5, class_names=names, extra_thing_classes=extras)
    assert get_dataset_categories(data)[5:] == [{"id": 5, "name": "orange disc", "isthing": 1},
                                                {"id": 6, "name": "navy box", "isthing": 1}]
    assert synthetic_categories(extra_thing_classes=extras)[5]["name"] == "circle (250, 140, 20)"
    colours = {c: [] for c in range(7)}
    for row in data:
        image, label = np.asarray(row["image"]).astype(float), rgb_ids(row["label"])
        for s in row["segments_info"]:
            colours[s["category_id"]].append(image[label == s["id"]].mean(0))
    assert all(colours[c] for c in range(7))  # every class drawn
    for category, (_, rgb) in zip((5, 6), extras):
        # base colour jittered by at most 25 per channel, shading noise of std 6 averaged over the segment
        assert np.abs(np.array(colours[category]) - rgb).max() < 30
    for category, rgb in zip((0, 1, 2), [(225, 45, 45), (190, 60, 210), (240, 205, 35)]):
        assert np.abs(np.array(colours[category]) - rgb).max() < 30
    # a rectangle fills its bounding box, a circle about pi/4 of it (unoccluded ones at least)
    fill = {c: [s["area"] / (s["bbox"][2] * s["bbox"][3]) for r in data["segments_info"] for s in r
                if s["category_id"] == c] for c in (5, 6)}
    assert np.median(fill[6]) > 0.95 and 0.6 < np.median(fill[5]) < 0.9
    tagged = make_synthetic_image_label_dataset(40, SIZE, SIZE, seed=5, class_names=names, extra_thing_classes=extras)
    assert [sorted(set(labels) & {"orange disc", "navy box"}) for labels in tagged["labels"]] == [
        sorted({names[s["category_id"]] for s in r} & {"orange disc", "navy box"}) for r in data["segments_info"]]
    with pytest.raises(ValueError, match="extra_thing_classes"):
        make_synthetic_panoptic_dataset(1, SIZE, SIZE, extra_thing_classes=[("hexagon", (1, 2, 3))])
    with pytest.raises(ValueError, match="extra_thing_classes"):
        make_synthetic_panoptic_dataset(1, SIZE, SIZE, extra_thing_classes=[("circle", (1, 2, 300))])
    with pytest.raises(ValueError, match="class_names must name the 7"):
        make_synthetic_panoptic_dataset(1, SIZE, SIZE, class_names=NAMES, extra_thing_classes=extras)


# ----------------------------------------------------------------------------------------------------------------------
# Adapters, augmentation, collator
# ----------------------------------------------------------------------------------------------------------------------


def test_panoptic_targets_follow_segments_info(rows):
    dataset = PanopticSegmentationDataset(rows)  # no augmentation
    for i in range(len(rows)):
        example, row = dataset[i], rows[i]
        label = rgb_ids(row["label"])
        kept = [s for s in row["segments_info"] if not s["iscrowd"]]
        assert example["class_labels"].tolist() == [s["category_id"] for s in kept]
        expected = np.stack([label == s["id"] for s in kept])
        assert np.array_equal(example["mask_labels"].numpy(), expected)
        assert torch.equal(example["image"], torch.from_numpy(np.array(row["image"])).permute(2, 0, 1))
    mapped = PanopticSegmentationDataset(rows, category_id_to_label={0: 4, 1: 3, 2: 2, 3: 1, 4: 0})
    assert mapped[0]["class_labels"].tolist() == [4 - c for c in dataset[0]["class_labels"].tolist()]


def test_large_scale_jitter(rows):
    lsj = LargeScaleJitter(crop_size=48, min_scale=0.5, max_scale=2.0)
    dataset = PanopticSegmentationDataset(rows, lsj, seed=3)
    first = dataset[5]
    assert first["image"].shape == (3, 48, 48) and first["mask_labels"].shape[1:] == (48, 48)
    assert torch.equal(dataset[5]["image"], first["image"])  # same seed, epoch, row: same sample
    dataset.set_epoch(1)
    assert not torch.equal(dataset[5]["image"], first["image"])
    # Geometry: an image whose colour is its own segment id stays aligned with the masks through flip/resize/crop.
    ids = np.zeros((40, 60), dtype=np.int64)
    ids[:, 30:] = 2
    ids[5:20, 5:25] = 1
    image = np.stack([ids * 100, np.zeros_like(ids), np.zeros_like(ids)], -1).astype(np.uint8)
    sizes, flips = set(), set()
    for seed in range(12):
        out, labels, valid = lsj(image, ids, np.random.default_rng(seed), -1)
        h, w = valid
        assert out.shape == (48, 48, 3) and labels.shape == (48, 48)
        assert (out[h:, :] == 128).all() and (out[:, w:] == 128).all()  # grey padding before normalization
        assert (labels[h:, :] == -1).all() and (labels[:, w:] == -1).all()
        assert (labels[:h, :w] >= 0).all()
        inner = labels[:h, :w]
        for k in (0, 1, 2):  # away from edges (bilinear blends them), the colour is the segment's
            core = (inner == k)
            core = core[:-2, :-2] & core[1:-1, :-2] & core[2:, :-2] & core[:-2, 1:-1] & core[1:-1, 1:-1] & core[2:, 1:-1] \
                & core[:-2, 2:] & core[1:-1, 2:] & core[2:, 2:]
            assert np.abs(out[1 : h - 1, 1 : w - 1, 0][core] - 100 * k).max(initial=0) <= 2
        sizes.add(valid)
        flips.add(bool(labels[:h, 0].max() == 2))
    assert len(sizes) > 3 and flips == {True, False}
    # semantic maps padded with ignore_index
    sem = SemanticSegmentationDataset([{"image": image, "label": ids}], LargeScaleJitter(96, 0.2, 0.3))
    example = sem[0]
    assert example["image"].shape == (3, 96, 96) and example["class_labels"].tolist() == [0, 1, 2]


def test_resize_shortest_edge():
    image = np.zeros((40, 100, 3), dtype=np.uint8)
    labels = np.zeros((40, 100), dtype=np.int64)
    out, out_labels, size = ResizeShortestEdge(64, 128)(image, labels)
    assert out.shape == (51, 128, 3) and out_labels.shape == (51, 128) and size == (51, 128)
    out, _, _ = ResizeShortestEdge(640, 2560)(image, labels)
    assert out.shape == (640, 1600, 3)


def test_collator_pads_normalizes_and_adds_vocabulary():
    config = EovSegConfig.from_variant("tiny")
    processor = EovSegProcessor.from_config(config)
    collator = EovSegDataCollator.from_processor(processor, NAMES, config=config)
    examples = [
        {
            "image": torch.full((3, 40, 50), 200, dtype=torch.uint8),
            "image_size": torch.tensor([40, 50]),
            "mask_labels": torch.ones((2, 40, 50), dtype=torch.bool),
            "class_labels": torch.tensor([0, 3]),
        },
        {
            "image": torch.zeros((3, 70, 20), dtype=torch.uint8),
            "image_size": torch.tensor([60, 20]),
            "mask_labels": torch.zeros((0, 70, 20), dtype=torch.bool),
            "class_labels": torch.zeros(0, dtype=torch.long),
        },
    ]
    batch = collator(examples)
    assert batch["pixel_values"].shape == (2, 3, 96, 64)
    mean, std = torch.tensor(config.pixel_mean).view(3, 1, 1), torch.tensor(config.pixel_std).view(3, 1, 1)
    torch.testing.assert_close(batch["pixel_values"][0, :, :40, :50], ((200 - mean) / std).expand(3, 40, 50))
    assert (batch["pixel_values"][0, :, 40:] == 0).all() and (batch["pixel_values"][0, :, :, 50:] == 0).all()
    assert batch["pixel_mask"][0].sum() == 40 * 50 and batch["pixel_mask"][1].sum() == 60 * 20
    assert [m.shape for m in batch["mask_labels"]] == [(2, 96, 64), (0, 96, 64)]
    assert batch["mask_labels"][0].dtype == torch.float32 and batch["mask_labels"][0].sum() == 2 * 40 * 50
    vocabulary = processor.encode_vocabulary(NAMES)
    for key in ("input_ids", "synonym_counts", "class_seen_mask"):
        assert torch.equal(batch[key], vocabulary[key])


def test_collated_batch_trains_the_model(rows):
    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny")
    model = EovSegForPanopticSegmentation(config).train()
    collator = EovSegDataCollator.from_processor(EovSegProcessor.from_config(config), NAMES, config=config)
    dataset = PanopticSegmentationDataset(rows, LargeScaleJitter(SIZE, 0.5, 1.5))
    outputs = model(**collator([dataset[0], dataset[1]]))
    assert torch.isfinite(outputs.loss) and len(outputs.loss_dict) == 3 * config.num_stages
    outputs.loss.backward()


# ----------------------------------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------------------------------


def test_missing_column_is_reported_at_construction(rows):
    with pytest.raises(DatasetFormatError, match=r"no column 'panoptic' \(panoptic_column\).*'image', 'label', 'segments_info'"):
        PanopticSegmentationDataset(rows, panoptic_column="panoptic")
    with pytest.raises(DatasetFormatError, match=r"no column 'annotation'"):
        SemanticSegmentationDataset(rows, label_column="annotation")


def test_segment_id_not_in_annotation_names_the_row(rows):
    bad = [dict(rows[0]), dict(rows[1])]
    bad[1]["segments_info"] = bad[1]["segments_info"] + [{"id": 123, "category_id": 0, "iscrowd": 0}]
    dataset = PanopticSegmentationDataset(bad)
    dataset[0]
    with pytest.raises(DatasetFormatError, match=r"row 1: segments_info lists segment id\(s\) \[123\]"):
        dataset[1]


def test_size_mismatch_names_the_row(rows):
    bad = [dict(rows[0]), dict(rows[1]), dict(rows[2])]
    bad[2]["label"] = PIL.Image.fromarray(id_to_rgb(rgb_ids(rows[2]["label"])[:, :40]))
    with pytest.raises(DatasetFormatError, match=r"row 2: the image is 64x64 but its panoptic annotation .* 64x40"):
        PanopticSegmentationDataset(bad)[2]
    semantic = SemanticSegmentationDataset([{"image": np.zeros((8, 8, 3), np.uint8), "label": np.zeros((8, 9))}])
    with pytest.raises(DatasetFormatError, match=r"row 0: the image is 8x8 but its label map"):
        semantic[0]


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------------------------------


def test_param_groups_and_schedule():
    model = EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny"))
    groups = build_param_groups(model)
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["names"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(by_name) == trainable and not any(n.startswith(("clip_backbone", "spatial_extractor")) for n in by_name)
    assert by_name["decoder.object_kernels.weight"] == (1e-4, 0.0)  # embedding
    assert by_name["void_embedding.weight"] == (1e-4, 0.0)
    assert by_name["decoder.layers.0.ffn_norm.weight"] == (1e-4, 0.0)  # LayerNorm
    assert by_name["decoder.layers.0.ffn_norm.bias"] == (1e-4, 0.0)
    assert by_name["decoder.layers.0.ffn.fc1.bias"] == (1e-4, 0.05)  # biases decay, as in the original
    assert by_name["aggregator.deform_layers.0.deform_norm.weight"] == (1e-4, 0.0)  # BatchNorm
    assert by_name["decoder.layers.0.mask_kernel_proj.weight"] == (1e-4, 0.05)

    assert scaled_lr_steps(200_000) == (163_889, 187_546)
    assert scaled_lr_steps(1000) == (819, 938)
    optimizer = build_optimizer(model)
    scheduler = build_lr_scheduler(optimizer, 1000)
    lrs = []
    for _ in range(1000):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == lrs[818] == pytest.approx(1e-4)
    assert lrs[819] == lrs[937] == pytest.approx(1e-5) and lrs[938] == lrs[999] == pytest.approx(1e-6)
    assert multistep_lr_factor(0, (100,), warmup_factor=0.001, warmup_iters=10) == pytest.approx(0.001)
    assert multistep_lr_factor(5, (100,), warmup_factor=0.001, warmup_iters=10) == pytest.approx(0.5005)


# ----------------------------------------------------------------------------------------------------------------------
# The training script
# ----------------------------------------------------------------------------------------------------------------------


def read_metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


COMMON = [
    "--model", "tiny", "--dataset", "synthetic", "--synthetic_image_size", str(SIZE), "--per_device_batch_size", "2",
    "--logging_steps", "1", "--no_progress",
]


def test_loss_decreases(tmp_path):
    out = tmp_path / "run"
    train_main(COMMON + ["--synthetic_train_images", "4", "--no_augmentation", "--max_steps", "20",
                         "--save_steps", "0", "--output_dir", str(out)])
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    model = EovSegForPanopticSegmentation.from_pretrained(out)  # final save_pretrained
    processor = EovSegProcessor.from_pretrained(out)
    assert model.config.train_vocabulary == NAMES and processor.train_vocabulary == NAMES
    # the training classes are the saved model's default vocabulary, with their text embeddings stored
    assert model.config.vocabulary == NAMES and model.config.is_thing == [True, True, True, False, False]
    expected = model.get_text_embeddings(processor.encode_vocabulary(NAMES)["input_ids"])
    assert torch.allclose(model.default_text_embeddings, expected, atol=1e-6)


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    # torchvision's deformable convolution has no bfloat16 CPU kernel: the neck runs it in float32 under autocast
    # (in a process of its own: Accelerate keeps one precision per process)
    out = tmp_path / "bf16"
    args = COMMON + ["--synthetic_train_images", "2", "--no_augmentation", "--max_steps", "2", "--save_steps", "0",
                     "--mixed_precision", "bf16", "--output_dir", str(out)]
    run = subprocess.run([sys.executable, "-m", "eovseg.training.train", *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_resume_reproduces_the_next_steps_exactly(tmp_path):
    # 2 accumulation steps of batches of 2 over 6 images: checkpoint at step 2 is mid-epoch (batch 4 of 3 per epoch).
    args = COMMON + ["--synthetic_train_images", "6", "--image_size", str(SIZE), "--min_scale", "0.5",
                     "--max_scale", "1.5", "--gradient_accumulation_steps", "2", "--max_steps", "4", "--save_steps", "2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_main(args + ["--output_dir", str(full)])
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    train_main(args + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    reference = {r["step"]: r for r in read_metrics(full) if "loss" in r}
    again = {r["step"]: r for r in read_metrics(resumed) if "loss" in r}
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        assert again[step]["loss"] == reference[step]["loss"]  # bit for bit
        assert again[step]["lr"] == reference[step]["lr"]
    a = EovSegForPanopticSegmentation.from_pretrained(full).state_dict()
    b = EovSegForPanopticSegmentation.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_transformers_trainer_fine_tunes_and_saves(tmp_path, rows):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny")
    model = EovSegForPanopticSegmentation(config)
    processor = EovSegProcessor.from_config(config)
    dataset = PanopticSegmentationDataset(rows, LargeScaleJitter(SIZE, 0.5, 1.5))
    collator = EovSegDataCollator.from_processor(processor, NAMES, config=config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # The plain Trainer with plain arguments ...
    args = TrainingArguments(
        output_dir=str(tmp_path / "plain"), max_steps=3, per_device_train_batch_size=2, save_steps=3,
        logging_steps=1, report_to=[], use_cpu=True, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    # the Trainer divides the loss by the accumulation steps itself (the loss is not normalised by its item count)
    assert trainer.model_accepts_loss_kwargs is False
    result = trainer.train()
    assert result.global_step == 3 and np.isfinite(result.training_loss)
    assert os.path.exists(tmp_path / "plain" / "checkpoint-3" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert any(k.startswith("decoder.") for k in changed)
    assert not any(k.startswith(("clip_backbone", "spatial_extractor")) for k in changed)  # frozen towers
    reloaded = EovSegForPanopticSegmentation.from_pretrained(tmp_path / "plain" / "checkpoint-3")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    # ... and with the original's optimizer and schedule.
    args = training_arguments(str(tmp_path / "orig"), max_steps=2, per_device_train_batch_size=2, use_cpu=True,
                              save_strategy="no")
    optimizer = build_optimizer(model)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      optimizers=(optimizer, build_lr_scheduler(optimizer, 2)))
    assert trainer.train().global_step == 2
    trainer.save_model(str(tmp_path / "final"))
    assert EovSegForPanopticSegmentation.from_pretrained(tmp_path / "final") is not None


@pytest.mark.parametrize(
    "value, message",
    [
        ({"id": [1, 2], "category_id": [3]}, "different lengths"),
        ("1,2", r"segments_info\[0\] must be a dict"),
        ([{"id": 1}], "'id' and 'category_id'"),
    ],
)
def test_malformed_segments_info_names_the_row(value, message):
    from eovseg.training.data import normalize_segments_info

    with pytest.raises(DatasetFormatError, match=f"row 3: .*{message}"):
        normalize_segments_info(value, "row 3")
    assert normalize_segments_info({"id": [1], "category_id": [2]}, "row 3") == [{"id": 1, "category_id": 2}]


def test_two_cpu_processes_share_the_data_and_resume_exactly(tmp_path):
    # torchrun on a machine without GPU: one distributed run over gloo (not two runs side by side), whose data is
    # split between the processes, with one log record per step, and which resumes bit for bit.
    args = COMMON + ["--synthetic_train_images", "8", "--no_augmentation", "--max_steps", "4", "--save_steps", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}

    def torchrun(output_dir, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "eovseg.training.train", *args, "--output_dir", str(output_dir), *extra]
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        return [r for r in read_metrics(output_dir) if "loss" in r]

    full = torchrun(tmp_path / "full")
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert [r["epoch"] for r in full] == [0.5, 1.0, 1.5, 2.0]  # 8 images, 2 per process and step: 2 steps an epoch
    assert all(np.isfinite(r["loss"]) for r in full)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = torchrun(resumed_dir, "--resume_from_checkpoint", "latest")
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in full[2:]]


def test_push_to_hub_uploads_the_saved_folder_with_remote_code(tmp_path, monkeypatch):
    # The Hub is never reached: HfApi is replaced by a recorder that snapshots the folder it is asked to upload.
    import huggingface_hub

    calls = []

    class RecordingApi:
        def whoami(self):  # the login is checked before training
            return {"name": "someone"}

        def create_repo(self, repo_id, exist_ok=False):
            calls.append(("create_repo", repo_id, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns=None):
            # the files the real upload would send
            paths = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
            files = sorted(huggingface_hub.utils.filter_repo_objects(paths, ignore_patterns=ignore_patterns))
            calls.append(("upload_folder", repo_id, files))
            return f"https://hub.example/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)  # the tests' HF_HUB_OFFLINE=1
    out = tmp_path / "run"
    train_main(COMMON + ["--synthetic_train_images", "2", "--no_augmentation", "--max_steps", "2", "--save_steps", "1",
                         "--output_dir", str(out), "--push_to_hub", "someone/eovseg-synthetic"])
    assert (out / "checkpoint-1").is_dir()
    assert calls[0] == ("create_repo", "someone/eovseg-synthetic", True)
    kind, repo, files = calls[1]
    assert (kind, repo) == ("upload_folder", "someone/eovseg-synthetic")
    for name in ("config.json", "model.safetensors", "processor_config.json", "preprocessor_config.json",
                 "tokenizer.json", "modeling_eovseg.py", "configuration_eovseg.py", "processing_eovseg.py"):
        assert name in files, name
    assert not any(name.startswith("checkpoint-") for name in files)  # resume states stay local
    with open(out / "config.json") as f:
        assert json.load(f)["auto_map"]["AutoModel"] == "modeling_eovseg.EovSegForPanopticSegmentation"


# ----------------------------------------------------------------------------------------------------------------------
# Failures: the folder as it was found, one line, the trained model never lost (issue 20)
# ----------------------------------------------------------------------------------------------------------------------

TINY = COMMON + ["--synthetic_train_images", "2", "--no_augmentation"]


def train_status(args, capsys):
    """`eovseg train ARGS` in this process: its exit status and its stderr lines (progress bars left out)."""
    code = train_main([str(a) for a in args])
    return code, [line for line in capsys.readouterr().err.strip().splitlines() if line.strip() and "%|" not in line]


def folder_state(path):
    """Every file under `path` with its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def fake_checkpoint(folder, step):
    """A checkpoint folder of another run, as this script recognises them."""
    path = Path(folder) / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "training_state.json").write_text(json.dumps({"global_step": step, "micro_step": step}))
    (path / "model.safetensors").write_bytes(b"another run's weights")
    return path


def saved_dataset(path, rows=None, categories=True):
    rows = rows if rows is not None else make_synthetic_panoptic_dataset(2, SIZE, SIZE, seed=3)
    if not categories:
        rows.info.description = ""
    rows.save_to_disk(str(path))
    return str(path)


def test_diverging_run_stops_naming_the_step_and_keeps_its_checkpoint(tmp_path):
    # Before: a segmentation fault (exit 139, no message) in torchvision's CPU deform_conv2d at step 2.
    out = tmp_path / "run"
    args = TINY + ["--learning_rate", "1e30", "--max_steps", "4", "--save_steps", "1", "--output_dir", str(out)]
    run = subprocess.run([sys.executable, "-m", "eovseg.training.train", *args], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in run.stderr.strip().splitlines() if "%|" not in line]
    assert run.returncode == 1, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and len(lines) == 1, lines
    assert lines[0].startswith("eovseg train: error: step 2: ") and "the training diverged" in lines[0]
    assert f"the last checkpoint, {out / 'checkpoint-1'}, is kept" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "metrics.jsonl"]  # no model saved
    assert [r["step"] for r in read_metrics(out)] == [1]


def test_an_overflowing_optimizer_step_stops_the_run(tmp_path):
    # torch's Adam divides the rate by 1 - beta1 at the first step: 3e38 overflows float32 there. Before the fix:
    # a RuntimeError traceback from inside torch.optim.
    out = tmp_path / "run"
    args = TINY + ["--learning_rate", "3e38", "--max_steps", "1", "--output_dir", str(out)]
    run = subprocess.run([sys.executable, "-m", "eovseg.training.train", *args], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in run.stderr.strip().splitlines() if "%|" not in line]
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert lines[-1].startswith("eovseg train: error: step 1: the optimizer step overflowed")
    assert not (out / "model.safetensors").exists()


def test_a_weight_made_infinite_by_the_last_step_is_never_saved(tmp_path, capsys, monkeypatch):
    # Finite loss and gradients, but a step that leaves a weight infinite (made so here): before the fix the model
    # was saved with it, exit 0.
    step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    code, err = train_status(TINY + ["--max_steps", "1", "--save_steps", "0", "--output_dir", tmp_path / "run"], capsys)
    assert code == 1 and err[-1].startswith("eovseg train: error: step 1: a weight is not finite after the optimizer step")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_non_finite_loss_stops_the_run(tmp_path, capsys, monkeypatch):
    # A loss that turns NaN (here: made so) stops the run before its backward pass, naming the step.
    from eovseg.training.train import _TrainingRun

    original = _TrainingRun.forward_backward
    calls = []

    def nan_at_step_2(self, batch, accumulation):
        calls.append(self.global_step)
        if self.global_step == 1:
            forward = self.model.forward

            def nan_loss(**kwargs):
                outputs = forward(**kwargs)
                outputs.loss = outputs.loss * float("nan")
                return outputs

            monkeypatch.setattr(self.model, "forward", nan_loss)
        return original(self, batch, accumulation)

    monkeypatch.setattr(_TrainingRun, "forward_backward", nan_at_step_2)
    code, err = train_status(TINY + ["--max_steps", "3", "--save_steps", "0", "--output_dir", tmp_path / "run"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("eovseg train: error: step 2: the loss is not finite (nan)")
    assert "no checkpoint was saved before it" in err[0]
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_resume_needs_a_checkpoint_and_never_touches_the_users_metrics(tmp_path, capsys):
    # Before: "starting afresh", and the user's metrics.jsonl truncated.
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 7, "loss": 1.5}\n')
    (out / "notes.txt").write_text("mine\n")
    before = folder_state(out)
    code, err = train_status(TINY + ["--max_steps", "2", "--output_dir", out, "--resume_from_checkpoint", "latest"],
                             capsys)
    assert code == 1 and err == [f"eovseg train: error: --resume_from_checkpoint latest: {out} holds no checkpoint "
                                 "(checkpoint-STEP); nothing to resume. Start a new run in another --output_dir."]
    assert folder_state(out) == before


def test_a_finished_run_is_never_trained_over(tmp_path, capsys):
    # Before: `latest` on a run saved with --save_steps 0 retrained over its model; a run with checkpoints retrained
    # the steps after its last one. A finished run's folder is refused; continuing past its end is not.
    done = tmp_path / "done"
    assert train_main(TINY + ["--max_steps", "1", "--save_steps", "0", "--output_dir", str(done)]) == 0
    before = folder_state(done)
    code, err = train_status(TINY + ["--max_steps", "1", "--output_dir", done, "--resume_from_checkpoint", "latest"],
                             capsys)
    assert code == 1 and len(err) == 1 and "(the run there finished at step 1 and kept none)" in err[0]
    assert folder_state(done) == before
    # the same run with a checkpoint older than its end (as --save_steps 3 and --max_steps 5 leave it)
    fake = fake_checkpoint(done, 0)
    before = folder_state(done)
    code, err = train_status(TINY + ["--max_steps", "1", "--output_dir", done, "--resume_from_checkpoint", "latest"],
                             capsys)
    assert code == 1 and len(err) == 1 and f"finished at step 1 and saved its model; resuming from {fake}" in err[0]
    assert folder_state(done) == before


def test_a_new_run_never_shares_a_folder_with_another_runs_checkpoints(tmp_path, capsys):
    # Before: --overwrite_output_dir --save_total_limit 1 deleted the new run's checkpoint-1 and kept the old run's
    # checkpoint-3, which `latest` then resumed.
    out = tmp_path / "old-run"
    fake_checkpoint(out, 3)
    (out / "metrics.jsonl").write_text('{"step": 3}\n')
    before = folder_state(out)
    code, err = train_status(TINY + ["--max_steps", "2", "--save_steps", "1", "--save_total_limit", "1",
                                     "--overwrite_output_dir", "--output_dir", out], capsys)
    assert code == 1 and len(err) == 1 and "holds another run's checkpoints (checkpoint-3)" in err[0]
    assert folder_state(out) == before
    # resuming a checkpoint of another folder into it is the same mix-up
    other = fake_checkpoint(tmp_path / "elsewhere", 1)
    code, err = train_status(TINY + ["--max_steps", "2", "--output_dir", out, "--resume_from_checkpoint", other], capsys)
    assert code == 1 and len(err) == 1 and "holds another run's checkpoints (checkpoint-3)" in err[0]
    assert folder_state(out) == before


def test_corrupt_state_file_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    state = fake_checkpoint(out, 2) / "training_state.json"
    state.write_text('{"global_step": ')
    code, err = train_status(TINY + ["--max_steps", "4", "--output_dir", out, "--resume_from_checkpoint", "latest"],
                             capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"eovseg train: error: {state} is not a state file")
    # a readable state file beside damaged Accelerate files: the checkpoint is named, no traceback
    state.write_text(json.dumps({"global_step": 2, "micro_step": 2}))
    code, err = train_status(TINY + ["--max_steps", "4", "--output_dir", out, "--resume_from_checkpoint", "latest"],
                             capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"eovseg train: error: cannot load the checkpoint {out / 'checkpoint-2'}: ")


def test_data_set_without_categories_is_refused_by_train_and_evaluate(tmp_path, capsys):
    # Before: training went on under the preset's placeholder names (person, car, ...) and their thing flags;
    # evaluation warned. One rule for both: give the classes.
    from eovseg.evaluation.evaluate import main as evaluate_main

    data = saved_dataset(tmp_path / "data", categories=False)
    out = tmp_path / "run"
    code, err = train_status(TINY[:4] + ["--dataset", data, "--max_steps", "1", "--output_dir", out], capsys)
    assert code == 1 and err == [
        "eovseg train: error: The data set stores no categories: give its classes with --categories NAME|FILE (a "
        "built-in vocabulary such as coco_panoptic, or a JSON file of [{id, name, isthing}] whose ids are the data "
        "set's category_id)."
    ]
    assert not out.exists()
    assert evaluate_main(["--model", "random:tiny", "--dataset", data, "--no_progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["eovseg evaluate: error: The data set stores no categories: give its classes with --vocabulary "
                   "NAME|FILE (a built-in vocabulary such as coco_panoptic, or a JSON file of [{id, name, isthing}] "
                   "whose ids are the data set's category_id)."]
    # with the classes given, both run
    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps(synthetic_categories()))
    assert train_main(TINY[:4] + ["--dataset", data, "--categories", str(categories), "--no_augmentation",
                                  "--per_device_batch_size", "2", "--max_steps", "1", "--save_steps", "0",
                                  "--no_progress", "--output_dir", str(out)]) == 0


@pytest.mark.parametrize("broken", ["no_segments_info", "unknown_category"])
def test_broken_eval_dataset_is_found_before_the_first_step(broken, tmp_path, capsys):
    # Before: found after training, and the trained model was never saved.
    rows = make_synthetic_panoptic_dataset(2, SIZE, SIZE, seed=5)
    if broken == "no_segments_info":
        rows = rows.remove_columns("segments_info")
        message = "no segments_info column"
    else:
        def shift(row):
            row["segments_info"][0]["category_id"] = 99
            return row

        rows = rows.map(shift)
        message = "--eval_dataset row 0: category_id 99 is not one of the run's 5 classes"
    data = saved_dataset(tmp_path / "eval", rows)
    out = tmp_path / "run"
    code, err = train_status(TINY + ["--eval_dataset", data, "--max_steps", "1", "--output_dir", out], capsys)
    assert code == 1 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_model_is_saved_before_the_final_evaluation(tmp_path, capsys, monkeypatch):
    import eovseg.training.train as train_module

    def failing_evaluation(*args, **kwargs):
        raise ValueError("the evaluation failed")

    monkeypatch.setattr(train_module, "run_evaluation", failing_evaluation)
    out = tmp_path / "run"
    code, err = train_status(TINY + ["--eval_dataset", "synthetic", "--synthetic_eval_images", "1", "--max_steps", "1",
                                     "--save_steps", "0", "--output_dir", out], capsys)
    assert code == 1 and err == ["eovseg train: error: the evaluation failed"]
    assert EovSegForPanopticSegmentation.from_pretrained(out).config.vocabulary == NAMES  # the trained model is kept


def test_full_disk_at_the_final_save_replaces_nothing_and_says_so(tmp_path, capsys, monkeypatch):
    import errno

    import eovseg.auto_registration as registration

    def disk_full(model, processor, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("an older model's config\n")
    (out / "training_finished.json").write_text('{"global_step": 5}')  # the older run's end mark: no longer true
    monkeypatch.setattr(registration, "save_model_folder", disk_full)
    code, err = train_status(TINY + ["--max_steps", "1", "--save_steps", "1", "--output_dir", out,
                                     "--overwrite_output_dir"], capsys)
    assert code == 1 and err == [
        f"eovseg train: error: could not save the trained model in {out} ([Errno 28] No space left on device); "
        f"nothing there was replaced; resume from {out / 'checkpoint-1'} once there is room"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "config.json", "metrics.jsonl"]
    assert (out / "config.json").read_text() == "an older model's config\n"
    # with room again, the run resumes from its checkpoint (the older run's end mark no longer stands in the way)
    monkeypatch.undo()
    assert train_main(TINY + ["--max_steps", "2", "--save_steps", "1", "--output_dir", str(out),
                              "--resume_from_checkpoint", "latest"]) == 0
    assert json.loads((out / "training_finished.json").read_text())["global_step"] == 2


def test_push_to_hub_offline_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = train_status(TINY + ["--max_steps", "1", "--output_dir", out, "--push_to_hub", "someone/model"], capsys)
    assert code == 1 and err == ["eovseg train: error: --push_to_hub someone/model: offline mode (HF_HUB_OFFLINE=1) "
                                 "forbids the upload; unset it or drop --push_to_hub."]
    assert not out.exists()

"""The argument parsers of `eovseg train`, `eovseg evaluate` and `eovseg convert`, and the defaults they share.

They live here, apart from the commands, because those modules import torch and transformers when they are imported,
and `eovseg COMMAND --help` (and a usage error) must answer at once: this module imports only argparse and
`eovseg.command_line`. The parsers of `demo`, `predict` and `app` are in their modules, which are as light.
"""

from __future__ import annotations

import argparse

from .command_line import (
    add_progress_option,
    command_parser,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)

__all__ = [
    "DEFAULT_TRAIN_VOCABULARY",
    "DEFAULT_VOCABULARY",
    "EVALUATION_TASKS",
    "PRESET_NAMES",
    "SYNTHETIC_EVAL_IMAGES",
    "SYNTHETIC_EVAL_SEED",
    "SYNTHETIC_IMAGE_SIZE",
    "convert_parser",
    "evaluate_parser",
    "train_parser",
]

# `EovSegConfig.from_variant`'s names (`eovseg.configuration_eovseg.PRESETS`, which imports transformers; a test
# holds the two equal).
PRESET_NAMES = ("r50", "r50x4", "convnext_l", "tiny", "tiny_convnext")

# The synthetic held-out set: what `eovseg train --eval_dataset synthetic` evaluates the model on at the end and what
# `eovseg evaluate --dataset synthetic` evaluates by default, so both print one figure for one model. Its own seed,
# not the training's: the training images are drawn from `--seed` (42 by default), these from this one.
SYNTHETIC_EVAL_IMAGES = 16
SYNTHETIC_EVAL_SEED = 1_000_003
SYNTHETIC_IMAGE_SIZE = 64

EVALUATION_TASKS = ("panoptic", "semantic", "instance")

# Every released checkpoint was trained on COCO panoptic: the training vocabulary decides which test classes are
# "seen" (ensemble weight alpha rather than beta), so it must be this one for the original's outputs.
DEFAULT_TRAIN_VOCABULARY = "coco_panoptic"
# The vocabulary stored (with its embeddings) as the converted model's default.
DEFAULT_VOCABULARY = "coco_panoptic"


def add_column_options(group) -> None:
    """The columns of a `datasets` data set with COCO-panoptic annotations (train's and evaluate's)."""
    group.add_argument("--image_column", default="image", help="the data set's image column")
    group.add_argument("--panoptic_column", default="label",
                       help="the panoptic annotation column (RGB-encoded PNG, id = R + 256 G + 256^2 B)")
    group.add_argument("--segments_info_column", default="segments_info",
                       help="the column of each image's segments (id, category_id, iscrowd)")


def add_test_resize_options(group, prefix: str = "", note: str = "") -> None:
    """`--{prefix}shortest_edge` and `--{prefix}longest_edge`: the resize of images at inference (train saves it with
    the processor, evaluate uses it for the run), with the processor's defaults."""
    group.add_argument(f"--{prefix}shortest_edge", type=positive_int, default=None,
                       help=f"inference resize: the shorter side in pixels{note} (default: the processor's, 640)")
    group.add_argument(f"--{prefix}longest_edge", type=positive_int, default=None,
                       help="inference resize: the most pixels of the longer side (default: the processor's, 2560)")


# ----------------------------------------------------------------------------------------------------------------------
# eovseg train
# ----------------------------------------------------------------------------------------------------------------------

TRAIN_DESCRIPTION = """\
Train (or fine-tune) EOV-Seg with Accelerate, with the original's recipe as the defaults.

    eovseg train --model tiny --dataset synthetic --eval_dataset synthetic --max_steps 200 --output_dir out
    eovseg train --model eovseg-r50 --dataset coco_train/ --eval_dataset coco_val/ --output_dir out
    accelerate launch -m eovseg.training.train --model r50 ...     # several GPUs (or torchrun ... -m ...)

Writes to --output_dir: the model and processor (save_pretrained, with the training classes as the model's default
vocabulary and a model card), metrics.jsonl (one line per logging step and evaluation), checkpoint-STEP folders
every --save_steps. With --eval_dataset it prints the panoptic quality at the end; for --eval_dataset synthetic it is
the figure `eovseg evaluate --model OUT --dataset synthetic` prints with its defaults (the same held-out images; a run
with --categories FILE: give evaluate the same file, --vocabulary FILE, as the classes are named by it)."""


def train_parser() -> argparse.ArgumentParser:
    p = command_parser("train", TRAIN_DESCRIPTION)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, metavar="DIR|PRESET",
                   help=f"a save_pretrained folder, or a preset built with random decoder weights: {', '.join(PRESET_NAMES)}")
    g.add_argument("--config_overrides", default=None, metavar="JSON",
                   help='EovSegConfig fields to change, as a JSON object, e.g. \'{"num_proposals": 20}\'')
    g.add_argument("--dataset", required=True, metavar="PATH|synthetic",
                   help="the training data: a local save_to_disk folder, data files or a folder datasets.load_dataset "
                        "reads (never downloaded), or 'synthetic' (shapes over sky and ground)")
    g.add_argument("--dataset_split", default=None, help="split of a DatasetDict (default: train, else its only split)")
    g.add_argument("--dataset_type", choices=["panoptic", "semantic"], default="panoptic",
                   help="the rows' annotations: COCO-panoptic (--panoptic_column, --segments_info_column) or semantic "
                        "label maps (--label_column)")
    g.add_argument("--eval_dataset", default=None, metavar="PATH|synthetic",
                   help="panoptic data to evaluate on at the end (and every --eval_steps): a local path, or 'synthetic' "
                        "(the held-out synthetic set; default: no evaluation)")
    g.add_argument("--eval_split", default=None, help="split of a DatasetDict (default: validation, val or test)")
    g.add_argument("--categories", default=None, metavar="NAME|FILE",
                   help="the training classes: a built-in vocabulary name (coco_panoptic, ...) or a JSON file, "
                        "[{id, name, isthing}] or a COCO panoptic JSON (default: the categories stored with the data set)")
    add_column_options(g)
    g.add_argument("--label_column", default="label", help="semantic label maps (--dataset_type semantic)")
    g.add_argument("--ignore_index", type=int, default=255, help="unlabeled value of semantic label maps")
    g.add_argument("--synthetic_train_images", type=positive_int, default=64,
                   help="images of --dataset synthetic")
    g.add_argument("--synthetic_eval_images", type=positive_int, default=SYNTHETIC_EVAL_IMAGES,
                   help="images of --eval_dataset synthetic (the held-out set; as eovseg evaluate's --num_synthetic)")
    g.add_argument("--synthetic_image_size", type=positive_int, default=SYNTHETIC_IMAGE_SIZE,
                   help="side in pixels of the synthetic images, training and held-out")
    g.add_argument("--image_label_dataset", default=None, metavar="PATH|synthetic",
                   help="Decoupled Supervision (config decoupled_supervision): image-level data, a local path or "
                        "'synthetic' (images with a list of label names or ids)")
    g.add_argument("--image_label_column", default="labels", help="the image-level data's column of labels")
    g.add_argument("--image_label_names", nargs="*", default=None,
                   help="the image-level vocabulary (default: the column's ClassLabel names, else its label names)")
    g.add_argument("--image_label_ratio", type=probability, default=0.5, help="fraction of image-level examples")

    g = p.add_argument_group("augmentation")
    g.add_argument("--image_size", type=positive_int, default=1024, help="large-scale-jitter crop size (pixels)")
    g.add_argument("--min_scale", type=positive_float, default=0.1, help="smallest random rescaling of an image")
    g.add_argument("--max_scale", type=positive_float, default=2.0, help="largest random rescaling of an image")
    g.add_argument("--flip_probability", type=probability, default=0.5, help="probability of a horizontal flip")
    g.add_argument("--no_augmentation", action="store_true", help="train on the images as they are")
    add_test_resize_options(g, "test_", " (saved with the processor; --test_longest_edge needs --test_shortest_edge)")

    g = p.add_argument_group("optimization")
    g.add_argument("--max_steps", type=positive_int, default=200_000, help="optimizer steps")
    g.add_argument("--per_device_batch_size", type=positive_int, default=2,
                   help="images per step and process (the original: 16 images over 8 GPUs)")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                   help="batches whose gradients are summed per optimizer step")
    g.add_argument("--learning_rate", type=positive_float, default=1e-4, help="AdamW's learning rate")
    g.add_argument("--weight_decay", type=non_negative_float, default=0.05, help="AdamW's weight decay")
    g.add_argument("--weight_decay_norm", type=non_negative_float, default=0.0,
                   help="weight decay of the normalization layers")
    g.add_argument("--weight_decay_embed", type=non_negative_float, default=0.0, help="weight decay of the embeddings")
    g.add_argument("--backbone_multiplier", type=non_negative_float, default=0.1,
                   help="the backbone's learning rate as a fraction of --learning_rate")
    g.add_argument("--max_grad_norm", type=non_negative_float, default=0.01,
                   help="clip the whole model's gradient norm to this (0 disables clipping)")
    g.add_argument("--lr_steps", type=positive_int, nargs="*", default=None,
                   help="steps where the learning rate is multiplied by --lr_gamma (default: the original's 163889 and "
                        "187546, scaled by --max_steps / 200000)")
    g.add_argument("--lr_gamma", type=positive_float, default=0.1, help="learning-rate factor at each of --lr_steps")
    g.add_argument("--warmup_factor", type=non_negative_float, default=1.0,
                   help="learning-rate factor at step 0, rising linearly to 1 over --warmup_iters")
    g.add_argument("--warmup_iters", type=non_negative_int, default=10, help="warmup steps")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                   help="Accelerate's mixed precision")
    g.add_argument("--cpu", action="store_true", help="run on the CPU (several CPU processes under torchrun: gloo)")
    g.add_argument("--seed", type=non_negative_int, default=42,
                   help="seed of the initialization, the data order, the augmentation and the synthetic training images")
    g.add_argument("--num_workers", type=non_negative_int, default=0, help="data-loader worker processes")
    g.add_argument("--max_train_seconds", type=positive_float, default=None,
                   help="stop after this wall time, saving the model as at the end (default: no limit)")

    g = p.add_argument_group("logging, checkpoints, evaluation")
    g.add_argument("--output_dir", required=True, metavar="DIR",
                   help="where the model, processor, metrics.jsonl and checkpoint-STEP folders go; must be empty or "
                        "new unless --overwrite_output_dir or --resume_from_checkpoint")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="train into a non-empty --output_dir: replace the run's own files there (the model, processor "
                        "and a fresh metrics.jsonl) and leave every other file alone")
    g.add_argument("--logging_steps", type=positive_int, default=20, help="steps between lines of metrics.jsonl")
    g.add_argument("--save_steps", type=non_negative_int, default=5000,
                   help="steps between checkpoints (0: no intermediate checkpoints)")
    g.add_argument("--save_total_limit", type=positive_int, default=None,
                   help="keep only this many newest checkpoints (default: all)")
    g.add_argument("--resume_from_checkpoint", default=None, metavar="DIR|latest",
                   help="continue a run from a checkpoint folder, or from --output_dir's newest ('latest')")
    g.add_argument("--eval_steps", type=non_negative_int, default=0,
                   help="steps between evaluations (0: evaluate only at the end, with --eval_dataset)")
    g.add_argument("--eval_batch_size", type=positive_int, default=1, help="images per evaluation forward pass")
    g.add_argument("--eval_max_samples", type=positive_int, default=None, metavar="N",
                   help="evaluate on the first N images only (default: all)")
    add_progress_option(g)
    g.add_argument("--push_to_hub", default=None, metavar="REPO_ID",
                   help="upload the final model and processor to this Hub repository (the login is checked first)")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# eovseg evaluate
# ----------------------------------------------------------------------------------------------------------------------

EVALUATE_DESCRIPTION = """\
Evaluate an EOV-Seg model: panoptic PQ, semantic mIoU & co., instance mask AP (scores in percent).

    eovseg evaluate --model out --dataset synthetic                  # the held-out set eovseg train evaluates on
    eovseg evaluate --model eovseg-r50 --dataset panoptic_val2017.json --vocabulary coco_panoptic
    eovseg evaluate --model eovseg-r50 --dataset ADE/images/validation --label_root ADE/annotations/validation \\
        --vocabulary ade20k_150 --task semantic
    torchrun --nproc_per_node N -m eovseg.evaluation.evaluate ...   # the data split between processes

Prints the tables; with --output, writes them as JSON. Several processes report exactly the numbers of one."""


def evaluate_parser() -> argparse.ArgumentParser:
    p = command_parser("evaluate", EVALUATE_DESCRIPTION)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, metavar="DIR|random:PRESET",
                   help="a save_pretrained folder, or random:<preset> (random weights, for tests)")
    g.add_argument("--dataset", required=True, metavar="PATH|synthetic",
                   help="a COCO-panoptic JSON (its PNG folder beside it), an image folder with --label_root, a "
                        "save_to_disk folder or data files, or 'synthetic' (the held-out synthetic set)")
    g.add_argument("--split", default=None, help="split of a DatasetDict (default: validation, val or test)")
    g.add_argument("--panoptic_root", default=None, metavar="DIR",
                   help="COCO-panoptic PNG folder (default: the JSON's path without .json)")
    g.add_argument("--image_root", default=None, metavar="DIR", help="COCO-panoptic image folder (default: found next to the JSON)")
    g.add_argument("--label_root", default=None, metavar="DIR", help="semantic label-map folder paired with the --dataset image folder")
    g.add_argument("--split_file", default=None, metavar="FILE", help="semantic: list of file stems to evaluate (VOC's val.txt)")
    g.add_argument("--label_values", choices=["index", "category_id"], default=None,
                   help="semantic label maps hold vocabulary indices (default for --label_root) or category ids")
    g.add_argument("--reduce_labels", action="store_true", help="semantic: label 0 is ignored, others lowered by one")
    g.add_argument("--ignore_index", type=non_negative_int, default=255,
                   help="semantic: ignored label (65535 in 16-bit maps)")
    g.add_argument("--vocabulary", "--categories", dest="vocabulary", default=None, metavar="NAME|FILE",
                   help="built-in vocabulary name (ade20k_150, ...) or JSON file of categories [{id, name, isthing}] "
                        "(or a COCO panoptic JSON); default: the data set's stored categories (a data set that "
                        "stores none is refused)")
    g.add_argument("--num_synthetic", type=positive_int, default=SYNTHETIC_EVAL_IMAGES,
                   help="images of --dataset synthetic (as eovseg train's --synthetic_eval_images)")
    g.add_argument("--synthetic_image_size", type=positive_int, default=SYNTHETIC_IMAGE_SIZE,
                   help="side in pixels of the synthetic images (as eovseg train's)")
    add_column_options(g)
    g.add_argument("--semantic_column", default=None,
                   help="class maps for semantic evaluation (category ids; default: from the panoptic annotation)")

    g = p.add_argument_group("what is measured, and how")
    g.add_argument("--task", default="panoptic", choices=[*EVALUATION_TASKS, "all"], help="the metrics to compute")
    g.add_argument("--max_samples", type=positive_int, default=None, metavar="N",
                   help="evaluate on the first N images only (default: all)")
    g.add_argument("--ignore_category_ids", type=int, nargs="*", default=[],
                   help="category ids left out of the scores (default: none)")
    g.add_argument("--pq_conventions", choices=["panopticapi", "clean"], default="panopticapi",
                   help="panopticapi: the COCO panoptic API's pq_compute, quirks included (what papers report); clean: the "
                        "same without them (every crowd region counts, unlisted ids are void; see "
                        "eovseg.evaluation.PanopticQuality)")
    g.add_argument("--miou_convention", choices=["detectron2", "mmseg"], default="detectron2",
                   help="whose semantic-segmentation rules (detectron2: the original's)")
    g.add_argument("--threshold", type=probability, default=None,
                   help="panoptic: least class probability of a segment (default: the model config's "
                        "object_mask_threshold)")
    g.add_argument("--overlap_threshold", type=probability, default=None,
                   help="panoptic: least fraction of a mask's area that must stay visible once the segments before it "
                        "are drawn (else it is dropped; default: the model config's overlap_threshold)")
    add_test_resize_options(g)

    g = p.add_argument_group("running and output")
    g.add_argument("--batch_size", type=positive_int, default=1, help="images per forward pass")
    g.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: the model's, the CPU)")
    g.add_argument("--output", default=None, metavar="FILE", help="write the results here as JSON (a new file)")
    g.add_argument("--overwrite", action="store_true", help="allow --output to replace an existing file")
    g.add_argument("--per_class", action="store_true", help="also print per-class tables")
    add_progress_option(g)
    return p


# ----------------------------------------------------------------------------------------------------------------------
# eovseg convert
# ----------------------------------------------------------------------------------------------------------------------

CONVERT_DESCRIPTION = f"""\
Convert an original EOV-Seg checkpoint (detectron2 model_final.pth) into a Transformers model folder.

    eovseg convert --checkpoint_path model_final.pth --variant r50 --output_dir eovseg-r50
    eovseg convert ... --vocabulary ade20k_150 --push_to_hub user/eovseg-r50

The folder gets config.json, model.safetensors (with the default vocabulary's text embeddings, so inference needs no
class list and no text pass), the processor and tokenizer files, a model card and the code files for
trust_remote_code. Nothing is written to --output_dir unless the whole conversion succeeds. The training
vocabulary, which decides the seen / unseen ensemble weights, is {DEFAULT_TRAIN_VOCABULARY} for every released
checkpoint."""


def convert_parser() -> argparse.ArgumentParser:
    p = command_parser("convert", CONVERT_DESCRIPTION)
    p.add_argument("--checkpoint_path", required=True, metavar="FILE",
                   help="the authors' checkpoint (detectron2's model_final.pth)")
    p.add_argument("--variant", required=True, choices=PRESET_NAMES, help="the checkpoint's model variant")
    p.add_argument("--output_dir", required=True, metavar="DIR",
                   help="the model folder to write (new, or with --overwrite)")
    p.add_argument("--vocabulary", default=DEFAULT_VOCABULARY, metavar="NAME|FILE",
                   help="default vocabulary stored with its text embeddings: a built-in name (ade20k_150, ...) or a "
                        ".json ({classes, is_thing}) / .txt (one 'id:name,synonym' per line) file")
    p.add_argument("--stuff_ids", type=non_negative_int, nargs="*", default=None,
                   help="indices of the stuff classes of --vocabulary (default: the vocabulary's own thing/stuff flags)")
    p.add_argument("--train_vocabulary", default=DEFAULT_TRAIN_VOCABULARY, metavar="NAME|FILE",
                   help="the vocabulary the checkpoint was trained on, for the seen/unseen ensemble weights")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output_dir: replace the files the conversion writes (config.json, "
                        "model.safetensors, ...) and leave every other file there alone")
    p.add_argument("--push_to_hub", default=None, metavar="REPO_ID",
                   help="upload the folder to this Hub repository (the login is checked before converting)")
    add_progress_option(p)
    return p

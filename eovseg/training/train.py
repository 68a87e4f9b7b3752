"""Train (or fine-tune) EOV-Seg with Accelerate, as the original trains it.

    eovseg train --model DIR_OR_VARIANT --dataset PATH_OR_synthetic --output_dir OUT
    accelerate launch -m eovseg.training.train ...     # several processes (or torchrun ... -m ...)

What it does (defaults are the original's, `configs/Base-COCO-PanopticSegmentation.yaml` / `train_net.py`):

* the model: a directory written by `save_pretrained`, or a preset name (`tiny`, `r50`, ...) built with random
  decoder weights (`--config_overrides '{"num_proposals": 20}'` changes fields); the CLIP towers are frozen;
* the data: a local data set (`save_to_disk` folder, data files or a folder `datasets.load_dataset` reads; never
  downloaded) or `synthetic` ([`make_synthetic_panoptic_dataset`]), COCO-panoptic rows by default or semantic ones
  (`--dataset_type semantic`), augmented with large-scale jitter (crop 1024, scale 0.1-2.0, flip);
* the classes: `--categories categories.json` (`[{"id", "name", "isthing"}]`, or a COCO panoptic JSON), else the
  categories stored with the data set (the synthetic one has them); a data set with none asks for `--categories`;
* AdamW (lr 1e-4, weight decay 0.05; none for normalization layers and embeddings), the whole model's gradient norm
  clipped at 0.01, multi-step decay x0.1 at the original's steps scaled to `--max_steps`, warmup factor 1.0 over 10
  steps; mixed precision (`--mixed_precision bf16|fp16`) and gradient accumulation;
* every `--save_steps`: `OUT/checkpoint-STEP` (Accelerate state: model, optimizer, scheduler, RNG, plus the data
  position); `--resume_from_checkpoint PATH|latest` continues exactly where it stopped. One folder holds one run
  ([`check_output_dir`]): a new run refuses a folder with another run's checkpoints, a resume needs a checkpoint and
  never trains over a finished run's model;
* every argument and input (the data sets' columns and categories too) is checked before anything is written; a
  non-finite loss, gradient or deformable-convolution offset stops the run with one line naming the step;
* every `--eval_steps`: panoptic quality on `--eval_dataset` (`eovseg.evaluation.evaluate_model`);
* a tqdm bar, `OUT/metrics.jsonl` (one JSON object per logging step / evaluation), and at the end
  `save_pretrained` of the model and the processor in OUT (atomically, before the final evaluation; `--push_to_hub
  REPO_ID` to upload them, the login checked before training), with the training classes as the model's default
  vocabulary (text embeddings stored) and among its training vocabulary.

Every training step reseeds torch's generator from (seed, step, process): the random point sampling of the loss
then depends only on them, which is what makes a resumed run reproduce the uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence

import torch

from ..command_line import (
    CommandError,
    command_main,
    error_line,
    progress_bar,
    progress_switch,
)
from ..configuration_eovseg import EovSegInputError
from ..data_sources import categories_for_command, load_local_dataset, synthetic_eval_dataset
from ..parsers import SYNTHETIC_EVAL_SEED
from ..parsers import train_parser as build_parser

__all__ = ["build_parser", "main", "parse_args", "train"]

CHECKPOINT_PREFIX = "checkpoint-"


class TrainingArgumentError(CommandError):
    """A command-line argument or file the training cannot use, reported as one line by the `eovseg` command."""


class TrainingDivergedError(CommandError):
    """A non-finite loss, gradient or activation: the run stops there, its last checkpoint kept."""


# In each checkpoint: the step, the data position and the arguments. In OUT, once the run saved its final model: its step.
STATE_FILE = "training_state.json"
FINISHED_FILE = "training_finished.json"
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, with the combinations that cannot work refused as usage errors (exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.min_scale > args.max_scale:
        parser.error(f"--min_scale {args.min_scale} is above --max_scale {args.max_scale}")
    if args.image_label_dataset and not 0 < args.image_label_ratio < 1:
        parser.error(f"--image_label_ratio must be between 0 and 1 (exclusive), got {args.image_label_ratio}")
    if args.test_longest_edge is not None and args.test_shortest_edge is None:
        parser.error("--test_longest_edge needs --test_shortest_edge")
    if (args.eval_steps or args.eval_max_samples) and not args.eval_dataset:
        parser.error("--eval_steps and --eval_max_samples need --eval_dataset")
    for option, split, data in (("--dataset_split", args.dataset_split, args.dataset),
                                ("--eval_split", args.eval_split, args.eval_dataset)):
        if split is not None and data in (None, "synthetic"):
            parser.error(f"{option} chooses a split of a local data set; {data or 'no data set'} has none")
    if args.save_total_limit and not args.save_steps:
        parser.error("--save_total_limit needs --save_steps (no checkpoint is saved with --save_steps 0)")
    if args.dataset == "synthetic" and args.eval_dataset == "synthetic" and args.seed == SYNTHETIC_EVAL_SEED:
        parser.error(f"--seed {args.seed} would train on the held-out synthetic images (drawn from seed "
                     f"{SYNTHETIC_EVAL_SEED}): pick another seed")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir starts a new run; --resume_from_checkpoint continues one: pass one of them")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Model, data, categories
# ----------------------------------------------------------------------------------------------------------------------


def load_model_and_processor(spec: str, overrides: dict | None = None):
    """A model and its processor from a `save_pretrained` directory, or a fresh model of a preset."""
    from ..auto_registration import load_model_folder
    from ..configuration_eovseg import PRESETS, EovSegConfig
    from ..modeling_eovseg import EovSegForPanopticSegmentation
    from ..processing import EovSegProcessor

    overrides = dict(overrides or {})
    if os.path.isdir(spec):
        model, processor = load_model_folder(spec, EovSegConfig.from_pretrained(spec, **overrides))
        fresh = False
    elif spec in PRESETS:
        try:
            config = EovSegConfig.from_variant(spec, **overrides)
            model = EovSegForPanopticSegmentation(config)
            processor = EovSegProcessor.from_config(config)
        except (RuntimeError, ValueError, TypeError, ZeroDivisionError, IndexError, KeyError) as err:
            if not overrides:
                raise
            raise TrainingArgumentError(
                f"--config_overrides {json.dumps(overrides)}: no {spec} model can be built with these values "
                f"({error_line(err)})"
            ) from None
        fresh = True
    else:
        raise FileNotFoundError(
            f"--model {spec!r} is neither a local directory nor a preset ({', '.join(PRESETS)}); nothing is "
            "downloaded."
        )
    return model, processor, fresh


def resolve_categories(args, dataset, model) -> list[dict]:
    """The training classes `[{"id", "name", "isthing"}]`: `--categories`, else the data set's stored ones
    (`eovseg.data_sources.categories_for_command`: a data set with none asks for `--categories`)."""
    return categories_for_command(args.categories or None, dataset, model.config, "--categories")


def store_training_vocabulary(model, processor, categories: list[dict]) -> None:
    """Make the training classes the model's default vocabulary, with their text embeddings, so that the saved
    folder runs with no class list (`pipeline("image-segmentation", model=OUT)`)."""
    from ..vocabularies import build_vocabulary, set_default_vocabulary

    vocabulary = build_vocabulary([c["name"] for c in categories], is_thing=[bool(c["isthing"]) for c in categories])
    set_default_vocabulary(model, processor, vocabulary)


def parse_config_overrides(text: str | None) -> dict | None:
    """`--config_overrides`: a JSON object of EovSegConfig fields; unknown fields are refused (a typo would
    otherwise be stored in the config and change nothing)."""
    import difflib

    from ..configuration_eovseg import EovSegConfig

    if not text:
        return None
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise TrainingArgumentError(f"--config_overrides is not valid JSON ({err}): {text!r}") from None
    if not isinstance(overrides, dict):
        raise TrainingArgumentError(f"--config_overrides must be a JSON object of config fields, got {text!r}")
    known = EovSegConfig.from_variant("tiny").to_dict()
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TrainingArgumentError(f"--config_overrides: {key!r} is not an EovSegConfig field{hint}")
        default = known[key]
        # a value of another JSON type than the field's (a string for a number, ...) is a typo, never a setting
        if default is not None and value is not None and _json_kind(value) != _json_kind(default):
            raise TrainingArgumentError(
                f"--config_overrides: {key!r} must be {_json_kind(default)} like its default {default!r}, got {value!r}"
            )
    return overrides


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, (list, tuple)) else "an object"


def build_datasets(args):
    from ..synthetic import make_synthetic_panoptic_dataset

    if args.dataset == "synthetic":
        size = args.synthetic_image_size
        train_rows = make_synthetic_panoptic_dataset(args.synthetic_train_images, size, size, seed=args.seed)
    else:
        train_rows = load_local_dataset(args.dataset, args.dataset_split, ("train",), "--dataset_split")
    eval_rows = None
    if args.eval_dataset == "synthetic":
        eval_rows = synthetic_eval_dataset(args.synthetic_eval_images, args.synthetic_image_size)
    elif args.eval_dataset:
        eval_rows = load_local_dataset(args.eval_dataset, args.eval_split, ("validation", "val", "test"), "--eval_split")
    return train_rows, eval_rows


def make_train_dataset(args, rows, categories):
    from .data import LargeScaleJitter, PanopticSegmentationDataset, SemanticSegmentationDataset

    transform = None
    if not args.no_augmentation:
        transform = LargeScaleJitter(args.image_size, args.min_scale, args.max_scale, args.flip_probability)
    id_to_label = {c["id"]: i for i, c in enumerate(categories)}
    if args.dataset_type == "semantic":
        return SemanticSegmentationDataset(
            rows, transform, image_column=args.image_column, label_column=args.label_column,
            ignore_index=args.ignore_index, label_to_class=id_to_label, seed=args.seed, shuffle=True,
        )
    return PanopticSegmentationDataset(
        rows, transform, image_column=args.image_column, panoptic_column=args.panoptic_column,
        segments_info_column=args.segments_info_column, category_id_to_label=id_to_label, seed=args.seed, shuffle=True,
    )


def _column_names(rows) -> list[str] | None:
    names = getattr(rows, "column_names", None)
    if names is None and isinstance(rows, Sequence) and len(rows) and isinstance(rows[0], dict):
        names = list(rows[0])
    return list(names) if names is not None else None


def check_rows(args, rows, categories: list[dict], option: str, kind: str) -> None:
    """Check a panoptic data set before the first step, without decoding its images: its columns, and that every
    segment of its `segments_info` has an id and a category among the run's classes (a broken evaluation set would
    otherwise be found only after training). Semantic label maps are checked as they are read."""
    from ..evaluation import DatasetColumns
    from ..inputs import normalize_segments

    if kind != "panoptic":
        return
    names = _column_names(rows)
    if names is None:  # an iterable data set: read as it streams
        return
    if option == "--eval_dataset":  # the evaluation's column resolution (with its usual fallback names)
        try:
            column = DatasetColumns(
                image=args.image_column, panoptic=args.panoptic_column, segments_info=args.segments_info_column
            ).resolve(names, need_panoptic=True).segments_info
        except KeyError as err:
            raise TrainingArgumentError(f"{option} {args.eval_dataset}: {error_line(err)}") from None
    else:
        column = args.segments_info_column
        for argument, name in (("--image_column", args.image_column), ("--panoptic_column", args.panoptic_column),
                               ("--segments_info_column", column)):
            if name not in names:
                raise TrainingArgumentError(
                    f"{option} {args.dataset}: no column {name!r} ({argument}); its columns are {names}."
                )
    known = {int(c["id"]) for c in categories}
    values = rows[column] if hasattr(rows, "column_names") else [row.get(column) for row in rows]
    for index, value in enumerate(values):
        where = f"{option} row {index}"
        try:
            segments = normalize_segments(value, f"{where}: {column}")
        except (TypeError, ValueError) as err:
            raise TrainingArgumentError(error_line(err)) from None
        for segment in segments:
            if "id" not in segment or "category_id" not in segment:
                raise TrainingArgumentError(f"{where}: every segment of {column!r} needs 'id' and 'category_id'.")
            if int(segment.get("iscrowd", 0) or 0):
                continue
            if int(segment["category_id"]) not in known:
                raise TrainingArgumentError(
                    f"{where}: category_id {segment['category_id']} is not one of the run's {len(known)} classes "
                    f"(ids {sorted(known)[:8]}{' ...' if len(known) > 8 else ''}); give the data set's classes with "
                    "--categories."
                )


def add_image_label_dataset(args, panoptic_dataset):
    """Decoupled Supervision: the panoptic data set mixed with `--image_label_dataset` at `--image_label_ratio`, and
    the image-level vocabulary."""
    from .data import ImageLabelDataset, LargeScaleJitter, MixedSegmentationDataset
    from ..synthetic import SYNTHETIC_CLASS_NAMES, make_synthetic_image_label_dataset

    if args.image_label_dataset == "synthetic":
        size = args.synthetic_image_size
        rows = make_synthetic_image_label_dataset(args.synthetic_train_images, size, size, seed=args.seed + 7)
        default_names = list(SYNTHETIC_CLASS_NAMES)
    else:
        rows = load_local_dataset(args.image_label_dataset, args.dataset_split, ("train",), "--dataset_split")
        default_names = _image_label_names(rows, args.image_label_column)
    names = list(args.image_label_names) if args.image_label_names else default_names
    transform = None
    if not args.no_augmentation:
        transform = LargeScaleJitter(args.image_size, args.min_scale, args.max_scale, args.flip_probability)
    image_level = ImageLabelDataset(
        rows, names, transform, image_column=args.image_column, labels_column=args.image_label_column,
        seed=args.seed, shuffle=True,
    )
    return MixedSegmentationDataset(panoptic_dataset, image_level, args.image_label_ratio), names


def _image_label_names(rows, column: str) -> list[str]:
    """The label vocabulary of an image-classification data set: its ClassLabel names, else the names it uses."""
    feature = getattr(rows, "features", {}).get(column) if hasattr(rows, "features") else None
    inner = getattr(feature, "feature", feature)
    if hasattr(inner, "names"):
        return list(inner.names)
    names = sorted({str(x) for value in rows[column] for x in ([value] if isinstance(value, str) else value)})
    if not names or any(name.lstrip("-").isdigit() for name in names):
        raise ValueError(f"Give --image_label_names: the column {column!r} holds no label names of its own.")
    return names


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation call site
# ----------------------------------------------------------------------------------------------------------------------


def run_evaluation(model, processor, rows, categories, args) -> dict:
    """Panoptic quality (percent) of `model` on `rows`, by `eovseg.evaluation.evaluate_model`."""
    from ..evaluation import DatasetColumns, evaluate_model

    columns = DatasetColumns(
        image=args.image_column, panoptic=args.panoptic_column, segments_info=args.segments_info_column
    )
    results = evaluate_model(
        model, processor, rows, "panoptic", categories=categories, columns=columns,
        batch_size=args.eval_batch_size, max_samples=args.eval_max_samples, progress=False,
    )
    keys = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "num_images")
    return {k: results[k] for k in keys if k in results}


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            m = re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", name)
            path = os.path.join(output_dir, name)
            if m and os.path.exists(os.path.join(path, STATE_FILE)):
                found.append((int(m.group(1)), path))
    return sorted(found)


def read_state(path: str) -> dict:
    """A state file (`STATE_FILE` of a checkpoint, `FINISHED_FILE` of a run), refused in one line naming it when it
    is not the JSON object this script writes."""
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        int(state["global_step"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TrainingArgumentError(
            f"{path} is not a state file of this script ({type(err).__name__}: {str(err).strip()[:120]}): restore it "
            "or move the folder away."
        ) from None


def finished_step(output_dir: str) -> int | None:
    """The step at which the run in `output_dir` finished and saved its model (`FINISHED_FILE`), or None."""
    path = os.path.join(output_dir, FINISHED_FILE)
    return int(read_state(path)["global_step"]) if os.path.exists(path) else None


def check_output_dir(args) -> str | None:
    """Refuse, before anything is written, an --output_dir this run must not write into; returns the checkpoint
    to resume from (None for a new run).

    One folder, one run: a new run (with --overwrite_output_dir) never shares a folder with another run's
    checkpoints (`--save_total_limit` would delete its own and keep those, `latest` would resume the wrong run); a
    resume needs a checkpoint of the run in the folder, and never trains over the model that run finished with.
    """
    path = args.output_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise TrainingArgumentError(f"--output_dir {path} is a file, not a folder.")
    if os.path.isdir(path) and os.listdir(path) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        raise TrainingArgumentError(
            f"--output_dir {path} is not empty: pass --overwrite_output_dir to replace this run's files in it (other "
            "files stay) or --resume_from_checkpoint to continue a run."
        )
    existing = _checkpoints(path)
    if not args.resume_from_checkpoint:
        if existing:
            raise TrainingArgumentError(
                f"--output_dir {path} holds another run's checkpoints ({os.path.basename(existing[-1][1])}): a new run "
                "never shares a folder with them; move them away, choose another --output_dir, or continue that run "
                "with --resume_from_checkpoint latest."
            )
        return None
    return _checked_resume(args, existing)


def _checked_resume(args, existing: list[tuple[int, str]]) -> str:
    path, spec = args.output_dir, args.resume_from_checkpoint
    finished = finished_step(path) if os.path.isdir(path) else None
    if spec == "latest":
        if not existing:
            done = f" (the run there finished at step {finished} and kept none)" if finished is not None else ""
            raise TrainingArgumentError(
                f"--resume_from_checkpoint latest: {path} holds no checkpoint ({CHECKPOINT_PREFIX}STEP){done}; "
                "nothing to resume. Start a new run in another --output_dir."
            )
        resume = existing[-1][1]
    else:
        resume = spec
        if not os.path.exists(os.path.join(resume, STATE_FILE)):
            raise TrainingArgumentError(
                f"--resume_from_checkpoint {resume} is not a checkpoint of this script (no {STATE_FILE})."
            )
        own = {os.path.realpath(p) for _, p in existing}
        if existing and os.path.realpath(resume) not in own:
            raise TrainingArgumentError(
                f"--output_dir {path} holds another run's checkpoints ({os.path.basename(existing[-1][1])}); resume "
                f"{resume} into a folder of its own."
            )
    step = int(read_state(os.path.join(resume, STATE_FILE))["global_step"])
    if finished is not None and step < finished:
        raise TrainingArgumentError(
            f"the run in {path} finished at step {finished} and saved its model; resuming from {resume} (step {step}) "
            "would train over it. Resume into another --output_dir (copy the checkpoint there)."
        )
    if step >= args.max_steps:
        raise TrainingArgumentError(
            f"{resume} is at step {step} and --max_steps is {args.max_steps}: nothing to train (raise --max_steps to "
            "continue the run)."
        )
    return resume


def _step_seed(seed: int, micro_step: int, process_index: int) -> int:
    return ((seed * 1_000_003 + micro_step) * 4096 + process_index) % (2**63 - 1)


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def _set_train_vocabulary(model, processor, class_names: list[str], fresh: bool) -> None:
    """The classes trained on are "seen" classes from now on (they select the ensemble weight alpha)."""
    train_vocabulary = class_names if fresh else list(dict.fromkeys([*model.config.train_vocabulary, *class_names]))
    model.config.train_vocabulary = train_vocabulary
    processor.train_vocabulary = list(train_vocabulary)


def _apply_test_size(args, processor) -> None:
    """`--test_shortest_edge` / `--test_longest_edge` set the inference resize the saved processor will use."""
    if args.test_shortest_edge is not None:
        size = {"shortest_edge": int(args.test_shortest_edge)}
        longest = args.test_longest_edge or processor.image_processor.size.get("longest_edge")
        if longest is not None:
            size["longest_edge"] = int(longest)
        processor.image_processor.size = size


def _build_train_loader(args, processor, model, train_rows, categories, class_names):
    """The training data set (with image-level labels when asked) and its unshuffled loader."""
    from .data import EovSegDataCollator

    train_dataset = make_train_dataset(args, train_rows, categories)
    image_label_names = None
    if args.image_label_dataset:
        train_dataset, image_label_names = add_image_label_dataset(args, train_dataset)
    collator = EovSegDataCollator.from_processor(
        processor, class_names, config=model.config, image_label_names=image_label_names
    )
    loader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.per_device_batch_size,
        shuffle=False,  # the data set shuffles itself, by epoch (exact resume)
        collate_fn=collator,
        num_workers=args.num_workers,
        drop_last=True,
    )
    if len(loader) == 0:
        raise ValueError(f"The data set has {len(train_dataset)} rows, fewer than one batch ({args.per_device_batch_size}).")
    # One example made before anything is written: a data set of the wrong kind (a panoptic set given as semantic,
    # undecodable images) is refused then. Examples depend only on (seed, epoch, row): this changes nothing.
    collator([train_dataset[0]])
    return train_dataset, loader


def _build_optimizer(args, model):
    """AdamW over the original's parameter groups and its multi-step schedule with warmup."""
    from .trainer_utils import build_lr_scheduler, build_param_groups, scaled_lr_steps

    param_groups = build_param_groups(
        model, args.learning_rate, args.weight_decay, args.weight_decay_norm, args.weight_decay_embed,
        args.backbone_multiplier,
    )
    for group in param_groups:
        group.pop("names")
    optimizer = torch.optim.AdamW(param_groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    milestones = args.lr_steps if args.lr_steps else scaled_lr_steps(args.max_steps)
    scheduler = build_lr_scheduler(
        optimizer, args.max_steps, milestones, args.lr_gamma, args.warmup_factor, args.warmup_iters
    )
    return optimizer, scheduler


def _resume_state(resume: str | None, accelerator) -> tuple[int, int]:
    """Load the checkpoint (if any) into the prepared objects; returns its (global, micro) step."""
    if not resume:
        return 0, 0
    state = read_state(os.path.join(resume, STATE_FILE))
    try:
        accelerator.load_state(resume)
    except Exception as err:  # torch's, safetensors' or pickle's own errors on a damaged file: all mean the same
        raise TrainingArgumentError(f"cannot load the checkpoint {resume}: {error_line(err)}") from None
    accelerator.print(f"Resumed from {resume} at step {state['global_step']}.")
    return int(state["global_step"]), int(state.get("micro_step", 0))


class _TrainingRun:
    """The state one training run carries between steps: counters, the metrics log, the interval's running sums.

    Kept in one object so that the loop, the logging, the evaluation and the checkpointing read the same counters.
    """

    def __init__(self, args, accelerator, model, processor, optimizer, scheduler, eval_rows, categories, resume,
                 global_step, micro_step):
        self.args, self.accelerator, self.model, self.processor = args, accelerator, model, processor
        self.optimizer, self.scheduler = optimizer, scheduler
        self.eval_rows, self.categories = eval_rows, categories
        self.global_step, self.micro_step = global_step, micro_step
        self.is_main = accelerator.is_main_process
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # A resumed run appends to its log; a new run starts a fresh one (with --overwrite_output_dir too), at its
        # first record: a run that stops before it leaves the folder's files as they were.
        self.metrics_mode = "a" if resume else "w"
        self.metrics_file = None
        self.last_checkpoint = resume
        self.interval: dict[str, float] = {}
        self.interval_steps, self.interval_start = 0, time.time()
        self.step_losses: dict[str, float] = {}
        self.last_eval = None
        self.last_loss = None  # the last logged interval's mean loss, for the model card

    def log(self, record: dict):
        """Append one JSON line to `metrics.jsonl` (main process only), flushed so a crash keeps what was logged."""
        if not self.is_main:
            return
        if self.metrics_file is None:
            self.metrics_file = open(os.path.join(self.args.output_dir, METRICS_FILE), self.metrics_mode, encoding="utf-8")
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()

    def evaluate_now(self) -> dict | None:
        """Panoptic quality on the evaluation rows, computed by the main process while the others wait."""
        if self.eval_rows is None:
            return None
        result = None
        if self.is_main:
            model = self.accelerator.unwrap_model(self.model)
            result = run_evaluation(model, self.processor, self.eval_rows, self.categories, self.args)
            self.log({"step": self.global_step, **{f"eval/{k}": v for k, v in result.items()}})
        self.accelerator.wait_for_everyone()
        return result

    def save_checkpoint(self):
        """Accelerate's state plus the data position (`STATE_FILE`), keeping at most `--save_total_limit` of them."""
        args, accelerator = self.args, self.accelerator
        path = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{self.global_step}")
        accelerator.save_state(path)
        if self.is_main:
            with open(os.path.join(path, STATE_FILE), "w", encoding="utf-8") as f:
                state = {"global_step": self.global_step, "micro_step": self.micro_step, "args": vars(args)}
                json.dump(state, f, indent=2)
            if args.save_total_limit:  # the folder holds this run's checkpoints only (check_output_dir)
                older = [p for step, p in _checkpoints(args.output_dir) if step < self.global_step]
                for old in older[: max(0, len(older) - (args.save_total_limit - 1))]:
                    shutil.rmtree(old, ignore_errors=True)
        self.last_checkpoint = path
        accelerator.wait_for_everyone()

    def diverged(self, what: str) -> TrainingDivergedError:
        """The one-line error of a run that met a non-finite value in its next step."""
        kept = (f"the last checkpoint, {self.last_checkpoint}, is kept" if self.last_checkpoint
                else "no checkpoint was saved before it")
        return TrainingDivergedError(
            f"step {self.global_step + 1}: {what}: the training diverged (try a lower --learning_rate); the step and "
            f"the model were not saved, {kept}."
        )

    def check_finite(self, value: torch.Tensor, what: str) -> None:
        """Stop every process together when `value` is not finite on any of them."""
        bad = torch.tensor([0.0 if bool(torch.isfinite(value).all()) else 1.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if float(bad.item()):
            raise self.diverged(f"{what} is not finite ({float(value.detach().float().flatten()[0])})")

    def forward_backward(self, batch, accumulation: int) -> bool:
        """One micro-batch, reseeded from (seed, micro step, process) for exact resume; True when the step syncs."""
        accelerator = self.accelerator
        torch.manual_seed(_step_seed(self.args.seed, self.micro_step, accelerator.process_index))
        self.micro_step += 1
        sync = self.micro_step % accumulation == 0
        context = contextlib.nullcontext() if sync else accelerator.no_sync(self.model)
        with context:
            try:
                outputs = self.model(**batch)
            except EovSegInputError as err:  # the model refuses non-finite offsets before deform_conv2d
                if "finite" not in str(err).lower():
                    raise
                raise self.diverged(error_line(err)) from None
            self.check_finite(outputs.loss, "the loss")
            accelerator.backward(outputs.loss / accumulation)
        for key, value in [("loss", outputs.loss), *outputs.loss_dict.items()]:
            self.step_losses[key] = self.step_losses.get(key, 0.0) + float(value.detach()) / accumulation
        return sync

    def optimizer_step(self, bar) -> float:
        """Clip, step the optimizer and the scheduler, and add the step's losses to the interval; returns its lr."""
        args = self.args
        grad_norm = None
        if args.max_grad_norm and args.max_grad_norm > 0:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.trainable, args.max_grad_norm, norm_type=2.0))
        # fp16's loss scaler meets infinite gradients by design: it skips those steps and lowers the scale itself.
        if args.mixed_precision != "fp16":
            norm = grad_norm
            if norm is None:  # gradients are synchronized: every process sees the same norm
                norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None]))
            if not math.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise self.diverged(f"the gradient norm is not finite ({norm})")
        try:
            self.optimizer.step()
        except RuntimeError as err:  # torch's Adam scales the step by 1 / (1 - beta1^t): a huge rate overflows it
            if "overflow" not in str(err):
                raise
            raise self.diverged(f"the optimizer step overflowed ({error_line(err)})") from None
        self.optimizer.zero_grad(set_to_none=True)
        # finite gradients times a huge learning rate can still overflow a weight: never train on (or save) one
        if not all(bool(torch.isfinite(p).all()) for p in self.trainable):
            raise self.diverged("a weight is not finite after the optimizer step")
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.global_step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{self.step_losses['loss']:.3f}", refresh=False)
        for key, value in self.step_losses.items():
            self.interval[key] = self.interval.get(key, 0.0) + value
        if grad_norm is not None:
            self.interval["grad_norm"] = self.interval.get("grad_norm", 0.0) + grad_norm
        self.interval_steps += 1
        self.step_losses = {}
        return lr

    def log_interval(self, lr: float, batches_per_epoch: int):
        """Log the interval's mean losses (averaged over processes too) and start a new interval."""
        accelerator = self.accelerator
        elapsed = time.time() - self.interval_start
        record = {"step": self.global_step, "epoch": round(self.micro_step / batches_per_epoch, 4), "lr": lr}
        keys = list(self.interval)  # the same keys, in the same order, on every process
        values = torch.tensor([self.interval[k] / self.interval_steps for k in keys], dtype=torch.float64)
        if accelerator.num_processes > 1:  # averaged over processes
            values = accelerator.reduce(values.to(accelerator.device), reduction="mean").cpu()
        record.update({k: float(v) for k, v in zip(keys, values)})
        self.last_loss = record.get("loss", self.last_loss)
        record["seconds_per_step"] = elapsed / self.interval_steps
        self.log(record)
        self.interval, self.interval_steps, self.interval_start = {}, 0, time.time()

    def after_step(self, lr: float, batches_per_epoch: int, start_time: float) -> bool:
        """Log, evaluate and checkpoint on their schedules; True when training should stop."""
        args, global_step = self.args, self.global_step
        if global_step % max(1, args.logging_steps) == 0 or global_step >= args.max_steps:
            self.log_interval(lr, batches_per_epoch)
        if args.eval_steps and global_step % args.eval_steps == 0 and global_step < args.max_steps:
            self.last_eval = self.evaluate_now() or self.last_eval
        out_of_time = args.max_train_seconds is not None and time.time() - start_time > args.max_train_seconds
        # A run stopped by --max_train_seconds keeps a checkpoint of where it stopped, to be resumed.
        if args.save_steps and (global_step % args.save_steps == 0 or (out_of_time and global_step < args.max_steps)):
            self.save_checkpoint()
        return global_step >= args.max_steps or out_of_time

    def run(self, loader, train_dataset, bar):
        """The epoch loop; a resumed run skips the batches its epoch had already seen."""
        accelerator, args = self.accelerator, self.args
        accumulation = max(1, args.gradient_accumulation_steps)
        batches_per_epoch = len(loader)
        start_time = time.time()
        self.model.train()
        stop = self.global_step >= args.max_steps
        while not stop:
            epoch, skip = divmod(self.micro_step, batches_per_epoch)
            # Accelerate's loader passes its own epoch counter to the data set when iterated: keep both in step.
            loader.set_epoch(epoch)
            train_dataset.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
            for batch in epoch_loader:
                if not self.forward_backward(batch, accumulation):
                    continue
                lr = self.optimizer_step(bar)
                if self.after_step(lr, batches_per_epoch, start_time):
                    stop = True
                    break


def _save_final(accelerator, model, processor, categories, args, run) -> None:
    """Save the model and processor in OUT with the training classes as vocabulary, atomically (a failure, such as
    a full disk, leaves the folder as it was and says so), with the step it finished at (`FINISHED_FILE`) and a
    model card with the run's figures (unless OUT has a README.md of the user's)."""
    from ..auto_registration import save_model_folder_atomically

    if accelerator.is_main_process:
        store_training_vocabulary(model, processor, categories)
        finished = json.dumps({"global_step": run.global_step, "max_steps": args.max_steps}, indent=2) + "\n"
        card = _training_card(model, categories, args, run, run.last_eval)
        try:
            save_model_folder_atomically(model, processor, args.output_dir, {FINISHED_FILE: finished, "README.md": card})
        except OSError as err:
            kept = [p for _, p in _checkpoints(args.output_dir)]
            raise TrainingArgumentError(
                f"could not save the trained model in {args.output_dir} ({error_line(err)}); nothing there was "
                "replaced" + (f"; resume from {kept[-1]} once there is room" if kept else "")
            ) from None
    accelerator.wait_for_everyone()


def _training_card(model, categories, args, run, evaluation: dict | None) -> str:
    from ..model_card import model_card

    figures = {"training steps": run.global_step, "final training loss (last logged interval)": run.last_loss,
               **{f"evaluation {key}": value for key, value in (evaluation or {}).items()}}
    made_by = [f"- Trained with `eovseg train` from `{args.model}` on `{args.dataset}` "
               f"({len(categories)} classes, the default vocabulary)."]
    return model_card(model.config, model.num_parameters(), made_by=made_by,
                      figures={name: value for name, value in figures.items() if value is not None})


def _card_with_evaluation(accelerator, model, categories, args, run, evaluation: dict | None) -> None:
    """The final evaluation's figures join the card saved with the model (a card the user wrote stays)."""
    from ..model_card import is_eovseg_card

    card_path = os.path.join(args.output_dir, "README.md")
    if accelerator.is_main_process and evaluation and is_eovseg_card(card_path):
        with open(card_path, "w", encoding="utf-8") as card:
            card.write(_training_card(model, categories, args, run, evaluation))


def _push(accelerator, args) -> None:
    from ..auto_registration import push_model_folder

    if accelerator.is_main_process and args.push_to_hub:
        url = push_model_folder(args.output_dir, args.push_to_hub, "Upload fine-tuned EOV-Seg model",
                                ignore_patterns=[f"{CHECKPOINT_PREFIX}*", METRICS_FILE, FINISHED_FILE])  # the model only
        print(f"uploaded: {url}")
    accelerator.wait_for_everyone()


def _prepare(args):
    """Every check before anything is written: the arguments, the output folder, the upload, the model, the data
    sets (their columns and categories) and the classes. Returns what the run needs."""
    from ..auto_registration import check_push_access

    resume = check_output_dir(args)
    overrides = parse_config_overrides(args.config_overrides)
    if args.push_to_hub:
        check_push_access(args.push_to_hub)
    model, processor, fresh = load_model_and_processor(args.model, overrides)
    train_rows, eval_rows = build_datasets(args)
    categories = resolve_categories(args, train_rows, model)
    check_rows(args, train_rows, categories, "--dataset", args.dataset_type)
    if eval_rows is not None:
        check_rows(args, eval_rows, categories, "--eval_dataset", "panoptic")
    return resume, model, processor, fresh, train_rows, eval_rows, categories


def train(args: argparse.Namespace) -> dict:
    """Run the training described by `args` (see [`build_parser`]). Returns a summary (final step, last metrics)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from ..launch import launched_on_cpu_only

    set_seed(args.seed)  # before a preset's random weights are drawn
    resume, model, processor, fresh, train_rows, eval_rows, categories = _prepare(args)
    accelerator = Accelerator(
        cpu=args.cpu or launched_on_cpu_only(),
        mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=args.output_dir, automatic_checkpoint_naming=False),
    )
    is_main = accelerator.is_main_process
    class_names = [c["name"] for c in categories]
    _set_train_vocabulary(model, processor, class_names, fresh)
    _apply_test_size(args, processor)
    train_dataset, loader = _build_train_loader(args, processor, model, train_rows, categories, class_names)

    optimizer, scheduler = _build_optimizer(args, model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # Stepped by hand once per optimizer step (a prepared scheduler would step once per process), saved with the state.
    accelerator.register_for_checkpointing(scheduler)
    global_step, micro_step = _resume_state(resume, accelerator)
    accelerator.wait_for_everyone()  # every process has checked the folder before it is written to
    created = not os.path.exists(args.output_dir)
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)  # the first write, once every input was checked
        if resume is None and os.path.exists(os.path.join(args.output_dir, FINISHED_FILE)):
            # --overwrite_output_dir: the earlier run's end mark is this script's file, and no longer true
            os.remove(os.path.join(args.output_dir, FINISHED_FILE))
    accelerator.wait_for_everyone()

    run = _TrainingRun(args, accelerator, model, processor, optimizer, scheduler, eval_rows, categories, resume,
                       global_step, micro_step)
    bar = progress_bar(total=args.max_steps, initial=global_step, desc="Training", enabled=is_main and not args.no_progress)
    try:
        run.run(loader, train_dataset, bar)
        bar.close()
        # The trained model is saved before the final evaluation: an evaluation that fails never loses it.
        _save_final(accelerator, accelerator.unwrap_model(model), processor, categories, args, run)
        last_eval = run.evaluate_now() or run.last_eval
        _card_with_evaluation(accelerator, accelerator.unwrap_model(model), categories, args, run, last_eval)
    finally:
        if run.metrics_file is not None:
            run.metrics_file.close()
        if is_main and created and os.path.isdir(args.output_dir) and not os.listdir(args.output_dir):
            os.rmdir(args.output_dir)  # a run that wrote nothing leaves no folder behind
    _push(accelerator, args)
    accelerator.end_training()
    return {"global_step": run.global_step, "micro_step": run.micro_step, "eval": last_eval,
            "output_dir": args.output_dir}


def _train_command(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with progress_switch(not args.no_progress):
        summary = train(args)
    if summary["eval"]:
        print(json.dumps({"step": summary["global_step"], **summary["eval"]}))
    return 0


main = command_main(_train_command, "train")


if __name__ == "__main__":
    sys.exit(main())

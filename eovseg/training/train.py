"""Train (or fine-tune) EOV-Seg with Accelerate, as the original trains it.

    accelerate launch -m eovseg.training.train --model DIR_OR_VARIANT --dataset PATH_OR_synthetic --output_dir OUT
    python -m eovseg.training.train ...          # one device
    eovseg train ...                              # the same, through the package's command

What it does (defaults are the original's, `configs/Base-COCO-PanopticSegmentation.yaml` / `train_net.py`):

* the model: a directory written by `save_pretrained`, or a preset name (`tiny`, `r50`, ...) built with random
  decoder weights (`--config_overrides '{"num_proposals": 20}'` changes fields); the CLIP towers are frozen;
* the data: a local data set (`save_to_disk` folder, data files or a folder `datasets.load_dataset` reads; never
  downloaded) or `synthetic` ([`make_synthetic_panoptic_dataset`]), COCO-panoptic rows by default or semantic ones
  (`--dataset_type semantic`), augmented with large-scale jitter (crop 1024, scale 0.1-2.0, flip);
* the classes: `--categories categories.json` (`[{"id", "name", "isthing"}]`, or a COCO panoptic JSON), else the
  categories stored with the data set (the synthetic one has them), else the model's default vocabulary;
* AdamW (lr 1e-4, weight decay 0.05; none for normalization layers and embeddings), the whole model's gradient norm
  clipped at 0.01, multi-step decay x0.1 at the original's steps scaled to `--max_steps`, warmup factor 1.0 over 10
  steps; mixed precision (`--mixed_precision bf16|fp16`) and gradient accumulation;
* every `--save_steps`: `OUT/checkpoint-STEP` (Accelerate state: model, optimizer, scheduler, RNG, plus the data
  position); `--resume_from_checkpoint PATH|latest` continues exactly where it stopped;
* every `--eval_steps`: panoptic quality on `--eval_dataset` (`eovseg.evaluation.evaluate_model`);
* a tqdm bar, `OUT/metrics.jsonl` (one JSON object per logging step / evaluation), and at the end
  `save_pretrained` of the model and the processor in OUT (`--push_to_hub REPO_ID` to upload them), with the training
  classes as the model's default vocabulary (text embeddings stored) and among its training vocabulary.

Every training step reseeds torch's generator from (seed, step, process): the random point sampling of the loss
then depends only on them, which is what makes a resumed run reproduce the uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence

import torch

from ..data_sources import dataset_categories, load_local_dataset

__all__ = ["build_parser", "main", "train"]

CHECKPOINT_PREFIX = "checkpoint-"


class TrainingArgumentError(ValueError):
    """A command-line argument or file the training cannot use, reported as one line by the `eovseg` command."""


STATE_FILE = "training_state.json"
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eovseg.training.train", description="Train EOV-Seg (Accelerate; the original's recipe)."
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="save_pretrained directory, or a preset: tiny, tiny_convnext, r50, ...")
    g.add_argument("--config_overrides", default=None, help="JSON object of EovSegConfig fields to change")
    g.add_argument("--dataset", required=True, help="local data set path, or 'synthetic'")
    g.add_argument("--dataset_split", default=None, help="default: train when a DatasetDict, else its only split")
    g.add_argument("--dataset_type", choices=["panoptic", "semantic"], default="panoptic")
    g.add_argument("--eval_dataset", default=None, help="local data set path or 'synthetic' (panoptic rows)")
    g.add_argument("--eval_split", default=None, help="default: validation/val/test when a DatasetDict")
    g.add_argument("--categories", default=None, metavar="NAME|FILE",
                   help="built-in vocabulary name (coco_panoptic, ...) or JSON file: [{id, name, isthing}] or a COCO "
                        "panoptic JSON")
    g.add_argument("--image_column", default="image")
    g.add_argument("--panoptic_column", default="label")
    g.add_argument("--segments_info_column", default="segments_info")
    g.add_argument("--label_column", default="label", help="semantic label maps (--dataset_type semantic)")
    g.add_argument("--ignore_index", type=int, default=255, help="unlabeled value of semantic label maps")
    g.add_argument("--synthetic_train_images", type=int, default=64)
    g.add_argument("--synthetic_eval_images", type=int, default=16)
    g.add_argument("--synthetic_image_size", type=int, default=64)
    g.add_argument("--image_label_dataset", default=None,
                   help="Decoupled Supervision (config decoupled_supervision): image-level data, a local path or "
                        "'synthetic' (images with a list of label names or ids)")
    g.add_argument("--image_label_column", default="labels")
    g.add_argument("--image_label_names", nargs="*", default=None,
                   help="the image-level vocabulary (default: the column's ClassLabel names, else its label names)")
    g.add_argument("--image_label_ratio", type=float, default=0.5, help="fraction of image-level examples")

    g = p.add_argument_group("augmentation")
    g.add_argument("--image_size", type=int, default=1024, help="large-scale-jitter crop size")
    g.add_argument("--min_scale", type=float, default=0.1)
    g.add_argument("--max_scale", type=float, default=2.0)
    g.add_argument("--flip_probability", type=float, default=0.5)
    g.add_argument("--no_augmentation", action="store_true", help="train on the images as they are")
    g.add_argument(
        "--test_shortest_edge", type=int, default=None, help="evaluation resize (default: the processor's, 640)"
    )
    g.add_argument("--test_longest_edge", type=int, default=None)

    g = p.add_argument_group("optimization")
    g.add_argument("--max_steps", type=int, default=200_000)
    g.add_argument("--per_device_batch_size", type=int, default=2, help="the original: 16 images over 8 GPUs")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--weight_decay_norm", type=float, default=0.0)
    g.add_argument("--weight_decay_embed", type=float, default=0.0)
    g.add_argument("--backbone_multiplier", type=float, default=0.1)
    g.add_argument("--max_grad_norm", type=float, default=0.01, help="0 disables clipping")
    g.add_argument("--lr_steps", type=int, nargs="*", default=None, help="default: (163889, 187546) x max_steps/200000")
    g.add_argument("--lr_gamma", type=float, default=0.1)
    g.add_argument("--warmup_factor", type=float, default=1.0)
    g.add_argument("--warmup_iters", type=int, default=10)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--cpu", action="store_true", help="run on the CPU (several CPU processes under torchrun: gloo)")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--num_workers", type=int, default=0)
    g.add_argument("--max_train_seconds", type=float, default=None, help="stop after this wall time")

    g = p.add_argument_group("logging, checkpoints, evaluation")
    g.add_argument("--output_dir", required=True,
                   help="where the model, processor, metrics.jsonl and checkpoint-STEP folders go; must be empty or "
                        "new unless --overwrite_output_dir or --resume_from_checkpoint")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="train into a non-empty --output_dir: replace the run's own files there (the model, processor "
                        "and a fresh metrics.jsonl) and leave every other file alone")
    g.add_argument("--logging_steps", type=int, default=20)
    g.add_argument("--save_steps", type=int, default=5000, help="0: no intermediate checkpoints")
    g.add_argument("--save_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint directory, or 'latest'")
    g.add_argument("--eval_steps", type=int, default=0, help="0: evaluate only at the end (with --eval_dataset)")
    g.add_argument("--eval_batch_size", type=int, default=1)
    g.add_argument("--eval_max_samples", type=int, default=None)
    g.add_argument("--no_progress", action="store_true")
    g.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="upload the final model and processor")
    return p


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
        config = EovSegConfig.from_variant(spec, **overrides)
        model = EovSegForPanopticSegmentation(config)
        processor = EovSegProcessor.from_config(config)
        fresh = True
    else:
        raise FileNotFoundError(
            f"--model {spec!r} is neither a local directory nor a preset ({', '.join(PRESETS)}); nothing is "
            "downloaded."
        )
    return model, processor, fresh


def resolve_categories(args, dataset, model) -> list[dict]:
    """The training classes `[{"id", "name", "isthing"}]`: `--categories`, else the data set's stored ones, else
    the model's default vocabulary (ids 0 .. K-1); see `eovseg.data_sources.resolve_categories`."""
    from ..data_sources import resolve_categories as resolve

    if not args.categories and dataset_categories(dataset) is None and not model.config.vocabulary:
        raise ValueError("No categories: pass --categories (the data set and the model give none).")
    return resolve(args.categories or None, dataset, model.config)


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
    known = set(EovSegConfig.from_variant("tiny").to_dict())
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TrainingArgumentError(f"--config_overrides: {key!r} is not an EovSegConfig field{hint}")
    return overrides


def check_output_dir(args) -> None:
    """A non-empty --output_dir holds someone's files: train into it only when told how (overwrite or resume)."""
    path = args.output_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise TrainingArgumentError(f"--output_dir {path} is a file, not a folder.")
    if os.path.isdir(path) and os.listdir(path) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        raise TrainingArgumentError(
            f"--output_dir {path} is not empty: pass --overwrite_output_dir to replace this run's files in it (other "
            "files stay) or --resume_from_checkpoint to continue a run."
        )


def build_datasets(args):
    from ..synthetic import make_synthetic_panoptic_dataset

    if args.dataset == "synthetic":
        size = args.synthetic_image_size
        train_rows = make_synthetic_panoptic_dataset(args.synthetic_train_images, size, size, seed=args.seed)
    else:
        train_rows = load_local_dataset(args.dataset, args.dataset_split, ("train",), "--dataset_split")
    eval_rows = None
    if args.eval_dataset == "synthetic":
        size = args.synthetic_image_size
        eval_rows = make_synthetic_panoptic_dataset(args.synthetic_eval_images, size, size, seed=args.seed + 1_000_003)
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


def _resolve_resume(spec: str | None, output_dir: str) -> str | None:
    if not spec:
        return None
    if spec == "latest":
        found = _checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.exists(os.path.join(spec, STATE_FILE)):
        raise TrainingArgumentError(f"--resume_from_checkpoint {spec} is not a checkpoint of this script (no {STATE_FILE}).")
    return spec


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


def _resume_state(args, accelerator) -> tuple[str | None, int, int]:
    """Load the checkpoint asked for (if any) into the prepared objects; returns it and its (global, micro) step."""
    global_step, micro_step = 0, 0
    resume = _resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if args.resume_from_checkpoint == "latest" and resume is None:
        accelerator.print(f"No checkpoint in {args.output_dir} to resume from: starting afresh.")
    if resume:
        accelerator.load_state(resume)
        with open(os.path.join(resume, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        global_step, micro_step = int(state["global_step"]), int(state["micro_step"])
        accelerator.print(f"Resumed from {resume} at step {global_step}.")
    return resume, global_step, micro_step


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
        metrics_path = os.path.join(args.output_dir, METRICS_FILE)
        # A resumed run appends to its log; a new run starts a fresh one (with --overwrite_output_dir too).
        self.metrics_file = open(metrics_path, "a" if resume else "w", encoding="utf-8") if self.is_main else None
        self.interval: dict[str, float] = {}
        self.interval_steps, self.interval_start = 0, time.time()
        self.step_losses: dict[str, float] = {}
        self.last_eval = None
        self.last_loss = None  # the last logged interval's mean loss, for the model card

    def log(self, record: dict):
        """Append one JSON line to `metrics.jsonl` (main process only), flushed so a crash keeps what was logged."""
        if self.metrics_file is not None:
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
            if args.save_total_limit:
                for _, old in _checkpoints(args.output_dir)[: -args.save_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def forward_backward(self, batch, accumulation: int) -> bool:
        """One micro-batch, reseeded from (seed, micro step, process) for exact resume; True when the step syncs."""
        accelerator = self.accelerator
        torch.manual_seed(_step_seed(self.args.seed, self.micro_step, accelerator.process_index))
        self.micro_step += 1
        sync = self.micro_step % accumulation == 0
        context = contextlib.nullcontext() if sync else accelerator.no_sync(self.model)
        with context:
            outputs = self.model(**batch)
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
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
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
        if args.save_steps and global_step % args.save_steps == 0:
            self.save_checkpoint()
        out_of_time = args.max_train_seconds is not None and time.time() - start_time > args.max_train_seconds
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


def _save_final(accelerator, model, processor, categories, args, figures: dict) -> None:
    """Save the model and processor in OUT with the training classes as vocabulary, and a model card with the run's
    `figures` (unless OUT has a README.md of the user's), and upload them if asked."""
    from ..auto_registration import push_model_folder, save_model_folder
    from ..model_card import write_model_card

    if accelerator.is_main_process:
        store_training_vocabulary(model, processor, categories)
        save_model_folder(model, processor, args.output_dir)
        made_by = [f"- Trained with `eovseg train` from `{args.model}` on `{args.dataset}` "
                   f"({len(categories)} classes, the default vocabulary)."]
        write_model_card(args.output_dir, model.config, model.num_parameters(), made_by=made_by, figures=figures)
        if args.push_to_hub:
            url = push_model_folder(args.output_dir, args.push_to_hub, "Upload fine-tuned EOV-Seg model",
                                    ignore_patterns=[f"{CHECKPOINT_PREFIX}*"])  # the model, not the resume states
            print(f"uploaded: {url}")
    accelerator.wait_for_everyone()


def train(args: argparse.Namespace) -> dict:
    """Run the training described by `args` (see [`build_parser`]). Returns a summary (final step, last metrics)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from ..launch import launched_on_cpu_only

    check_output_dir(args)
    overrides = parse_config_overrides(args.config_overrides)

    accelerator = Accelerator(
        cpu=args.cpu or launched_on_cpu_only(),
        mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=args.output_dir, automatic_checkpoint_naming=False),
    )
    set_seed(args.seed)
    is_main = accelerator.is_main_process
    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)

    model, processor, fresh = load_model_and_processor(args.model, overrides)
    train_rows, eval_rows = build_datasets(args)
    categories = resolve_categories(args, train_rows, model)
    class_names = [c["name"] for c in categories]
    _set_train_vocabulary(model, processor, class_names, fresh)
    _apply_test_size(args, processor)
    train_dataset, loader = _build_train_loader(args, processor, model, train_rows, categories, class_names)

    optimizer, scheduler = _build_optimizer(args, model)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # Stepped by hand once per optimizer step (a prepared scheduler would step once per process), saved with the state.
    accelerator.register_for_checkpointing(scheduler)

    resume, global_step, micro_step = _resume_state(args, accelerator)
    run = _TrainingRun(args, accelerator, model, processor, optimizer, scheduler, eval_rows, categories, resume,
                       global_step, micro_step)
    bar = tqdm(total=args.max_steps, initial=global_step, desc="Training", disable=not is_main or args.no_progress)
    run.run(loader, train_dataset, bar)
    bar.close()

    last_eval = run.evaluate_now() or run.last_eval
    figures = {"training steps": run.global_step, "final training loss (last logged interval)": run.last_loss,
               **{f"evaluation {key}": value for key, value in (last_eval or {}).items()}}
    _save_final(accelerator, accelerator.unwrap_model(model), processor, categories, args,
                {name: value for name, value in figures.items() if value is not None})
    if run.metrics_file is not None:
        run.metrics_file.close()
    accelerator.end_training()
    return {"global_step": run.global_step, "micro_step": run.micro_step, "eval": last_eval,
            "output_dir": args.output_dir}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = train(args)
    if summary["eval"]:
        print(json.dumps({"step": summary["global_step"], **summary["eval"]}))
    return 0


if __name__ == "__main__":
    from ..cli import run_main

    sys.exit(run_main(main, prog="python -m eovseg.training.train"))

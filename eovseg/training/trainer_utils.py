"""Optimizer, learning-rate schedule and `transformers.Trainer` settings of the original EOV-Seg training.

The original (detectron2, `configs/Base-COCO-PanopticSegmentation.yaml` and `train_net.py`):

* AdamW, base learning rate 1e-4, weight decay 0.05, torch's default betas and eps;
* weight decay 0 for the parameters of normalization layers (torch's BatchNorm/GroupNorm/LayerNorm/... classes and
  their subclasses) and of `nn.Embedding`s; biases keep the default decay. A normalization module that is not a
  subclass of torch's (the decoder's `EovSegLayerNorm2d`) keeps it too, as in the original;
* learning rate x 0.1 (`BACKBONE_MULTIPLIER`) for trainable parameters of the backbone (here the CLIP towers, which
  are frozen, so in practice none);
* gradient clipping of the whole model's gradient norm (L2) at 0.01 before each step;
* `WarmupMultiStepLR`: x 0.1 at steps (163889, 187546) of 200000, after a linear warmup of 10 steps from a factor
  1.0 (i.e. no warmup in effect). For a run of another length the steps are scaled proportionally.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "ORIGINAL_MAX_STEPS",
    "ORIGINAL_LR_STEPS",
    "NORM_MODULE_TYPES",
    "build_param_groups",
    "build_optimizer",
    "build_lr_scheduler",
    "scaled_lr_steps",
    "multistep_lr_factor",
    "training_arguments",
]

ORIGINAL_MAX_STEPS = 200_000
ORIGINAL_LR_STEPS = (163_889, 187_546)

NORM_MODULE_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)

# Module-name prefixes of the CLIP towers of EovSegForPanopticSegmentation (the original's "backbone" modules).
BACKBONE_PREFIXES = ("clip_backbone", "spatial_extractor")


def build_param_groups(
    model: nn.Module,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.05,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
    backbone_multiplier: float = 0.1,
    backbone_prefixes: Sequence[str] = BACKBONE_PREFIXES,
) -> list[dict]:
    """Parameter groups with the original's per-parameter learning rate and weight decay (trainable parameters only;
    each parameter once, under the first module that owns it). Parameters with equal settings share a group."""
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr, decay = learning_rate, weight_decay
            if any(module_name == p or module_name.startswith(p + ".") for p in backbone_prefixes):
                lr = lr * backbone_multiplier
            if isinstance(module, NORM_MODULE_TYPES):
                decay = weight_decay_norm
            if isinstance(module, nn.Embedding):
                decay = weight_decay_embed
            group = groups.setdefault((lr, decay), {"params": [], "names": [], "lr": lr, "weight_decay": decay})
            group["params"].append(param)
            group["names"].append(f"{module_name}.{param_name}" if module_name else param_name)
    return list(groups.values())


def build_optimizer(model: nn.Module, learning_rate: float = 1e-4, weight_decay: float = 0.05, **kwargs):
    """`torch.optim.AdamW` over [`build_param_groups`] (keyword arguments go to it)."""
    groups = build_param_groups(model, learning_rate, weight_decay, **kwargs)
    for group in groups:
        group.pop("names")
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay)


def scaled_lr_steps(max_steps: int, steps: Sequence[int] = ORIGINAL_LR_STEPS, reference_max_steps: int = ORIGINAL_MAX_STEPS):
    """The decay steps for a run of `max_steps`: the original's steps scaled by `max_steps / reference_max_steps`
    (unchanged for a run of the original length)."""
    if max_steps == reference_max_steps:
        return tuple(int(s) for s in steps)
    return tuple(max(1, int(round(s * max_steps / reference_max_steps))) for s in steps)


def multistep_lr_factor(
    step: int,
    milestones: Sequence[int],
    gamma: float = 0.1,
    warmup_factor: float = 1.0,
    warmup_iters: int = 10,
    warmup_method: str = "linear",
) -> float:
    """Learning-rate multiplier at (0-based) `step` of detectron2's `WarmupMultiStepLR`: `gamma ** k` after `k`
    milestones were reached, times, during the first `warmup_iters` steps, a warmup from `warmup_factor` (linear
    ramp to the value at the end of warmup, or constant)."""
    main = gamma ** bisect.bisect_right(list(milestones), step)
    if step >= warmup_iters or warmup_iters <= 0:
        return main
    if warmup_method == "constant":
        return warmup_factor * main
    if warmup_method != "linear":
        raise ValueError(f"Unknown warmup method {warmup_method!r}.")
    start = warmup_factor * gamma ** bisect.bisect_right(list(milestones), 0)
    end = gamma ** bisect.bisect_right(list(milestones), warmup_iters)
    alpha = step / warmup_iters
    return start + (end - start) * alpha


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    warmup_factor: float = 1.0,
    warmup_iters: int = 10,
    warmup_method: str = "linear",
) -> torch.optim.lr_scheduler.LambdaLR:
    """The original's `WarmupMultiStepLR` as a `LambdaLR` stepped once per optimizer step; `milestones` default to
    the original's, scaled to `max_steps` ([`scaled_lr_steps`])."""
    if milestones is None:
        milestones = scaled_lr_steps(max_steps)
    milestones = tuple(int(m) for m in milestones)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: multistep_lr_factor(step, milestones, gamma, warmup_factor, warmup_iters, warmup_method),
    )


def training_arguments(output_dir: str, **overrides):
    """`transformers.TrainingArguments` for fine-tuning EOV-Seg with the plain `Trainer`.

    Sets what the model and the collator need (`remove_unused_columns=False`: the collator builds the model's
    inputs; `label_names=["mask_labels", "class_labels"]`: lists of per-image tensors that the Trainer moves to the
    device; `prediction_loss_only=True`: predictions and targets of different images have different shapes) and
    the original's optimization (AdamW, lr 1e-4, weight decay 0.05, gradient clipping at 0.01, constant learning
    rate; pass `optimizers=(build_optimizer(model), build_lr_scheduler(...))` to the Trainer for the original's
    parameter groups and step schedule). Keyword arguments override any of these.
    """
    from transformers import TrainingArguments

    kwargs = {
        "remove_unused_columns": False,
        "label_names": ["mask_labels", "class_labels"],
        "prediction_loss_only": True,
        "learning_rate": 1e-4,
        "weight_decay": 0.05,
        "max_grad_norm": 0.01,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "report_to": [],
    }
    kwargs.update(overrides)
    return TrainingArguments(output_dir=output_dir, **kwargs)

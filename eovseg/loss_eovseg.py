"""Training loss of EOV-Seg: the Mask2Former-style set criterion applied to every light-weight decoder stage.

For each decoder stage independently:

1. **Matching.** Predictions are matched one-to-one to the target segments of their image by the Hungarian
   algorithm on the cost `class_weight * (-p(target class)) + mask_weight * BCE + dice_weight * dice`, where the
   class probability is the softmax over the K classes and void, and BCE and dice are computed on
   `train_num_points` points drawn uniformly at random (the same points for every prediction and target of an image).
2. **Classification.** Cross-entropy over K + 1 classes on every query: matched queries against their target's
   class, the others against void (index K), with class weights 1 and `no_object_weight` for void (weighted mean).
3. **Masks.** For each matched pair, `train_num_points` points are importance-sampled on the predicted mask
   (`oversample_ratio * num_points` random candidates, the `importance_sample_ratio` fraction closest to the decision
   boundary |logit| ~ 0 kept, the rest drawn at random). Sigmoid BCE (mean over the points) and dice on those points,
   both summed over the pairs and divided by the number of target masks (averaged over processes, at least 1).

The predictions are mask logits at 1/4 of the padded input size, the targets binary masks at the full padded size;
every point is sampled with `grid_sample` in normalized coordinates (`align_corners=False`), so both are read at
the same image location without resizing either.

The loss terms of stage `s` are named `s{s}_loss_ce`, `s{s}_loss_mask` and `s{s}_loss_dice` (unweighted in the
returned dict); the total is the sum over stages of `class_weight * ce + mask_weight * mask + dice_weight * dice`.

The matcher, point sampling and the per-point BCE and dice are those of `transformers`' Mask2Former
(`Mask2FormerHungarianMatcher`, `sample_point`, `sigmoid_cross_entropy_loss`, `dice_loss`). The class-weight vector
is built for each call on the logits' device, since the number of classes is the size of the vocabulary of that
call; the criterion holds no parameters or buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerHungarianMatcher,
    dice_loss,
    sample_point,
    sigmoid_cross_entropy_loss,
)

from .modeling_eovseg import EovSegInputError

__all__ = ["EovSegLoss", "sample_points_by_uncertainty", "mask_uncertainty", "average_num_masks"]

LOSS_KEYS = ("loss_ce", "loss_mask", "loss_dice")


def mask_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of mask logits: minus their distance to the decision boundary, `-|logit|`."""
    return -logits.abs()


def sample_points_by_uncertainty(
    logits: torch.Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> torch.Tensor:
    """PointRend's importance sampling of `num_points` points in [0, 1]^2 for each of `N` masks.

    `int(num_points * oversample_ratio)` candidates are drawn uniformly; the `int(importance_sample_ratio *
    num_points)` candidates with the most uncertain (bilinearly sampled) logits are kept and the remaining points are
    drawn uniformly. Random draws happen in the same order and shapes as in Mask2Former, so a seeded generator gives
    the same points.

    Args:
        logits: `(N, 1, H, W)` mask logits.
    Returns:
        `(N, num_points, 2)` point coordinates (x, y) in [0, 1].
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}.")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}.")
    num_masks = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    candidates = torch.rand(num_masks, num_candidates, 2, device=logits.device)
    uncertainty = mask_uncertainty(sample_point(logits, candidates, align_corners=False))  # (N, 1, C)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    top = uncertainty[:, 0, :].topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
    points = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        points = torch.cat([points, torch.rand(num_masks, num_random, 2, device=logits.device)], dim=1)
    return points


def average_num_masks(class_labels: Sequence[torch.Tensor], device: torch.device) -> float:
    """Number of target masks of the batch, averaged over the processes of a distributed run, at least 1.

    With `torch.distributed` initialized (as under `accelerate launch` or `torchrun`) the count is summed over all
    processes (`all_reduce`) and divided by the world size, as the original does; otherwise it is the local count.
    """
    count = torch.tensor(float(sum(int(labels.shape[0]) for labels in class_labels)), device=device)
    world_size = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
        world_size = torch.distributed.get_world_size()
    return max(count.item() / world_size, 1.0)


class EovSegLoss(nn.Module):
    """The EOV-Seg set criterion over all decoder stages (see the module docstring).

    Args:
        config ([`EovSegConfig`]): gives `class_weight`, `mask_weight`, `dice_weight` (loss weights and matching
            costs), `no_object_weight`, `train_num_points`, `oversample_ratio` and `importance_sample_ratio`.

    Call it with the per-stage class logits `(B, Q, K + 1)` (void last), the per-stage mask logits `(B, Q, h, w)`, and
    per image the target masks `(N_i, H, W)` (all images padded to the same `(H, W)`, proportional to `(h, w)`) and
    target classes `(N_i,)` in `[0, K)`. Returns `(loss, loss_dict)`.
    """

    def __init__(self, config):
        super().__init__()
        self.class_weight = float(config.class_weight)
        self.mask_weight = float(config.mask_weight)
        self.dice_weight = float(config.dice_weight)
        self.no_object_weight = float(config.no_object_weight)
        self.num_points = int(config.train_num_points)
        self.oversample_ratio = float(config.oversample_ratio)
        self.importance_sample_ratio = float(config.importance_sample_ratio)
        self.weight_dict = {"loss_ce": self.class_weight, "loss_mask": self.mask_weight, "loss_dice": self.dice_weight}
        # Uniform points for matching; costs weighted like the losses.
        self.matcher = Mask2FormerHungarianMatcher(
            cost_class=self.class_weight,
            cost_mask=self.mask_weight,
            cost_dice=self.dice_weight,
            num_points=self.num_points,
        )

    def extra_repr(self) -> str:
        return (
            f"weights={self.weight_dict}, no_object_weight={self.no_object_weight}, num_points={self.num_points}, "
            f"oversample_ratio={self.oversample_ratio}, importance_sample_ratio={self.importance_sample_ratio}"
        )

    # ------------------------------------------------------------------ checks

    @staticmethod
    def _check_inputs(stage_class_logits, stage_mask_logits, mask_labels, class_labels):
        if len(stage_class_logits) == 0 or len(stage_class_logits) != len(stage_mask_logits):
            raise EovSegInputError(
                f"Got {len(stage_class_logits)} stages of class logits and {len(stage_mask_logits)} of mask logits."
            )
        batch, num_queries = stage_class_logits[0].shape[:2]
        for s, (cls, msk) in enumerate(zip(stage_class_logits, stage_mask_logits)):
            if cls.dim() != 3 or msk.dim() != 4 or cls.shape[:2] != (batch, num_queries) or msk.shape[:2] != (
                batch,
                num_queries,
            ):
                raise EovSegInputError(
                    f"Stage {s}: class logits {tuple(cls.shape)} and mask logits {tuple(msk.shape)} must be "
                    f"(B, Q, K + 1) and (B, Q, h, w) with B={batch}, Q={num_queries}."
                )
        if len(mask_labels) != batch or len(class_labels) != batch:
            raise EovSegInputError(
                f"The batch has {batch} images but got {len(mask_labels)} mask_labels and {len(class_labels)} "
                "class_labels entries (one per image)."
            )
        size = None
        for i, (masks, labels) in enumerate(zip(mask_labels, class_labels)):
            if masks.dim() != 3 or labels.dim() != 1 or masks.shape[0] != labels.shape[0]:
                raise EovSegInputError(
                    f"Image {i}: mask_labels must be (N, H, W) and class_labels (N,) with the same N, got "
                    f"{tuple(masks.shape)} and {tuple(labels.shape)}."
                )
            if size is None:
                size = tuple(masks.shape[-2:])
            elif tuple(masks.shape[-2:]) != size:
                raise EovSegInputError(
                    f"mask_labels must all have the padded input size; image 0 has {size}, image {i} "
                    f"{tuple(masks.shape[-2:])}."
                )
        height, width = stage_mask_logits[0].shape[-2:]
        if size is not None and size[0] * width != size[1] * height:
            raise EovSegInputError(
                f"Target masks of size {size} do not have the aspect ratio of the predicted masks "
                f"({height}, {width}); targets must cover the padded input the predictions are made on."
            )

    # ------------------------------------------------------------------ parts

    @torch.no_grad()
    def match(self, class_logits, mask_logits, mask_labels, class_labels) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Hungarian matching of one stage: per image, (prediction indices, target indices)."""
        return self.matcher(
            masks_queries_logits=mask_logits.detach().float(),
            class_queries_logits=class_logits.detach().float(),
            mask_labels=mask_labels,
            class_labels=class_labels,
        )

    def loss_labels(self, class_logits, target_classes_all, batch_index, pred_index, target_global) -> torch.Tensor:
        """Weighted cross-entropy over K + 1 classes, unmatched queries labelled void."""
        logits = class_logits.float()
        batch, num_queries, num_classes_with_void = logits.shape
        void = num_classes_with_void - 1
        target = torch.full((batch, num_queries), void, dtype=torch.long, device=logits.device)
        target[batch_index, pred_index] = target_classes_all[target_global]
        weight = torch.ones(num_classes_with_void, dtype=logits.dtype, device=logits.device)
        weight[-1] = self.no_object_weight
        return F.cross_entropy(logits.transpose(1, 2), target, weight)

    def loss_masks(self, mask_logits, target_masks_all, batch_index, pred_index, target_global, num_masks):
        """Point-sampled sigmoid BCE and dice of the matched pairs, divided by `num_masks`."""
        pred = mask_logits.float()[batch_index, pred_index].unsqueeze(1)  # (M, 1, h, w)
        if pred.shape[0] == 0:
            # Nothing matched: keep the graph connected (e.g. for DDP) with an exact zero.
            zero = mask_logits.float().sum() * 0.0
            return zero, zero.clone()
        with torch.no_grad():
            points = sample_points_by_uncertainty(
                pred.detach(), self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            point_labels = self._sample_targets(target_masks_all, target_global, points)
        point_logits = sample_point(pred, points, align_corners=False).squeeze(1)
        return (
            sigmoid_cross_entropy_loss(point_logits, point_labels, num_masks),
            dice_loss(point_logits, point_labels, num_masks),
        )

    @staticmethod
    def _sample_targets(target_masks_all, target_global, points):
        """Target values at `points` (M, P, 2) for the targets `target_global` (M,) of the (T, H, W) stack.

        Samples the stack in target order so that, when every target is matched (the usual case), the full-resolution
        masks are read in place instead of being gathered into a copy first.
        """
        order = torch.argsort(target_global)
        sorted_targets = target_global[order]
        if sorted_targets.numel() == target_masks_all.shape[0]:
            source = target_masks_all  # targets are unique, so sorted_targets == arange(T)
        else:
            source = target_masks_all[sorted_targets]
        sampled = sample_point(source.unsqueeze(1), points[order], align_corners=False).squeeze(1)
        labels = torch.empty_like(sampled)
        labels[order] = sampled
        return labels

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        stage_class_logits: Sequence[torch.Tensor],
        stage_mask_logits: Sequence[torch.Tensor],
        mask_labels: Sequence[torch.Tensor],
        class_labels: Sequence[torch.Tensor],
        stage_hook=None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss summed over decoder stages.

        Args:
            stage_class_logits: per stage, `(B, Q, K + 1)` class logits, void last.
            stage_mask_logits: per stage, `(B, Q, h, w)` mask logits.
            mask_labels: per image, `(N_i, H, W)` binary target masks (float), all of the padded input size.
            class_labels: per image, `(N_i,)` target class indices in `[0, K)`.
            stage_hook: optional `hook(stage, indices)` called with each stage's matches (per image, prediction and
                target indices), returning extra terms `{name: (weight, value)}` (OPSNet's IoU loss uses it).

        Returns:
            `(loss, loss_dict)`: the weighted total, and the unweighted terms `s{stage}_loss_ce`, `s{stage}_loss_mask`,
            `s{stage}_loss_dice`.
        """
        stage_class_logits, stage_mask_logits = list(stage_class_logits), list(stage_mask_logits)
        mask_labels, class_labels = list(mask_labels), list(class_labels)
        self._check_inputs(stage_class_logits, stage_mask_logits, mask_labels, class_labels)
        device = stage_mask_logits[0].device
        num_classes = stage_class_logits[0].shape[-1] - 1
        mask_labels = [m.to(device=device, dtype=torch.float32) for m in mask_labels]
        class_labels = [c.to(device=device, dtype=torch.long) for c in class_labels]
        classes_all = torch.cat(class_labels)
        if classes_all.numel() and (int(classes_all.min()) < 0 or int(classes_all.max()) >= num_classes):
            bad = classes_all[(classes_all < 0) | (classes_all >= num_classes)][0].item()
            raise EovSegInputError(
                f"class_labels contain class {bad}, outside the vocabulary of this batch ({num_classes} classes, "
                "indices 0 to K - 1)."
            )
        masks_all = torch.cat(mask_labels)  # (T, H, W): every target of the batch
        counts = torch.tensor([c.shape[0] for c in class_labels], device=device)
        offsets = torch.cumsum(counts, 0) - counts
        num_masks = average_num_masks(class_labels, device)

        total = None
        loss_dict: dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=device.type, enabled=False):
            for stage, (class_logits, mask_logits) in enumerate(zip(stage_class_logits, stage_mask_logits)):
                indices = self.match(class_logits, mask_logits, mask_labels, class_labels)
                batch_index = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
                pred_index = torch.cat([src for src, _ in indices]).to(device)
                target_index = torch.cat([tgt for _, tgt in indices]).to(device)
                target_global = offsets[batch_index] + target_index
                terms = {"loss_ce": self.loss_labels(class_logits, classes_all, batch_index, pred_index, target_global)}
                terms["loss_mask"], terms["loss_dice"] = self.loss_masks(
                    mask_logits, masks_all, batch_index, pred_index, target_global, num_masks
                )
                for key in LOSS_KEYS:
                    loss_dict[f"s{stage}_{key}"] = terms[key]
                    weighted = self.weight_dict[key] * terms[key]
                    total = weighted if total is None else total + weighted
                for key, (weight, value) in (stage_hook(stage, indices) if stage_hook else {}).items():
                    loss_dict[f"s{stage}_{key}"] = value
                    total = total + weight * value
        return total, loss_dict

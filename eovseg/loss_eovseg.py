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

[`EovSegLoss`] is transformers' `Mask2FormerLoss` (its matcher, importance sampling, per-point BCE and dice) with
what differs overridden: the number of classes is the vocabulary of each call (so the class-weight vector is built
per call and the criterion holds no parameters or buffers, leaving checkpoints unchanged), the loss runs on every
decoder stage in float32, the target masks are read in place rather than padded into a copy, and the mask count is
averaged over any `torch.distributed` run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerLoss,
    dice_loss,
    sample_point,
    sigmoid_cross_entropy_loss,
)

from .configuration_eovseg import EovSegConfig, EovSegInputError

__all__ = ["EovSegLoss"]

LOSS_KEYS = ("loss_ce", "loss_mask", "loss_dice")


class EovSegLoss(Mask2FormerLoss):
    """The EOV-Seg set criterion over all decoder stages (see the module docstring).

    Args:
        config ([`EovSegConfig`]): gives `class_weight`, `mask_weight`, `dice_weight` (loss weights and matching
            costs), `no_object_weight`, `train_num_points`, `oversample_ratio` and `importance_sample_ratio`, under
            the names `Mask2FormerConfig` uses.

    Call it with the per-stage class logits `(B, Q, K + 1)` (void last), the per-stage mask logits `(B, Q, h, w)`, and
    per image the target masks `(N_i, H, W)` (all images padded to the same `(H, W)`, proportional to `(h, w)`) and
    target classes `(N_i,)` in `[0, K)`. Returns `(loss, loss_dict)`.
    """

    def __init__(self, config: EovSegConfig):
        weight_dict = {"loss_ce": config.class_weight, "loss_mask": config.mask_weight, "loss_dice": config.dice_weight}
        super().__init__(config, weight_dict={k: float(v) for k, v in weight_dict.items()})
        # Mask2Former sizes a class-weight buffer by config.num_labels; here the classes are each call's vocabulary,
        # and a buffer would add a key to every checkpoint.
        del self.empty_weight

    def extra_repr(self) -> str:
        return (
            f"weights={self.weight_dict}, no_object_weight={self.eos_coef}, num_points={self.num_points}, "
            f"oversample_ratio={self.oversample_ratio}, importance_sample_ratio={self.importance_sample_ratio}"
        )

    # ------------------------------------------------------------------ overrides of Mask2FormerLoss

    def loss_labels(self, class_queries_logits, class_labels, indices) -> dict[str, torch.Tensor]:
        """Weighted cross-entropy over the K + 1 classes of this call's vocabulary, unmatched queries labelled void."""
        batch, num_queries, num_classes_with_void = class_queries_logits.shape
        weight = torch.ones(num_classes_with_void, dtype=class_queries_logits.dtype, device=class_queries_logits.device)
        weight[-1] = self.eos_coef
        target = torch.full(
            (batch, num_queries), num_classes_with_void - 1, dtype=torch.long, device=class_queries_logits.device
        )
        target[self._get_predictions_permutation_indices(indices)] = torch.cat(
            [labels[j] for labels, (_, j) in zip(class_labels, indices)]
        )
        return {"loss_ce": F.cross_entropy(class_queries_logits.transpose(1, 2), target, weight)}

    def loss_masks(self, masks_queries_logits, mask_labels, indices, num_masks) -> dict[str, torch.Tensor]:
        """Point-sampled sigmoid BCE and dice of the matched pairs, divided by `num_masks`."""
        pred = masks_queries_logits[self._get_predictions_permutation_indices(indices)].unsqueeze(1)  # (M, 1, h, w)
        if pred.shape[0] == 0:
            # Nothing matched: keep the graph connected (e.g. for DDP) with an exact zero.
            zero = masks_queries_logits.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        with torch.no_grad():
            points = self.sample_points_using_uncertainty(
                pred, self.calculate_uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            point_labels = self._sample_targets(mask_labels, indices, points)
        point_logits = sample_point(pred, points, align_corners=False).squeeze(1)
        return {
            "loss_mask": sigmoid_cross_entropy_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    def get_num_masks(self, class_labels: Sequence[torch.Tensor], device: torch.device) -> float:
        """Number of target masks of the batch, averaged over the processes of a distributed run, at least 1.

        With `torch.distributed` initialized (under `accelerate launch`, or plain `torchrun` where Mask2Former's
        accelerate-state check sees nothing) the count is summed over all processes and divided by the world size, as
        the original does; otherwise it is the local count.
        """
        count = torch.tensor(float(sum(int(labels.shape[0]) for labels in class_labels)), device=device)
        world_size = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
            world_size = torch.distributed.get_world_size()
        return max(count.item() / world_size, 1.0)

    @staticmethod
    def _sample_targets(mask_labels, indices, points):
        """Target values at `points` (M, P, 2) of the matched predictions, image by image.

        Samples each image's stack in target order so that, when all its targets are matched (the usual case), the
        full-resolution masks are read in place instead of being gathered (or padded, as Mask2Former does) into a copy.
        """
        sampled_per_image, start = [], 0
        for masks, (_, target_index) in zip(mask_labels, indices):
            count = target_index.shape[0]
            order = torch.argsort(target_index)
            source = masks if count == masks.shape[0] else masks[target_index[order]]
            sampled = sample_point(source.unsqueeze(1), points[start : start + count][order], align_corners=False)
            labels = torch.empty_like(sampled[:, 0])
            labels[order] = sampled[:, 0]
            sampled_per_image.append(labels)
            start += count
        return torch.cat(sampled_per_image)

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
        mask_labels = [m.to(device=device, dtype=torch.float32) for m in mask_labels]
        class_labels = [c.to(device=device, dtype=torch.long) for c in class_labels]
        self._check_class_range(class_labels, num_classes=stage_class_logits[0].shape[-1] - 1)
        num_masks = self.get_num_masks(class_labels, device)

        total = None
        loss_dict: dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=device.type, enabled=False):
            for stage, (class_logits, mask_logits) in enumerate(zip(stage_class_logits, stage_mask_logits)):
                class_logits, mask_logits = class_logits.float(), mask_logits.float()
                indices = self.matcher(mask_logits, class_logits, mask_labels, class_labels)
                indices = [(src.to(device), tgt.to(device)) for src, tgt in indices]
                terms = {
                    **self.loss_labels(class_logits, class_labels, indices),
                    **self.loss_masks(mask_logits, mask_labels, indices, num_masks),
                }
                for key in LOSS_KEYS:
                    loss_dict[f"s{stage}_{key}"] = terms[key]
                    weighted = self.weight_dict[key] * terms[key]
                    total = weighted if total is None else total + weighted
                for key, (weight, value) in (stage_hook(stage, indices) if stage_hook else {}).items():
                    loss_dict[f"s{stage}_{key}"] = value
                    total = total + weight * value
        return total, loss_dict

    @staticmethod
    def _check_class_range(class_labels, num_classes):
        classes = torch.cat(class_labels)
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
            bad = classes[(classes < 0) | (classes >= num_classes)][0].item()
            raise EovSegInputError(
                f"class_labels contain class {bad}, outside the vocabulary of this batch ({num_classes} classes, "
                "indices 0 to K - 1)."
            )

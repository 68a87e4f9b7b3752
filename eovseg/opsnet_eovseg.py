"""OPSNet's three ideas (Chen et al., ICCV 2023) as options of EOV-Seg, each off by default.

* [`EovSegEmbeddingModulation`] (inference only): the query embeddings E_q and the CLIP embeddings E_c of each mask
  are fused by how far the test vocabulary is from the training one, `E_m = E_q + alpha (1 - s) E_c`, classified by
  cosine similarity, and the logits are debiased by `(max_j H_ij) ** beta`.
* [`EovSegMaskFiltering`]: an IoU head, one linear layer per decoder stage on the stage's updated queries, regressing
  the IoU of each query's binarised mask with its Hungarian-matched ground truth (0 when unmatched), L2 loss.
* [`EovSegDecoupledSupervision`]: losses for images that carry image-level labels only: `L_match` (each label is
  claimed by one confident prediction, among those the IoU head keeps) and `L_sum` (the masks tile the image once).

The equations are those of `OPSNET-METHOD.md`; where the paper is silent the choice is a configuration field (see
[`EovSegConfig`]). The modules hold no weights except the IoU head, so the default model's state dict is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .classifier_eovseg import classification_logits
from .configuration_eovseg import EovSegInputError

__all__ = ["EovSegEmbeddingModulation", "EovSegMaskFiltering", "EovSegDecoupledSupervision", "class_similarity"]

# Cosine similarities this close to 1 are taken as 1: identical prompts give identical embeddings, whose float32
# self-similarity is 1 only up to round-off, and s = 1 must leave the query embeddings exactly as they are.
_SAME_CONCEPT_TOLERANCE = 1e-5


def class_similarity(
    text_a: torch.Tensor, index_a: torch.LongTensor, text_b: torch.Tensor, index_b: torch.LongTensor
) -> torch.Tensor:
    """Cosine similarity of two vocabularies' classes (M, N): the max over the synonym pairs of two classes, from the
    normalised synonym embeddings (S_a, D), (S_b, D) and the synonym indices of [`synonym_index`] (-1 padded)."""
    synonyms = F.normalize(text_a.float(), dim=-1) @ F.normalize(text_b.float(), dim=-1).T  # (S_a, S_b)
    rows = synonyms[index_a.clamp(min=0)].masked_fill((index_a < 0)[..., None], float("-inf")).amax(1)  # (M, S_b)
    both = rows[:, index_b.clamp(min=0)].masked_fill((index_b < 0)[None], float("-inf")).amax(-1)  # (M, N)
    return torch.where((1 - both).abs() < _SAME_CONCEPT_TOLERANCE, torch.ones_like(both), both)


class EovSegEmbeddingModulation(nn.Module):
    """OPSNet's Embedding Modulation, a class-scoring rule beside the geometric ensemble (no weights, no training).

    1. Concept similarity `H = cos(T_test, T_train)` (M x N, max over each class's synonyms, as the classifier does).
    2. Domain similarity `s = mean_i max_j H_ij` (1 when testing on the training vocabulary).
    3. Fusion `E_m = E_q + alpha (1 - s) E_c`, `E_q` and `E_c` L2-normalised first when `normalize`.
    4. Logits `z_i = cos(E_m, T_test[i])` times the decoder's logit scale, max over synonyms.
    5. Debiasing `z_i / (max_j H_ij) ** beta`.

    The class probabilities (softmax over the M classes) are then scaled by (1 - void probability) of the
    in-vocabulary head, the void probability appended, and `log(p + 1e-8)` returned, as the geometric ensemble does.
    """

    def __init__(self, alpha: float = 10.0, beta: float = 0.5, normalize: bool = True):
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.normalize = bool(normalize)

    @staticmethod
    def domain_similarity(concept_similarity: torch.Tensor) -> torch.Tensor:
        """`s = (1/M) sum_i max_j H_ij`, a scalar tensor."""
        return concept_similarity.amax(dim=1).mean()

    def fuse(self, query_embeddings: torch.Tensor, clip_embeddings: torch.Tensor, domain_similarity) -> torch.Tensor:
        """`E_m = E_q + alpha (1 - s) E_c`; exactly `E_q` (not re-normalised) when `s = 1`."""
        weight = self.alpha * (1.0 - float(domain_similarity))
        if weight == 0.0:
            return query_embeddings
        if self.normalize:
            query_embeddings = F.normalize(query_embeddings, dim=-1)
            clip_embeddings = F.normalize(clip_embeddings, dim=-1)
        return query_embeddings + weight * clip_embeddings.to(query_embeddings.dtype)

    def debias(self, logits: torch.Tensor, concept_similarity: torch.Tensor) -> torch.Tensor:
        """`z_i / (max_j H_ij) ** beta` over the last axis (the M classes); similarities are clamped at 1e-6 so that a
        class opposite to every training class does not divide by zero or a negative base."""
        closeness = concept_similarity.amax(dim=1).clamp(min=1e-6) ** self.beta
        return logits / closeness.to(logits.dtype)

    def forward(
        self,
        query_embeddings: torch.Tensor,
        clip_embeddings: torch.Tensor,
        classifier: torch.Tensor,
        index: torch.LongTensor,
        train_text: torch.Tensor,
        train_index: torch.LongTensor,
        logit_scale: torch.Tensor,
        in_vocab_logits: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class log-probabilities (B, Q, M + 1), void last, and the domain similarity s.

        Args:
            query_embeddings: `(B, Q, D)` class embeddings of the last decoder stage (E_q).
            clip_embeddings: `(B, Q, D)` CLIP embeddings of each query's mask (E_c); zero rows for masks the CLIP
                branch cannot pool.
            classifier: `(S + 1, D)` normalised synonym embeddings of the test vocabulary, void last.
            index: `(M, max_synonyms)` synonym indices of the test classes.
            train_text, train_index: the same for the training vocabulary (no void row).
            logit_scale: the decoder's (log) logit scale.
            in_vocab_logits: `(B, Q, M + 1)` logits of the in-vocabulary head, whose void probability is kept.
        """
        with torch.no_grad():  # vocabulary statistics: constants of the call
            concept = class_similarity(classifier[:-1], index, train_text, train_index)
            domain = self.domain_similarity(concept)
        fused = self.fuse(query_embeddings, clip_embeddings, domain)
        logits = classification_logits(fused, classifier, logit_scale, index)[..., :-1]
        probs = self.debias(logits, concept).softmax(-1)
        void_prob = in_vocab_logits.softmax(-1)[..., -1:]
        probs = torch.cat([probs * (1.0 - void_prob), void_prob], dim=-1)
        return torch.log(probs + 1e-8), domain


class EovSegMaskFiltering(nn.Module):
    """OPSNet's Mask Filtering: an IoU head (one linear layer per decoder stage on its updated queries).

    `forward` gives, per stage, the predicted IoU of each query's mask, `sigmoid(linear(query))` in [0, 1] (the paper
    says "one linear layer"; the sigmoid keeps the score a valid factor of `class_prob * IoU`). [`iou_targets`] and
    [`loss`] give the training signal: the IoU of each matched query's binarised mask with its ground truth (at the
    ground truth's resolution), 0 for unmatched queries, and the mean squared error.
    """

    def __init__(self, hidden_dim: int, num_stages: int, mask_threshold: float = 0.5):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, 1) for _ in range(num_stages))
        self.mask_threshold = float(mask_threshold)

    def forward(self, stage_queries) -> list[torch.Tensor]:
        if len(stage_queries) != len(self.heads):
            raise EovSegInputError(f"The IoU head has {len(self.heads)} stages, got {len(stage_queries)} query sets.")
        return [head(queries).squeeze(-1).sigmoid() for head, queries in zip(self.heads, stage_queries)]

    @torch.no_grad()
    def iou_targets(self, mask_logits: torch.Tensor, mask_labels, indices) -> torch.Tensor:
        """(B, Q) IoU targets: per image, the matched queries' (prediction index, target index) pairs of `indices`."""
        targets = torch.zeros(mask_logits.shape[:2], device=mask_logits.device, dtype=torch.float32)
        for image, (pred, tgt) in enumerate(indices):
            if len(pred) == 0:
                continue
            gt = mask_labels[image][tgt.to(mask_labels[image].device)].to(mask_logits.device) > 0.5
            pred = pred.to(mask_logits.device)
            logits = F.interpolate(mask_logits[image, pred][None].float(), size=gt.shape[-2:], mode="bilinear",
                                   align_corners=False)[0]
            binary = logits.sigmoid() > self.mask_threshold
            inter = (binary & gt).flatten(1).sum(1).float()
            union = (binary | gt).flatten(1).sum(1).float()
            targets[image, pred] = inter / union.clamp(min=1)
        return targets

    def loss(self, iou_scores: torch.Tensor, mask_logits: torch.Tensor, mask_labels, indices) -> torch.Tensor:
        """Mean squared error of one stage's predicted IoUs (B, Q) against [`iou_targets`]."""
        targets = self.iou_targets(mask_logits.detach(), mask_labels, indices)
        return F.mse_loss(iou_scores.float(), targets)


class EovSegDecoupledSupervision(nn.Module):
    """OPSNet's Decoupled Supervision: the losses of an image with image-level labels only (no weights).

    * `L_match = 1 - (1/c) sum_j max_i softmax_C(S)[i, j]` over the c labelled classes j, where `S` holds the
      scaled cosine similarities (max over synonyms) of the kept predictions' embeddings with the C classes of the
      image-level vocabulary. Predictions are kept when their predicted IoU exceeds `iou_threshold` (the best one
      when none does). With `with_void` the softmax also covers EOV-Seg's void class, so that a claimed prediction is
      pushed away from void as well (the panoptic batches teach void for everything unlabeled, and the void filter
      drops such queries at test time); OPSNet's softmax covers the C classes only (`with_void=False`). The embeddings are the query embeddings E_q: the CLIP part of E_m is frozen, so it would add no
      gradient, and EOV-Seg computes it in eval mode only.
    * `L_sum`: the root-mean-square over the image's valid pixels of `1 - sum_k sigmoid(M_k)` (the L2 norm of the
      paper, divided by the square root of the pixel count so that it does not grow with the image size).
    """

    def __init__(self, iou_threshold: float = 0.5, with_void: bool = True):
        super().__init__()
        self.iou_threshold = float(iou_threshold)
        self.with_void = bool(with_void)

    def match_loss(self, class_logits: torch.Tensor, iou_scores: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
        """`L_match` of one image: `class_logits` (Q, C) over the image-level vocabulary (or (Q, C + 1), void last, which
        then takes part in the softmax), `iou_scores` (Q,)."""
        if labels.numel() == 0:
            return class_logits.sum() * 0.0
        keep = iou_scores.detach() > self.iou_threshold
        if not bool(keep.any()):
            keep = torch.zeros_like(keep)
            keep[iou_scores.detach().argmax()] = True
        probs = class_logits[keep].float().softmax(-1)  # (J, C)
        labels = torch.unique(labels.to(probs.device))
        return 1.0 - probs[:, labels].amax(0).mean()

    @staticmethod
    def sum_loss(mask_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`L_sum` of one image: `mask_logits` (Q, h, w), `valid` (h, w) bool."""
        coverage = mask_logits.float().sigmoid().sum(0)
        return ((1.0 - coverage)[valid] ** 2).mean().sqrt()

    def forward(self, class_embeddings, mask_logits, iou_scores, pixel_mask, labels, classifier, index, logit_scale):
        """`(L_match, L_sum)` averaged over the images with image-level labels.

        Args:
            class_embeddings: `(B, Q, D)` query embeddings of the last decoder stage (those images only).
            mask_logits: `(B, Q, h, w)` mask logits of the last stage.
            iou_scores: `(B, Q)` predicted IoUs of the last stage.
            pixel_mask: `(B, H, W)` 1 on valid pixels (H, W a multiple of h, w), or None.
            labels: per image, the `(c,)` class indices of its labels in the image-level vocabulary.
            classifier: `(S + 1, D)` normalised synonym embeddings of the image-level vocabulary, the void embedding last.
            index: `(C, max_synonyms)` synonym indices of its classes.
            logit_scale: the decoder's (log) logit scale (the temperature of the softmax over the C classes).
        """
        logits = classification_logits(class_embeddings, classifier, logit_scale, index)
        if not self.with_void:
            logits = logits[..., :-1]
        if pixel_mask is None:
            valid = torch.ones(mask_logits.shape[0], *mask_logits.shape[-2:], dtype=torch.bool, device=mask_logits.device)
        else:
            valid = F.interpolate(pixel_mask[:, None].float(), size=mask_logits.shape[-2:], mode="nearest")[:, 0] > 0
        match = [self.match_loss(logits[i], iou_scores[i], labels[i]) for i in range(len(labels))]
        total = [self.sum_loss(mask_logits[i], valid[i]) for i in range(len(labels))]
        return torch.stack(match).mean(), torch.stack(total).mean()

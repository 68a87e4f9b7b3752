"""The open-vocabulary classifier shared by the light-weight decoder, the out-of-vocabulary head and OPSNet's options:
cosine similarity of embeddings with every synonym's text embedding, the best synonym of each class, void last."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

__all__ = ["build_synonym_index", "classification_logits"]


def build_synonym_index(counts: torch.LongTensor | list[int], device=None) -> torch.LongTensor:
    """The synonym index: (K, max_synonyms) rows of each class's synonyms in the synonym axis, padded with -1.

    `counts` (synonyms per class) may be a list of ints: the index is then made from Python numbers, so torch.export
    and torch.compile know its size without reading tensor values."""
    if isinstance(counts, list):
        width, starts = max(counts), [0, *itertools.accumulate(counts)][:-1]
        rows = [[start + j if j < count else -1 for j in range(width)] for start, count in zip(starts, counts)]
        return torch.tensor(rows, dtype=torch.long, device=device)
    counts = counts.to(torch.long)
    starts = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(int(counts.max().item()), device=counts.device)
    index = starts[:, None] + offsets[None, :]
    return torch.where(offsets[None, :] < counts[:, None], index, torch.full_like(index, -1))


def classification_logits(
    embeddings: torch.Tensor,
    vocabulary_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    synonym_index: torch.LongTensor,
) -> torch.Tensor:
    """Cosine-similarity logits of (B, Q, D) embeddings against (S + 1, D) normalized synonym embeddings (void last),
    scaled by exp(logit_scale) clamped at 100, then the max over each class's synonyms: (B, Q, K + 1)."""
    scale = logit_scale.exp().clamp(max=100)
    logits = scale * F.normalize(embeddings, dim=-1) @ vocabulary_embeddings.T
    synonym_logits = logits[..., :-1]
    gathered = synonym_logits[..., synonym_index.clamp(min=0)]
    gathered = gathered.masked_fill(synonym_index < 0, float("-inf"))
    return torch.cat([gathered.amax(dim=-1), logits[..., -1:]], dim=-1)

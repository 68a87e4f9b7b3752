"""Panoptic quality on seen and on unseen classes: the open-vocabulary measure of the toy world (issue 22).

A model trained on the toy world's seen classes is evaluated on held-out scenes that hold every class
(`make_toy_world_dataset(..., split="all")`), with all 18 class names as its vocabulary; the per-class PQ is then
averaged over the seen classes and over the unseen ones (each over the classes with at least one ground-truth segment
in the scenes), as open-vocabulary papers report seen and unseen PQ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

__all__ = ["HELD_OUT_SEED", "evaluate_toy_world", "in_vocabulary_only", "seen_unseen_pq", "with_random_towers"]

# The held-out scenes of the bundled model's card, the benchmark and the tests (training uses seeds 0 and 1000003).
HELD_OUT_SEED = 2026


def seen_unseen_pq(results: Mapping, seen_names: Sequence[str]) -> dict:
    """`PQ_seen` and `PQ_unseen` (percent; nan when no class of the group occurs) and `per_class` `{name: PQ}` from
    the panoptic results of `evaluate_model` (their `per_class` entries carry the class `name`)."""
    seen = set(seen_names)
    groups = {True: [], False: []}
    per_class = {}
    for entry in results["per_class"].values():
        if entry["TP"] + entry["FN"] == 0:  # the class never occurs in the scenes
            continue
        per_class[entry["name"]] = round(float(entry["PQ"]), 2)
        groups[entry["name"] in seen].append(float(entry["PQ"]))

    def mean(values):
        return round(sum(values) / len(values), 2) if values else math.nan

    return {"PQ_seen": mean(groups[True]), "PQ_unseen": mean(groups[False]), "per_class": per_class}


@contextmanager
def in_vocabulary_only(model):
    """Within the block the geometric ensemble keeps the in-vocabulary head's probabilities alone (alpha = beta = 0:
    p = p_in^1 * p_clip^0), for measuring what the out-of-vocabulary CLIP branch adds."""
    ensemble = model.ensemble
    saved = ensemble.alpha, ensemble.beta
    ensemble.alpha = ensemble.beta = 0.0
    try:
        yield model
    finally:
        ensemble.alpha, ensemble.beta = saved


def evaluate_toy_world(model, processor, num_images: int = 64, size: int = 128, seed: int = HELD_OUT_SEED,
                       class_ensemble: str | None = None, batch_size: int = 8, progress: bool = False) -> dict:
    """PQ (all classes), `PQ_seen`, `PQ_unseen` and `per_class` of `model` on `num_images` held-out toy-world scenes
    holding every class, the 18 class names as vocabulary. `class_ensemble`: as `evaluate_model`'s (default: the
    model configuration's, the geometric ensemble)."""
    from ..synthetic import TOY_SEEN_CLASSES, make_toy_world_dataset
    from .evaluate import evaluate_model

    rows = make_toy_world_dataset(num_images, size, seed=seed, split="all")
    results = evaluate_model(model, processor, rows, "panoptic", batch_size=batch_size, progress=progress,
                             class_ensemble=class_ensemble)
    return {"PQ": round(float(results["PQ"]), 2), **seen_unseen_pq(results, TOY_SEEN_CLASSES)}


def with_random_towers(model, seed: int = 0):
    """A copy of `model` whose frozen CLIP towers are freshly initialised (those of a fresh model built after
    `torch.manual_seed(seed)`): the control where CLIP knows nothing, the decoder unchanged."""
    import copy

    import torch

    from ..modeling_eovseg import EovSegForPanopticSegmentation

    with torch.random.fork_rng():  # the caller's random state stays as it was
        torch.manual_seed(seed)
        fresh = EovSegForPanopticSegmentation(model.config)
    control = copy.deepcopy(model)
    control.clip_backbone.load_state_dict(fresh.clip_backbone.state_dict())
    control.spatial_extractor.load_state_dict(fresh.spatial_extractor.state_dict())
    return control.eval()

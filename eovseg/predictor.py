"""The Predictor: a model (or an `eovseg export` run by `eovseg.runtime`) with one vocabulary, whose text pass is
done once, applied to batches of images, with results as segment maps for any subtask. `eovseg predict`, the web
page and the export runtime share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .loading import check_finite_outputs, has_stored_vocabulary

if TYPE_CHECKING:
    import torch

SUBTASKS = ("panoptic", "semantic", "instance")


class PredictError(ValueError):
    """A problem that stops the run before it starts (printed as one line)."""





class Predictor:
    """Runs the model on batches of images with one vocabulary, whose text pass is done once, and gives results as
    segment maps (`segmentation`: ids, 0 = none; `segments_info`: `id`, `label_id`, `score`) for any subtask."""

    def __init__(self, model, processor, class_names, is_thing, vocabulary_given: bool = True, subtask="panoptic",
                 threshold=0.0, overlap_mask_area_threshold=0.8, mask_threshold=0.5, colors=None):
        if subtask not in SUBTASKS:
            raise PredictError(f"subtask must be one of {SUBTASKS}, got {subtask!r}.")
        self.model, self.processor = model, processor
        self.class_names, self.is_thing = list(class_names), [bool(t) for t in is_thing]
        self.colors = colors  # the vocabulary's display colours, for the overlays (None: visualization's rule)
        self.subtask, self.threshold = subtask, float(threshold)
        self.overlap, self.mask_threshold = float(overlap_mask_area_threshold), float(mask_threshold)
        self.text = self._encode_vocabulary() if vocabulary_given or not has_stored_vocabulary(model) else {}

    @property
    def device(self) -> torch.device:
        return self.model.void_embedding.weight.device

    def _encode_vocabulary(self) -> dict:
        text = self.processor.encode_vocabulary(self.class_names)
        return {
            "text_embeddings": self.model.get_text_embeddings(text["input_ids"].to(self.device)),
            "synonym_counts": text["synonym_counts"].to(self.device),
            "class_seen_mask": text["class_seen_mask"].to(self.device),
        }

    def _forward(self, images: Sequence[Image.Image]):
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs, **self.text)
        check_finite_outputs(outputs)
        return outputs

    def __call__(self, images: Sequence[Image.Image], instances: bool = False) -> list[dict]:
        """One result per image, in order; with `instances`, each also has `instances` (an instance result with COCO
        RLEs). Only images of one processed size share a forward pass (`processed_size`), so each image's result is
        the one it gets alone (but for the float round-off of batched kernels)."""
        sizes = [(image.height, image.width) for image in images]
        results: list = [None] * len(images)
        for indices in self.processor.image_processor.group_by_processed_size(sizes):
            for index, result in zip(indices, self._segment([images[i] for i in indices], instances)):
                results[index] = result
        return results

    def _segment(self, images: Sequence[Image.Image], instances: bool) -> list[dict]:
        """The results of images of one processed size, in one forward pass."""
        outputs = self._forward(images)
        sizes = [(image.height, image.width) for image in images]
        if self.subtask == "panoptic":
            results = self.processor.post_process_panoptic_segmentation(
                outputs, threshold=self.threshold, mask_threshold=self.mask_threshold,
                overlap_mask_area_threshold=self.overlap, target_sizes=sizes,
                label_ids_to_fuse={i for i, thing in enumerate(self.is_thing) if not thing})
        elif self.subtask == "semantic":
            results = [_semantic_segments(m) for m in self.processor.post_process_semantic_segmentation(outputs, sizes)]
        else:
            results = [_shift_instance_ids(r) for r in self._instances(outputs, sizes, rle=False)]
        results = [{"segmentation": _as_id_map(r["segmentation"]), "segments_info": r["segments_info"]} for r in results]
        if instances:
            for result, found in zip(results, self._instances(outputs, sizes, rle=True)):
                result["instances"] = found
        return results

    def _instances(self, outputs, sizes, rle: bool):
        things = [i for i, thing in enumerate(self.is_thing) if thing]
        return self.processor.post_process_instance_segmentation(
            outputs, threshold=self.threshold, mask_threshold=self.mask_threshold, target_sizes=sizes,
            thing_ids=things or None, return_coco_annotation=rle)


def _as_id_map(segmentation) -> np.ndarray:
    ids = segmentation.cpu().numpy().astype(np.int64) if hasattr(segmentation, "cpu") else np.asarray(segmentation)
    return np.where(ids > 0, ids, 0)


def _semantic_segments(class_map) -> dict:
    """A semantic map as segments: one per class present, id = class index + 1 (no score: 1.0)."""
    class_map = class_map.cpu().numpy().astype(np.int64)
    infos = [{"id": int(c) + 1, "label_id": int(c), "score": 1.0} for c in np.unique(class_map)]
    return {"segmentation": class_map + 1, "segments_info": infos}


def _shift_instance_ids(result: dict) -> dict:
    """Instance ids 0, 1, ... (-1 = none) as segment ids 1, 2, ... (0 = none)."""
    import torch

    infos = [dict(s, id=int(s["id"]) + 1) for s in result["segments_info"]]
    return {"segmentation": result["segmentation"].to(torch.int64) + 1, "segments_info": infos}

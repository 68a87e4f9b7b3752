"""An open-vocabulary segmentation pipeline: `pipeline("open-vocabulary-segmentation", model=DIR)` takes the
classes to find at call time (`candidate_labels`), as the zero-shot pipelines do.

    segmenter = pipeline("open-vocabulary-segmentation", model="eovseg-r50")
    segmenter("street.jpg", candidate_labels=["car", "road, street", "sky"], stuff_labels=["road, street", "sky"])

`candidate_labels` (or `vocabulary=`) may also name a built-in vocabulary (`candidate_labels="ade20k_150"`, see
`eovseg.vocabularies`). Without `candidate_labels` the model's default vocabulary is used. Text embeddings are cached
by the model, so calling again with the same labels costs no text pass. The defaults reproduce the original's panoptic inference (object
threshold 0.0, overlap 0.8, stuff merged).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline

from .inputs import load_image
from .vocabulary import display_name, validate_vocabulary

TASK = "open-vocabulary-segmentation"


class OpenVocabularySegmentationPipeline(Pipeline):
    """Panoptic, semantic or instance segmentation of an image with a class list given at call time.

    Each result is a list of `{"score", "label", "mask"}` dicts like the image-segmentation pipeline's (`mask` a
    binary `PIL.Image` at the input's size; `score` is None for semantic segmentation).
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    # The tokenizer is always open_clip's, which the processor builds offline: a model folder needs no tokenizer files.
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .processing import EovSegProcessor

        self.processor = EovSegProcessor(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            train_vocabulary=self.model.config.train_vocabulary,
        )

    def _sanitize_parameters(self, candidate_labels=None, stuff_labels=None, subtask=None, threshold=None,
                             overlap_mask_area_threshold=None, mask_threshold=None, timeout=None, vocabulary=None,
                             class_ensemble=None, score_mode=None, iou_threshold=None, **kwargs):
        if vocabulary is not None:
            if candidate_labels is not None:
                raise ValueError("Give either candidate_labels or vocabulary (the same thing), not both.")
            candidate_labels = vocabulary
        preprocess = {"candidate_labels": candidate_labels, "stuff_labels": stuff_labels, "timeout": timeout,
                      "class_ensemble": class_ensemble}
        postprocess = {"subtask": subtask or "panoptic"}
        # OPSNet's options: class scoring (Embedding Modulation) and mask scoring (Mask Filtering), per call
        for name, value in (("score_mode", score_mode), ("iou_threshold", iou_threshold)):
            if value is not None:
                postprocess[name] = value
        if postprocess["subtask"] not in ("panoptic", "semantic", "instance"):
            raise ValueError(f"subtask must be 'panoptic', 'semantic' or 'instance', got {subtask!r}.")
        for name, value in (("threshold", threshold), ("overlap_mask_area_threshold", overlap_mask_area_threshold),
                            ("mask_threshold", mask_threshold)):
            if value is not None:
                postprocess[name] = value
        return preprocess, {}, postprocess

    def __call__(self, inputs, batch_size: int | None = None, **kwargs) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Segment one image or a list of images. `batch_size` > 1 runs a list through the model up to that many
        images at a time. Only images of the same processed (resized and padded) size share a batch: padding an
        image to another's size changes its features (the interpolated positional embeddings, the borders), so each
        image is computed as it is alone. Results come in the order of `inputs` and are those of `batch_size=1` but
        for the float round-off of batched kernels (about 1e-6 on the logits)."""
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not batch_size or batch_size == 1 or not isinstance(inputs, (list, tuple)):
            return super().__call__(inputs, **kwargs)
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        timeout = preprocess_params.pop("timeout")
        vocabulary = self._vocabulary_inputs(**preprocess_params)
        results = [None] * len(inputs)
        pending: dict[tuple, list] = {}  # processed size -> [(index in inputs, image inputs)]
        for index, image in enumerate(inputs):
            image_inputs = self._image_inputs(image, timeout)
            size = tuple(image_inputs[0]["pixel_values"].shape[-2:])
            pending.setdefault(size, []).append((index, image_inputs))
            if len(pending[size]) == batch_size:
                self._run_batch(pending.pop(size), vocabulary, results, forward_params, postprocess_params)
            elif sum(map(len, pending.values())) >= 2 * batch_size:  # many sizes: bound the images held waiting
                fullest = max(pending, key=lambda key: len(pending[key]))
                self._run_batch(pending.pop(fullest), vocabulary, results, forward_params, postprocess_params)
        for group in pending.values():
            self._run_batch(group, vocabulary, results, forward_params, postprocess_params)
        return results

    def _run_batch(self, group: list, vocabulary: dict, results: list, forward_params: dict, postprocess_params: dict):
        model_inputs = self._model_inputs([image_inputs for _, image_inputs in group], vocabulary)
        with self.device_placement(), torch.inference_mode():
            model_inputs["inputs"] = self._ensure_tensor_on_device(model_inputs["inputs"], device=self.device)
            model_outputs = self._forward(model_inputs, **forward_params)
        for (index, _), annotation in zip(group, self._annotate(model_outputs, **postprocess_params)):
            results[index] = annotation

    def preprocess(self, image, candidate_labels=None, stuff_labels=None, timeout=None, class_ensemble=None):
        vocabulary = self._vocabulary_inputs(candidate_labels, stuff_labels, class_ensemble)
        return self._model_inputs([self._image_inputs(image, timeout)], vocabulary)

    def _vocabulary_inputs(self, candidate_labels=None, stuff_labels=None, class_ensemble=None) -> dict:
        """The call's class entries, thing flags and class scoring, and the text tensors for the model (none for the
        default vocabulary, whose embeddings the model keeps)."""
        config = self.model.config
        if candidate_labels is None:
            if stuff_labels is not None:
                raise ValueError("stuff_labels needs candidate_labels: the default vocabulary's stuff classes are "
                                 "fixed by config.is_thing.")
            if not config.vocabulary:
                raise ValueError("This model has no default vocabulary: pass candidate_labels=[...].")
            labels, is_thing = list(config.vocabulary), list(config.is_thing)
        else:
            labels, is_thing = _resolve_labels(candidate_labels, stuff_labels)
        class_ensemble = class_ensemble or config.class_ensemble
        if candidate_labels is not None:
            text = self.processor(text=labels, return_tensors="pt", class_ensemble=class_ensemble)
        elif class_ensemble == "embedding_modulation":
            text = self.processor.encode_train_vocabulary(return_tensors="pt")
        else:
            text = {}
        return {"text": dict(text), "labels": labels, "is_thing": is_thing, "class_ensemble": class_ensemble}

    def _image_inputs(self, image, timeout=None) -> tuple[dict, tuple[int, int]]:
        """One image's model inputs (a batch of one) and its (height, width)."""
        image = load_image(image, timeout=timeout)
        pixels = dict(self.image_processor([image], return_tensors="pt"))
        pixels["pixel_values"] = pixels["pixel_values"].to(self.dtype)
        return pixels, (image.height, image.width)

    @staticmethod
    def _model_inputs(images: list[tuple[dict, tuple[int, int]]], vocabulary: dict) -> dict:
        """The model inputs of images of one processed size, with the call's vocabulary."""
        pixels = {key: torch.cat([inputs[key] for inputs, _ in images]) for key in images[0][0]}
        return {"inputs": {**pixels, **vocabulary["text"]}, "target_sizes": [size for _, size in images],
                **{key: vocabulary[key] for key in ("labels", "is_thing", "class_ensemble")}}

    def _forward(self, model_inputs):
        outputs = self.model(**model_inputs.pop("inputs"), class_ensemble=model_inputs["class_ensemble"])
        return {"outputs": outputs, **model_inputs}

    def postprocess(self, model_outputs, **kwargs):
        return self._annotate(model_outputs, **kwargs)[0]

    def _annotate(self, model_outputs, subtask="panoptic", threshold=0.0, overlap_mask_area_threshold=0.8,
                  mask_threshold=0.5, score_mode="class", iou_threshold=0.0) -> list[list[dict[str, Any]]]:
        """The annotation of every image of a model output."""
        outputs, labels, is_thing = model_outputs["outputs"], model_outputs["labels"], model_outputs["is_thing"]
        targets = model_outputs["target_sizes"]
        names = [display_name(label) for label in labels]
        if subtask == "semantic":
            maps = self.processor.post_process_semantic_segmentation(outputs, target_sizes=targets)
            return [_semantic_annotation(segmentation.cpu().numpy(), names) for segmentation in maps]
        if subtask == "panoptic":
            results = self.processor.post_process_panoptic_segmentation(
                outputs, threshold=threshold, mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_mask_area_threshold,
                label_ids_to_fuse={i for i, thing in enumerate(is_thing) if not thing}, target_sizes=targets,
                score_mode=score_mode, iou_threshold=iou_threshold,
            )
        else:
            results = self.processor.post_process_instance_segmentation(
                outputs, threshold=threshold, mask_threshold=mask_threshold, target_sizes=targets,
                thing_ids=[i for i, thing in enumerate(is_thing) if thing],
            )
        return [_segments_annotation(result, names) for result in results]


def _semantic_annotation(segmentation: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    return [
        {"score": None, "label": names[label_id],
         "mask": Image.fromarray(((segmentation == label_id) * 255).astype(np.uint8), mode="L")}
        for label_id in np.unique(segmentation)
    ]


def _segments_annotation(result: dict, names: list[str]) -> list[dict[str, Any]]:
    segmentation = result["segmentation"].cpu()
    return [
        {"score": float(segment["score"]), "label": names[segment["label_id"]],
         "mask": Image.fromarray(((segmentation == segment["id"]).numpy() * 255).astype(np.uint8), mode="L")}
        for segment in result["segments_info"]
    ]


def _resolve_labels(candidate_labels, stuff_labels) -> tuple[list[str], list[bool]]:
    """Class entries and thing flags from a built-in vocabulary name (its own thing flags unless `stuff_labels` is
    given) or a list of labels (things unless in `stuff_labels`)."""
    from .vocabularies import list_vocabularies, load_vocabulary

    if isinstance(candidate_labels, str) and candidate_labels not in list_vocabularies() and not os.path.isfile(candidate_labels):
        raise ValueError(_not_a_vocabulary_name_message(candidate_labels, list_vocabularies()))
    vocabulary = load_vocabulary(candidate_labels)
    labels = validate_vocabulary(vocabulary.class_names, "candidate_labels")
    if stuff_labels is None:
        return labels, list(vocabulary.is_thing)
    stuff = {stuff_labels} if isinstance(stuff_labels, str) else set(stuff_labels)
    unknown = stuff - set(labels)
    if unknown:
        raise ValueError(f"stuff_labels {sorted(unknown)} are not among the candidate_labels.")
    return labels, [label not in stuff for label in labels]


def _not_a_vocabulary_name_message(text: str, names: list[str]) -> str:
    # commas separate the synonyms of one class here: splitting the string would be a guess, so only the example does
    classes = [part.strip() for part in text.split(",") if part.strip()] or ["car"]
    synonyms = (f" (within one entry commas separate synonyms of one class: {json.dumps([text], ensure_ascii=False)} "
                "is one class)" if len(classes) > 1 else "")
    return (
        f"candidate_labels={text!r} is not a built-in vocabulary name ({', '.join(names)}) nor a vocabulary file. "
        f"Pass your classes as a list: candidate_labels={json.dumps(classes, ensure_ascii=False)}{synonyms}."
    )


def register_pipeline() -> None:
    from transformers import AutoModelForUniversalSegmentation
    from transformers.pipelines import PIPELINE_REGISTRY

    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=OpenVocabularySegmentationPipeline, pt_model=AutoModelForUniversalSegmentation,
            type="multimodal",
        )

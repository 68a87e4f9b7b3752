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
        """Segment one image or a list of images. `batch_size` > 1 runs a list through the model that many images
        at a time (padded to a common size, each cropped back by its own pixel mask); results are the same as one by
        one up to float round-off."""
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not batch_size or batch_size == 1 or not isinstance(inputs, (list, tuple)):
            return super().__call__(inputs, **kwargs)
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        results = []
        for start in range(0, len(inputs), batch_size):
            model_inputs = self._prepare(list(inputs[start : start + batch_size]), **preprocess_params)
            with self.device_placement(), torch.inference_mode():
                model_inputs["inputs"] = self._ensure_tensor_on_device(model_inputs["inputs"], device=self.device)
                model_outputs = self._forward(model_inputs, **forward_params)
            results.extend(self._annotate(model_outputs, i, **postprocess_params)
                           for i in range(len(model_outputs["target_sizes"])))
        return results

    def preprocess(self, image, candidate_labels=None, stuff_labels=None, timeout=None, class_ensemble=None):
        return self._prepare([image], candidate_labels, stuff_labels, timeout, class_ensemble)

    def _prepare(self, images: list, candidate_labels=None, stuff_labels=None, timeout=None, class_ensemble=None):
        images = [load_image(image, timeout=timeout) for image in images]
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
        inputs = self.processor(images=images, text=None if candidate_labels is None else labels, return_tensors="pt",
                                class_ensemble=class_ensemble)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        target_sizes = [(image.height, image.width) for image in images]
        return {"inputs": inputs, "target_sizes": target_sizes, "labels": labels, "is_thing": is_thing,
                "class_ensemble": class_ensemble}

    def _forward(self, model_inputs):
        outputs = self.model(**model_inputs.pop("inputs"), class_ensemble=model_inputs["class_ensemble"])
        return {"outputs": outputs, **model_inputs}

    def postprocess(self, model_outputs, **kwargs):
        return self._annotate(model_outputs, 0, **kwargs)

    def _annotate(self, model_outputs, index: int, subtask="panoptic", threshold=0.0, overlap_mask_area_threshold=0.8,
                  mask_threshold=0.5, score_mode="class", iou_threshold=0.0):
        """The annotation of image `index` of a (possibly batched) model output."""
        outputs, labels, is_thing = model_outputs["outputs"], model_outputs["labels"], model_outputs["is_thing"]
        outputs = _select_image(outputs, index)
        target = [model_outputs["target_sizes"][index]]
        names = [display_name(label) for label in labels]
        annotation = []
        if subtask == "semantic":
            segmentation = self.processor.post_process_semantic_segmentation(outputs, target_sizes=target)[0].cpu().numpy()
            for label_id in np.unique(segmentation):
                mask = Image.fromarray(((segmentation == label_id) * 255).astype(np.uint8), mode="L")
                annotation.append({"score": None, "label": names[label_id], "mask": mask})
            return annotation
        if subtask == "panoptic":
            result = self.processor.post_process_panoptic_segmentation(
                outputs, threshold=threshold, mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_mask_area_threshold,
                label_ids_to_fuse={i for i, thing in enumerate(is_thing) if not thing}, target_sizes=target,
                score_mode=score_mode, iou_threshold=iou_threshold,
            )[0]
        else:
            result = self.processor.post_process_instance_segmentation(
                outputs, threshold=threshold, mask_threshold=mask_threshold, target_sizes=target,
                thing_ids=[i for i, thing in enumerate(is_thing) if thing],
            )[0]
        segmentation = result["segmentation"].cpu()
        for segment in result["segments_info"]:
            mask = Image.fromarray(((segmentation == segment["id"]).numpy() * 255).astype(np.uint8), mode="L")
            annotation.append({"score": float(segment["score"]), "label": names[segment["label_id"]], "mask": mask})
        return annotation


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


def _select_image(outputs, index: int):
    """Image `index` of a batched model output, as a batch of one (the vocabulary-wide fields stay whole)."""
    if outputs.class_queries_logits.shape[0] == 1:
        return outputs
    per_image = ("class_queries_logits", "masks_queries_logits", "image_sizes", "out_of_vocabulary_logits",
                 "iou_scores")
    fields = {key: value for key, value in outputs.items()}
    for key in per_image:
        if fields.get(key) is not None:
            fields[key] = fields[key][index : index + 1]
    for key in ("stage_class_queries_logits", "stage_masks_queries_logits", "stage_iou_scores"):
        if fields.get(key) is not None:
            fields[key] = tuple(value[index : index + 1] for value in fields[key])
    return type(outputs)(**fields)


def register_pipeline() -> None:
    from transformers import AutoModelForUniversalSegmentation
    from transformers.pipelines import PIPELINE_REGISTRY

    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=OpenVocabularySegmentationPipeline, pt_model=AutoModelForUniversalSegmentation,
            type="multimodal",
        )

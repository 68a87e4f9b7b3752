"""Processor of EOV-Seg: the image processor plus the open_clip-exact tokenization of a class vocabulary."""

import importlib
import os
import re
from collections.abc import Sequence

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import CLIPTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack
from transformers.utils import logging

from ..configuration_eovseg import check_pretrained_source, check_save_directory, complete_saved_folder
from ..vocabulary import VocabularyError, build_prompts, seen_class_mask, synonym_counts, validate_vocabulary
from .image_processing_eovseg import EovSegImageProcessorKwargs
from .tokenization_eovseg import DEFAULT_CONTEXT_LENGTH, build_clip_tokenizer, check_clip_tokenizer, clip_token_ids


# Keys of the vocabulary part of the processor output; they are arguments of the model's forward.
TEXT_INPUT_NAMES = ["input_ids", "synonym_counts", "class_seen_mask"]

logger = logging.get_logger(__name__)


# The image processor's backend when none is asked for: PIL, whose resize the released weights were made with.
DEFAULT_IMAGE_BACKEND = "pil"

# The text options the vocabulary path honours (its prompts are tokenized as open_clip does; see encode_vocabulary).
VOCABULARY_TEXT_KWARGS = ("padding", "max_length", "truncation", "return_tensors")


class EovSegProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: EovSegImageProcessorKwargs


def _option_type_message(error: StrictDataclassFieldValidationError) -> str:
    """One line for an option of the wrong type that transformers' `ProcessingKwargs` validation refused: the
    option's name, the types it takes and the value given (from the cause's "Field 'X' with value V doesn't match
    any type in (...)")."""
    cause = str(error.__cause__ or error).strip()
    found = re.match(r"Field '(?P<name>[^']+)' with value (?P<value>.*) doesn't match any type in \((?P<types>.*?)\)\.",
                     cause, re.DOTALL)
    if found is None:
        return f"`{error.field}` has the wrong type: {cause.splitlines()[0] if cause else type(error).__name__}"
    types = re.sub(r"<class '([\w.]+)'>", r"\1", found["types"]).replace("NoneType", "None")
    return f"`{found['name']}` must be one of {types}, got {found['value']}."


def _image_processor_class(backend: str | None = None):
    """The image processor class of a transformers backend name ("pil", "torchvision"; None: the default)."""
    # Imported here: the PIL module imports the torchvision one, which this module's kwargs class comes from.
    from .image_processing_eovseg import EovSegImageProcessor
    from .image_processing_pil_eovseg import EovSegImageProcessorPil

    classes = {"pil": EovSegImageProcessorPil, "torchvision": EovSegImageProcessor}
    backend = DEFAULT_IMAGE_BACKEND if backend is None else backend
    if backend not in classes:
        raise ValueError(f"backend must be 'pil' or 'torchvision', got {backend!r}.")
    return classes[backend]


class EovSegProcessor(ProcessorMixin):
    r"""
    Processor of [`EovSegForPanopticSegmentation`]: an [`EovSegImageProcessor`] for images (and segmentation maps)
    and a [`CLIPTokenizer`] with open_clip's vocabulary for the class vocabulary.

    A *vocabulary* is a list of class entries, each a string of comma-separated synonyms (for example
    `["person, child, girl", "car", "sky"]`). Every synonym is put into the 14 prompt templates of
    [`eovseg.vocabulary.PROMPT_TEMPLATES`] and tokenized exactly as `open_clip.get_tokenizer(...)` does.

    Keyword arguments of a call follow transformers' `ProcessingKwargs`: given flat (`size=...`, `max_length=...`) or
    by modality (`images_kwargs={...}`, `text_kwargs={...}`, `common_kwargs={...}`), with the sub-processors'
    settings as defaults; the same option given both ways is an error, an option no part takes is refused.
    `return_tensors` defaults to `"pt"` for both parts (the processor's `images_kwargs` / `text_kwargs` attributes).

    Args:
        image_processor ([`EovSegImageProcessorPil`] or [`EovSegImageProcessor`], *optional*):
            The image processor; the PIL backend's default one when not given.
        tokenizer ([`CLIPTokenizer`], *optional*):
            open_clip's CLIP tokenizer (see [`build_clip_tokenizer`]); built offline when not given. It is checked to
            reproduce open_clip's ids.
        train_vocabulary (`list[str]`, *optional*):
            The vocabulary the model was trained on. A class of a test vocabulary is *seen* when one of its synonyms
            is a synonym of a training class (`class_seen_mask`). Saved with the processor.
        context_length (`int`, *optional*, defaults to 77):
            Context length of the CLIP text tower: prompts longer than this are truncated (keeping the end token).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        train_vocabulary: Sequence[str] | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        **kwargs,
    ):
        if image_processor is None:
            image_processor = _image_processor_class()()
        if tokenizer is None:
            tokenizer = build_clip_tokenizer(context_length=context_length)
        check_clip_tokenizer(tokenizer)
        if isinstance(train_vocabulary, str) or not isinstance(train_vocabulary, (Sequence, type(None))):
            raise TypeError(
                f"train_vocabulary must be a list of class-name strings, got {type(train_vocabulary).__name__}."
            )
        train_vocabulary = list(train_vocabulary or [])
        bad = [(i, c) for i, c in enumerate(train_vocabulary) if not isinstance(c, str)]
        if bad:
            i, c = bad[0]
            raise TypeError(f"train_vocabulary must contain only strings; entry {i} is {type(c).__name__} ({c!r}).")
        if not isinstance(context_length, int) or context_length < 3:
            raise ValueError(f"context_length must be an int of at least 3, got {context_length!r}.")
        self.train_vocabulary = train_vocabulary
        self.context_length = context_length
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_config(cls, config, backend: str | None = None, **image_processor_kwargs) -> "EovSegProcessor":
        """Build the processor of a model configuration ([`EovSegConfig`]): an image processor (of `backend`,
        `"pil"` by default, or `"torchvision"`) with the configuration's `pixel_mean`, `pixel_std` (0-255 units) and
        `size_divisibility`, the offline open_clip tokenizer and the configuration's `train_vocabulary`. Keyword
        arguments are passed to the image processor and override what the configuration gives."""
        image_processor_class = _image_processor_class(backend)
        if hasattr(image_processor_class, "from_config"):
            image_processor = image_processor_class.from_config(config, **image_processor_kwargs)
        else:
            # EovSegImageProcessor takes its statistics in 0-255 units, like the configuration.
            kwargs = {
                "image_mean": list(config.pixel_mean),
                "image_std": list(config.pixel_std),
                "size_divisibility": config.size_divisibility,
            }
            kwargs.update(image_processor_kwargs)
            image_processor = image_processor_class(**kwargs)
        context_length = int(config.clip_model_config.get("text_cfg", {}).get("context_length", DEFAULT_CONTEXT_LENGTH))
        return cls(
            image_processor=image_processor,
            tokenizer=build_clip_tokenizer(context_length=context_length),
            train_vocabulary=list(getattr(config, "train_vocabulary", None) or []),
            context_length=context_length,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "EovSegProcessor":
        check_pretrained_source(pretrained_model_name_or_path)  # "not found", not "Repo id must be in the form ..."
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        check_save_directory(save_directory)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        complete_saved_folder(save_directory)  # the auto_map entries, whichever of model and processor came first
        return result

    @classmethod
    def _resolve_subprocessors(cls, pretrained_model_name_or_path, processor_dict, **kwargs):
        # transformers >= 5.25 loads sub-processors here (through AutoTokenizer, which cannot build open_clip's
        # tokenizer from a folder saved without tokenizer files): hand it ours, already loaded. `backend` is the
        # image processor's ("pil", the default, or "torchvision", as AutoImageProcessor's argument), never the
        # tokenizer's (which reads a `backend` argument of its own).
        backend = kwargs.pop("backend", None)
        if kwargs.get("image_processor") is None or kwargs.get("tokenizer") is None:
            image_processor, tokenizer = cls._get_arguments_from_pretrained(
                pretrained_model_name_or_path, processor_dict, backend=backend, **kwargs
            )
            for name, loaded in (("image_processor", image_processor), ("tokenizer", tokenizer)):
                if kwargs.get(name) is None:
                    kwargs[name] = loaded
        return super()._resolve_subprocessors(pretrained_model_name_or_path, processor_dict, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, backend=None, **kwargs):
        # The sub-processors are loaded with their own classes, so nothing has to be registered with the Auto classes.
        kwargs = {key: value for key, value in kwargs.items() if key not in ("image_processor", "tokenizer")}
        subfolder = kwargs.pop("subfolder", "")
        image_processor = _image_processor_class(backend).from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        local = os.path.join(str(pretrained_model_name_or_path), subfolder)
        if os.path.isdir(local) and not os.path.isfile(os.path.join(local, "tokenizer.json")):
            # The tokenizer is always open_clip's: a folder saved without its files (3.6 MB, as the bundled demo
            # model) gets it built offline.
            context_length = (processor_dict or {}).get("context_length", DEFAULT_CONTEXT_LENGTH)
            tokenizer = build_clip_tokenizer(context_length=context_length)
        else:
            tokenizer = CLIPTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]

    @property
    def model_input_names(self) -> list[str]:
        image_names = list(getattr(self.image_processor, "model_input_names", ["pixel_values"]))
        return image_names + [name for name in TEXT_INPUT_NAMES if name not in image_names]

    valid_processor_kwargs = EovSegProcessorKwargs
    # Defaults of a call's kwargs (transformers' lowest priority): tensors for the model unless asked otherwise.
    images_kwargs = {"return_tensors": "pt"}
    text_kwargs = {"return_tensors": "pt"}

    def __call__(
        self,
        images=None,
        text: Sequence[str] | str | None = None,
        segmentation_maps=None,
        segments_info=None,
        class_ensemble: str | None = None,
        **kwargs: Unpack[EovSegProcessorKwargs],
    ) -> BatchFeature:
        """Prepare images and/or a vocabulary for the model.

        Args:
            images: images for the image processor (one image or a list).
            text (`list[str]` or `str`, *optional*):
                The vocabulary: one string of comma-separated synonyms per class, or the name of a built-in
                vocabulary (`"ade20k_150"`, see `eovseg.vocabularies.list_vocabularies()`).
            segmentation_maps: optional segmentation maps, passed to the image processor with the images.
            segments_info: optional COCO `segments_info` of the maps (panoptic targets), passed along with them.
            class_ensemble (`str`, *optional*):
                `"embedding_modulation"` also encodes `train_vocabulary` as `train_input_ids` / `train_synonym_counts`,
                which OPSNet's Embedding Modulation compares the test vocabulary with (select it in the model with
                `class_ensemble="embedding_modulation"` or `config.class_ensemble`). `"geometric"` / None: nothing more.
            kwargs ([`EovSegProcessorKwargs`]): options of the image processor (`size`, `do_resize`, ...) and of the
                vocabulary (`padding`, `max_length`, `truncation`, see [`encode_vocabulary`]), flat or in
                `images_kwargs` / `text_kwargs`, and `return_tensors` (`"pt"` by default, `"np"`, or None: Python
                lists for the text part), flat, per modality or in `common_kwargs`.

        Returns:
            [`BatchFeature`] with the image processor's outputs (when `images` is given) and, when `text` is given,
            `input_ids` `(num_prompts, length)`, `synonym_counts` `(num_classes,)` and `class_seen_mask`
            `(num_classes,)` (see [`encode_vocabulary`]).
        """
        if images is None and text is None:
            raise ValueError("Give images, a vocabulary (text) or both to the EOV-Seg processor.")
        if images is None and (segmentation_maps is not None or segments_info is not None):
            raise ValueError("segmentation_maps / segments_info were given without images.")
        if class_ensemble not in (None, "geometric", "embedding_modulation"):
            raise ValueError(f"class_ensemble must be 'geometric' or 'embedding_modulation', got {class_ensemble!r}.")
        self._check_call_kwargs(kwargs)
        try:
            merged = self._merge_kwargs(
                EovSegProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
            )
        except StrictDataclassFieldValidationError as error:  # several lines of huggingface_hub's type checks
            raise TypeError(_option_type_message(error)) from None
        encoded = BatchFeature()
        if images is not None:
            encoded.update(self.image_processor(
                images, segmentation_maps=segmentation_maps, segments_info=segments_info, **merged["images_kwargs"]
            ))
        if text is not None:
            encoded.update(self.encode_vocabulary(text, **merged["text_kwargs"]))
        if class_ensemble == "embedding_modulation":
            encoded.update(self.encode_train_vocabulary(**merged["text_kwargs"]))
        return encoded

    def _check_call_kwargs(self, kwargs: dict) -> None:
        """Refuse an option no part of the processor takes (transformers would warn and drop it) and modality
        dictionaries of modalities this processor has not (`videos_kwargs`, `audio_kwargs`)."""
        image_keys = set(getattr(self.image_processor, "valid_kwargs", EovSegImageProcessorKwargs).__annotations__)
        flat_keys = {key for key in EovSegProcessorKwargs.__annotations__ if not key.endswith("_kwargs")}
        known = image_keys | set(TextKwargs.__annotations__) | flat_keys | {"images_kwargs", "text_kwargs", "common_kwargs"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"EovSegProcessor got unexpected keyword argument(s) {unknown}: it takes image processor options "
                "(or images_kwargs=...), vocabulary options (padding, max_length, truncation or text_kwargs=...), "
                "common_kwargs=... and return_tensors."
            )
        for key in ("images_kwargs", "text_kwargs", "common_kwargs"):
            if key in kwargs and not isinstance(kwargs[key], dict):
                raise TypeError(f"{key} must be a dict of options, got {type(kwargs[key]).__name__}.")

    def encode_train_vocabulary(self, return_tensors: str | None = "pt", **text_options) -> BatchFeature:
        """`train_input_ids` and `train_synonym_counts`: the prompts of `train_vocabulary`, as [`encode_vocabulary`]
        makes them (with the same `text_options`), for OPSNet's Embedding Modulation."""
        if not self.train_vocabulary:
            raise ValueError(
                "Embedding Modulation compares the test vocabulary with the training vocabulary, but this processor "
                "has none: set processor.train_vocabulary (the model's config.train_vocabulary)."
            )
        encoded = self.encode_vocabulary(self.train_vocabulary, return_tensors=return_tensors, **text_options)
        return BatchFeature(
            {"train_input_ids": encoded["input_ids"], "train_synonym_counts": encoded["synonym_counts"]}
        )

    def encode_vocabulary(
        self,
        class_names: Sequence[str],
        return_tensors: str | None = "pt",
        padding: bool | str | None = None,
        max_length: int | None = None,
        truncation: bool | str | None = None,
        **unsupported,
    ) -> BatchFeature:
        """Tokenize the prompts of a vocabulary.

        Args:
            class_names (`list[str]` or `str`): one string of comma-separated synonyms per class, or the name of a
                built-in vocabulary.
            return_tensors (`str`, *optional*, defaults to `"pt"`): `"pt"`, `"np"` or `None` (lists).
            padding (`bool` or `str`, *optional*, defaults to `"longest"`): `"longest"` (or True) pads the rows to the
                longest prompt, `"max_length"` to `max_length`, `"do_not_pad"` (or False) leaves them as they are
                (then only with `return_tensors=None`).
            max_length (`int`, *optional*, defaults to `context_length`): the most tokens of a row, start and end
                tokens included; at most the text tower's `context_length`.
            truncation (`bool` or `str`, *optional*, defaults to True): longer prompts are cut to `max_length`
                keeping their end token, as open_clip cuts them (with a warning); False refuses them instead.
            unsupported: other tokenizer options (`add_special_tokens`, `stride`, ...) are refused: the prompts are
                tokenized as open_clip does.

        Returns:
            [`BatchFeature`] with
            - `input_ids` (`(P, L)` int64): the prompts of `build_prompts(class_names)` (for each class, each synonym,
              each template; `P` = number of synonyms x 14) with open_clip's ids, `L` the longest prompt including
              its start and end tokens (at most `max_length`), padded with 0. The end token (49407) is the
              largest id of each row.
            - `synonym_counts` (`(K,)` int64): the number of synonyms of each class.
            - `class_seen_mask` (`(K,)` bool): whether each class is seen in `train_vocabulary`.
        """
        refused = sorted(key for key, value in unsupported.items() if value is not None)
        if refused:
            raise ValueError(
                f"The vocabulary's prompts are tokenized as open_clip does: text options {refused} do not apply "
                f"(only {', '.join(VOCABULARY_TEXT_KWARGS)} do)."
            )
        if return_tensors not in (None, "pt", "torch", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        max_length = self._checked_max_length(max_length)
        pad_to = self._padding_length(padding, max_length, return_tensors)
        if isinstance(class_names, str):
            class_names = _builtin_class_names(class_names)
        class_names = validate_vocabulary(class_names)
        prompts = build_prompts(class_names)
        ids = clip_token_ids(self.tokenizer, prompts)
        max_content = max_length - 2
        too_long = [prompt for prompt, content in zip(prompts, ids) if len(content) > max_content]
        if too_long and truncation in (False, "do_not_truncate"):
            raise ValueError(
                f"{len(too_long)} prompt(s) are longer than max_length={max_length} tokens, e.g. {too_long[0][:80]!r}, "
                "and truncation is off: shorten the class names or allow truncation."
            )
        longest = min(max(len(x) for x in ids), max_content) + 2
        input_ids = np.zeros((len(prompts), longest), dtype=np.int64)
        sot, eot = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        rows = [[sot] + content[:max_content] + [eot] for content in ids]
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
        counts = np.asarray(synonym_counts(class_names), dtype=np.int64)
        self._check_prompts(class_names, too_long, input_ids, counts, max_length)
        seen = np.asarray(seen_class_mask(class_names, self.train_vocabulary), dtype=bool)
        if pad_to is not None and pad_to > longest:
            input_ids = np.pad(input_ids, ((0, 0), (0, pad_to - longest)))
        data = {"input_ids": input_ids, "synonym_counts": counts, "class_seen_mask": seen}
        if return_tensors in ("pt", "torch"):
            data = {k: torch.from_numpy(v) for k, v in data.items()}
        elif return_tensors is None:
            data = {k: v.tolist() for k, v in data.items()}
            if pad_to is None:
                data["input_ids"] = rows
        return BatchFeature(data)

    def _checked_max_length(self, max_length) -> int:
        if max_length is None:
            return self.context_length
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or not (
            3 <= max_length <= self.context_length
        ):
            raise ValueError(
                f"max_length must be an int from 3 to the text tower's context length {self.context_length} (start "
                f"and end tokens included), got {max_length!r}."
            )
        return int(max_length)

    @staticmethod
    def _padding_length(padding, max_length: int, return_tensors) -> int | None:
        """The row length `padding` asks for: 0 for the longest prompt, `max_length`, or None (no padding)."""
        padding = getattr(padding, "value", padding)  # transformers' PaddingStrategy
        if padding in (None, True, "longest"):
            return 0
        if padding == "max_length":
            return max_length
        if padding in (False, "do_not_pad"):
            if return_tensors is not None:
                raise ValueError(
                    "padding=False leaves the prompts' rows of different lengths, which make no tensor: pad them or "
                    "use return_tensors=None."
                )
            return None
        raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}.")

    def _check_prompts(self, class_names, cut, input_ids, counts, max_length) -> None:
        """Warn when prompts are cut to `max_length`; refuse classes the model could not tell apart (their prompts
        have the same token ids: "car" and "Car", or long names differing only after the cut)."""
        if cut:
            logger.warning(
                f"{len(cut)} prompt(s) are longer than {max_length} tokens (the text tower's context or max_length) and "
                f"were cut, e.g. {cut[0][:80]!r}...: class names differing only after the cut get the same embedding."
            )
        first_class: dict[bytes, int] = {}
        end = np.cumsum(counts) * (input_ids.shape[0] // max(int(counts.sum()), 1))
        for k, (start, stop) in enumerate(zip(np.concatenate([[0], end[:-1]]), end)):
            key = input_ids[start:stop].tobytes()
            if key in first_class:
                raise VocabularyError(
                    f"Classes {first_class[key]} ({class_names[first_class[key]]!r}) and {k} ({class_names[k]!r}) "
                    "give identical prompts after tokenization (case and punctuation are normalized, long prompts "
                    "are cut): the model cannot tell them apart. Merge them or rename one."
                )
            first_class[key] = k

    def post_process_panoptic_segmentation(self, *args, **kwargs):
        """Forwards all arguments to [`EovSegImageProcessor.post_process_panoptic_segmentation`]."""
        return self.image_processor.post_process_panoptic_segmentation(*args, **kwargs)

    def post_process_semantic_segmentation(self, *args, **kwargs):
        """Forwards all arguments to [`EovSegImageProcessor.post_process_semantic_segmentation`]."""
        return self.image_processor.post_process_semantic_segmentation(*args, **kwargs)

    def post_process_instance_segmentation(self, *args, **kwargs):
        """Forwards all arguments to [`EovSegImageProcessor.post_process_instance_segmentation`]."""
        return self.image_processor.post_process_instance_segmentation(*args, **kwargs)


def _builtin_class_names(name: str) -> list[str]:
    # Imported by absolute name: the built-in vocabularies are package data of `eovseg`, absent from a remote-code folder
    # (whose loader would also try to copy any module named in a relative import).
    try:
        get_vocabulary = importlib.import_module("eovseg.vocabularies").get_vocabulary
    except ImportError:
        raise ValueError(
            f"The vocabulary must be a list of class names; the built-in vocabulary name {name!r} needs the eovseg "
            "package installed (pip install eovseg)."
        ) from None
    return get_vocabulary(name).class_names


__all__ = ["EovSegProcessor", "TEXT_INPUT_NAMES"]

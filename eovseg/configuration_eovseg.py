"""EOV-Seg model configuration."""

from __future__ import annotations

import copy
import math
import os

from transformers import PretrainedConfig

from .vocabulary import display_name, parse_flags, validate_vocabulary

# open_clip model configurations (the content of open_clip's model_configs/*.json, with the
# activation the released weights were trained with). Holding them here means building a model
# never asks open_clip, or a hub, for anything.
_RN50_CLIP = {
    "embed_dim": 1024,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}
_RN50X4_CLIP = {
    "embed_dim": 640,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 288, "layers": [4, 6, 10, 6], "width": 80, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 640, "heads": 10, "layers": 12},
}
_CONVNEXT_L_CLIP = {
    "embed_dim": 768,
    "quick_gelu": False,
    "vision_cfg": {
        "timm_model_name": "convnext_large",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "mlp",
        "timm_drop": 0.0,
        "timm_drop_path": 0.1,
        "image_size": 320,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 16},
}
_VIT_B16_CLIP = {
    "embed_dim": 512,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}

# Small towers for tests and demos: the same module types as the published variants.
_TINY_RN_CLIP = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
_TINY_CONVNEXT_CLIP = {
    **_TINY_RN_CLIP,
    "quick_gelu": False,
    "vision_cfg": {**_CONVNEXT_L_CLIP["vision_cfg"], "timm_model_name": "convnext_atto", "timm_drop_path": 0.0, "image_size": 64},
}
_TINY_VIT_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

# Small made-up vocabularies for the tiny presets (things first, then stuff).
TINY_VOCABULARY = [
    "person, child, girl, boy",
    "car, automobile",
    "dog, puppy",
    "chair",
    "sky",
    "grass, lawn",
    "road, street",
    "wall",
]
TINY_IS_THING = [True, True, True, True, False, False, False, False]
TINY_TRAIN_VOCABULARY = ["person", "car", "chair", "sky", "road, street", "building"]

# The published variants (the released checkpoints' architectures).
PUBLISHED_VARIANTS = {
    "r50": {
        "clip_model_name": "RN50",
        "clip_pretrained": "openai",
        "clip_model_config": _RN50_CLIP,
        "vit_model_name": "ViT-B-16",
        "vit_pretrained": "openai",
        "vit_model_config": _VIT_B16_CLIP,
        "agg_dim": 128,
        "ensemble_on_valid_mask": True,
    },
    "r50x4": {
        "clip_model_name": "RN50x4",
        "clip_pretrained": "openai",
        "clip_model_config": _RN50X4_CLIP,
        "vit_model_name": "ViT-B-16",
        "vit_pretrained": "openai",
        "vit_model_config": _VIT_B16_CLIP,
        "agg_dim": 128,
        "ensemble_on_valid_mask": True,
    },
    "convnext_l": {
        "clip_model_name": "convnext_large_d_320",
        "clip_pretrained": "laion2b_s29b_b131k_ft_soup",
        "clip_model_config": _CONVNEXT_L_CLIP,
        "vit_model_name": "ViT-B-16",
        "vit_pretrained": "openai",
        "vit_model_config": _VIT_B16_CLIP,
        "agg_dim": 96,
        "ensemble_on_valid_mask": False,
    },
}

# Small presets for tests and demos: the module types of the published variants at a few channels.
TEST_PRESETS = {
    "tiny": {
        "clip_model_name": "tiny-RN",
        "clip_pretrained": None,
        "clip_model_config": _TINY_RN_CLIP,
        "vit_model_name": "tiny-ViT",
        "vit_pretrained": None,
        "vit_model_config": _TINY_VIT_CLIP,
        "agg_dim": 32,
        "hidden_dim": 64,
        "num_proposals": 10,
        "decoder_ffn_dim": 128,
        "ensemble_on_valid_mask": True,
        "train_num_points": 256,
        "vocabulary": TINY_VOCABULARY,
        "is_thing": TINY_IS_THING,
        "train_vocabulary": TINY_TRAIN_VOCABULARY,
    },
}

# The ConvNeXt test preset: the tiny one with a timm ConvNeXt CLIP and no valid-mask gating (as ConvNeXt-L).
TEST_PRESETS["tiny_convnext"] = {
    **TEST_PRESETS["tiny"],
    "clip_model_name": "tiny-ConvNeXt",
    "clip_model_config": _TINY_CONVNEXT_CLIP,
    "ensemble_on_valid_mask": False,
}

# Pixel statistics (0-255 units) of every released EOV-Seg model: ImageNet's, inherited from the Mask2Former base
# configs (not CLIP's). The image processor, the training collator and the config all take them from here.
IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)

# Every name `EovSegConfig.from_variant` knows.
PRESETS = {**PUBLISHED_VARIANTS, **TEST_PRESETS}


class EovSegInputError(ValueError):
    """Raised for inputs the model cannot use (wrong image size or channels, inconsistent vocabulary tensors)."""


def check_pretrained_source(source) -> None:
    """Refuse a `from_pretrained` source that is neither an existing path nor a Hub repository id as a missing
    folder (transformers would say "Repo id must be in the form ...", which names no folder)."""
    if not isinstance(source, (str, os.PathLike)) or os.path.exists(source):
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(os.fspath(source))
    except HFValidationError:
        raise FileNotFoundError(f"model folder {os.fspath(source)!r} not found (nor is it a Hub repository id).") from None


def _open_vocabulary_pipeline_registered() -> bool:
    from transformers.pipelines import PIPELINE_REGISTRY

    return "open-vocabulary-segmentation" in PIPELINE_REGISTRY.get_supported_tasks()


# Completes a folder after `save_pretrained` of the model or the processor (the code files for trust_remote_code, the
# pipelines, the model card), called as `hook(folder, model_or_None)`. Set by `eovseg.auto_registration.register`
# (run once eovseg and transformers are both imported); unset in the code copied into a model folder, which saves
# what transformers saves.
_saved_folder_hook = None


def set_saved_folder_hook(hook) -> None:
    global _saved_folder_hook
    _saved_folder_hook = hook


def complete_saved_folder(save_directory, model=None) -> None:
    if _saved_folder_hook is not None:
        _saved_folder_hook(save_directory, model)


def check_save_directory(save_directory) -> None:
    """Refuse a `save_pretrained` target that is a file (transformers logs an error and saves nothing, or fails
    half-way)."""
    if os.path.isfile(save_directory):
        raise NotADirectoryError(
            f"cannot save into {os.fspath(save_directory)!r}: it is a file; give a folder (created if needed)."
        )


# Fields that size a layer or a loop: a positive int each (a string or a negative number would otherwise fail deep
# inside torch when the model is built). num_mask_fcs may be 0 (no block before the projection).
_POSITIVE_INT_FIELDS = (
    "hidden_dim", "agg_dim", "num_proposals", "num_stages", "conv_kernel_size_1d", "conv_kernel_size_2d",
    "decoder_ffn_dim", "decoder_num_heads", "class_embed_num_layers", "vas_num_heads", "size_divisibility",
    "text_chunk_size", "train_num_points",
)
# Fields that are a probability, a weight of two probabilities or a threshold on one: a number in [0, 1].
_UNIT_INTERVAL_FIELDS = (
    "hard_mask_threshold", "geometric_ensemble_alpha", "geometric_ensemble_beta", "object_mask_threshold",
    "overlap_threshold", "importance_sample_ratio", "iou_mask_threshold", "supervision_iou_threshold",
)
# Loss weights and Embedding Modulation's alpha and beta: a number of at least 0.
_NON_NEGATIVE_FIELDS = (
    "class_weight", "mask_weight", "dice_weight", "no_object_weight", "iou_loss_weight", "match_loss_weight",
    "sum_loss_weight", "modulation_alpha", "debias_beta",
)
# Each checked field's (least, most or None, integer?); oversample_ratio >= 1 draws at least the points it keeps.
_CHECKED_FIELDS = {
    **{name: (1, None, True) for name in _POSITIVE_INT_FIELDS},
    "num_mask_fcs": (0, None, True),
    **{name: (0, 1, False) for name in _UNIT_INTERVAL_FIELDS},
    **{name: (0, None, False) for name in _NON_NEGATIVE_FIELDS},
    "oversample_ratio": (1, None, False),
}

# Class-scoring rules of eval mode: EOV-Seg's geometric ensemble, or OPSNet's Embedding Modulation.
CLASS_ENSEMBLES = ("geometric", "embedding_modulation")


class EovSegConfig(PretrainedConfig):
    r"""
    Configuration of an [`EovSegForPanopticSegmentation`] model (EOV-Seg, AAAI 2025).

    The defaults are the published R50 variant (`EovSegConfig()` equals `EovSegConfig.from_variant("r50")` but for
    the vocabularies). [`EovSegConfig.from_variant`] is the one way to get a preset: the published variants
    (`"r50"`, `"r50x4"`, `"convnext_l"`, table `PUBLISHED_VARIANTS`) and the small test presets (`"tiny"`,
    `"tiny_convnext"`, table `TEST_PRESETS`). Building a model from a configuration never downloads anything: the
    CLIP towers are described by full open_clip configuration dictionaries.

    Args:
        variant (`str`, *optional*):
            Name of the preset this configuration was made from (`from_variant` sets it), or `"custom"`; defaults
            to `"r50"` without tower configurations and to `"custom"` with them. It records, it does not look up:
            `EovSegConfig(variant="tiny")` is an error that points to `from_variant`. Checked against the CLIP
            configuration when a checkpoint is converted.
        clip_model_name (`str`, *optional*):
            open_clip name of the frozen CNN CLIP model (for example `"RN50"`); informational.
        clip_pretrained (`str`, *optional*):
            open_clip pretrained tag the CNN CLIP weights come from (for example `"openai"`); informational.
        clip_model_config (`dict`, *optional*):
            open_clip model configuration of the CNN CLIP (`embed_dim`, `quick_gelu`, `vision_cfg`, `text_cfg`). Its
            vision tower is the backbone and the out-of-vocabulary classifier, its text tower encodes the vocabulary.
            The vision tower must be a ModifiedResNet (`layers` is a list) or a timm ConvNeXt (`timm_model_name`).
            Give both tower configurations or neither (then those of the R50 variant: RN50 and ViT-B/16).
        vit_model_name (`str`, *optional*):
            open_clip name of the ViT CLIP whose first block is the spatial-awareness extractor; informational.
        vit_pretrained (`str`, *optional*):
            open_clip pretrained tag of the ViT CLIP; informational.
        vit_model_config (`dict`, *optional*):
            open_clip model configuration of the ViT CLIP. Only the patch embedding, positional embedding, `ln_pre`
            and the first residual block of its vision tower are built.
        hidden_dim (`int`, *optional*, defaults to 256):
            Channels of the aggregated features and of the decoder's object kernels.
        agg_dim (`int`, *optional*, defaults to 128):
            Channels of the light aggregator's output before the coordinate features are appended (128 for the
            ResNets, 96 for ConvNeXt-L).
        num_proposals (`int`, *optional*, defaults to 100):
            Number of object queries (kernels) of the light-weight decoder.
        num_stages (`int`, *optional*, defaults to 3):
            Number of light-weight decoder stages.
        conv_kernel_size_1d (`int`, *optional*, defaults to 3):
            Kernel size of the dynamic depth-wise convolution ("attention") over the channel axis.
        conv_kernel_size_2d (`int`, *optional*, defaults to 1):
            Spatial size of the object kernels (EOV-Seg uses 1).
        num_mask_fcs (`int`, *optional*, defaults to 1):
            Number of Linear-LayerNorm-ReLU blocks before the mask kernel projection.
        decoder_ffn_dim (`int`, *optional*, defaults to 2048):
            Hidden size of the decoder's feed-forward network.
        decoder_num_heads (`int`, *optional*, defaults to 8):
            Attention heads of the decoder's self-attention over object kernels.
        class_embed_num_layers (`int`, *optional*, defaults to 3):
            Layers of the MLP that maps instance embeddings to the CLIP text space.
        hard_mask_threshold (`float`, *optional*, defaults to 0.5):
            Sigmoid threshold of the hard masks that gather features at the start of each decoder stage.
        vas_num_heads (`int`, *optional*, defaults to 1):
            Heads of the Vocabulary-Aware Selection gating.
        geometric_ensemble_alpha (`float`, *optional*, defaults to 0.4):
            Weight of the out-of-vocabulary (CLIP) probabilities for classes seen in training.
        geometric_ensemble_beta (`float`, *optional*, defaults to 0.8):
            Weight of the out-of-vocabulary (CLIP) probabilities for classes not seen in training.
        ensemble_on_valid_mask (`bool`, *optional*, defaults to `True`):
            Use the CLIP probabilities only for queries whose mask has at least one positive pixel at the CLIP
            feature resolution (the original does this for the ResNets, not for ConvNeXt-L).
        object_mask_threshold (`float`, *optional*, defaults to 0.0):
            Minimum class score of a query kept by panoptic post-processing.
        overlap_threshold (`float`, *optional*, defaults to 0.8):
            Minimum ratio of a query's argmax area to its own binary mask area kept by panoptic post-processing.
        pixel_mean (`list[float]`, *optional*, defaults to `[123.675, 116.28, 103.53]`):
            Per-channel mean subtracted from RGB pixel values in 0-255. The released EOV-Seg configs inherit the
            ImageNet statistics of their Mask2Former base config (not CLIP's), and the weights were trained with them.
        pixel_std (`list[float]`, *optional*, defaults to `[58.395, 57.12, 57.375]`):
            Per-channel standard deviation (0-255 units) pixel values are divided by.
        size_divisibility (`int`, *optional*, defaults to 32):
            Padded inputs must have height and width divisible by this.
        text_chunk_size (`int`, *optional*, defaults to 128):
            Number of prompts encoded by the text tower at once.
        text_encoder_dtype (`str`, *optional*):
            `"bfloat16"` or `"float16"` encodes a new vocabulary's distinct prompts once each, the beginnings many
            prompts share ("a photo of a") once, in batches of equal length, with the text tower's matrix products in
            that precision (embeddings within 1e-3 cosine of float32; float32 results). Default: the prompts as
            given, in the model's precision.
        float32_sensitive_ops (`bool`, *optional*, defaults to `True`):
            In a model cast to bfloat16 / float16, keep in float32 the steps that reduced precision breaks: the
            sampling positions and bilinear weights of the modulated deformable convolution (on CPU its gather and
            product then run in the model's precision; on GPU torchvision's float32 kernel runs it whole), the
            sigmoid and threshold of the decoder's hard masks, the mask logits, the class logits (scaled cosines)
            and the geometric ensemble (logs of small probabilities).
            Outputs then come in float32. `False` runs everything in the model's precision (but for the deformable
            convolution's sampling positions: in half precision they would be off by up to a pixel).
        class_weight (`float`, *optional*, defaults to 2.0):
            Weight of the classification loss and of the class cost in matching.
        mask_weight (`float`, *optional*, defaults to 5.0):
            Weight of the sigmoid binary cross-entropy mask loss and matching cost.
        dice_weight (`float`, *optional*, defaults to 5.0):
            Weight of the dice loss and matching cost.
        no_object_weight (`float`, *optional*, defaults to 0.1):
            Cross-entropy weight of the void class.
        train_num_points (`int`, *optional*, defaults to 12544):
            Points sampled per mask for matching and the mask losses.
        oversample_ratio (`float`, *optional*, defaults to 3.0):
            Oversampling of candidate points for importance sampling.
        importance_sample_ratio (`float`, *optional*, defaults to 0.75):
            Fraction of points chosen by uncertainty.
        class_ensemble (`str`, *optional*, defaults to `"geometric"`):
            How eval-mode class scores are formed: `"geometric"` (EOV-Seg's geometric ensemble of the in-vocabulary and
            CLIP probabilities) or `"embedding_modulation"` (OPSNet's Embedding Modulation, [`EovSegEmbeddingModulation`]:
            query and CLIP embeddings fused by how far the test vocabulary is from the training vocabulary, then
            debiased logits). Can be chosen per call (`class_ensemble=` of the model, the processor and the pipeline).
        modulation_alpha (`float`, *optional*, defaults to 10.0):
            Embedding Modulation: weight alpha of the CLIP embedding in `E_m = E_q + alpha * (1 - s) * E_c` (OPSNet's
            default; its grid was 5 / 10 / 15).
        debias_beta (`float`, *optional*, defaults to 0.5):
            Embedding Modulation: exponent beta of the logit debiasing `z_i / (max_j H_ij) ** beta` (OPSNet's grid:
            0.25 to 1.0).
        modulation_normalize (`bool`, *optional*, defaults to `True`):
            Embedding Modulation: L2-normalise `E_q` and `E_c` before fusing them, so that alpha weighs two unit
            vectors whatever their norms (the paper does not say; without it alpha depends on the embeddings' scale).
        mask_filtering (`bool`, *optional*, defaults to `False`):
            OPSNet's Mask Filtering: build an IoU head ([`EovSegMaskFiltering`], one linear layer per decoder stage on
            the stage's updated queries) predicting each mask's IoU with its ground truth, trained with an L2 loss.
            Required by the `"iou"` / `"class_iou"` score modes of post-processing and by Decoupled Supervision.
        iou_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the IoU head's L2 loss on every stage (the paper gives none).
        iou_mask_threshold (`float`, *optional*, defaults to 0.5):
            Sigmoid threshold binarising a predicted mask for its IoU target (the paper gives none).
        decoupled_supervision (`bool`, *optional*, defaults to `False`):
            OPSNet's Decoupled Supervision ([`EovSegDecoupledSupervision`]): images with image-level labels only
            (`image_labels`) are trained with L_match and L_sum. Needs `mask_filtering` (the IoU head selects the
            predictions matched to the labels).
        match_loss_weight (`float`, *optional*, defaults to 1.0):
            Decoupled Supervision: weight of L_match (OPSNet's value).
        sum_loss_weight (`float`, *optional*, defaults to 0.4):
            Decoupled Supervision: weight of L_sum (OPSNet's value).
        supervision_iou_threshold (`float`, *optional*, defaults to 0.5):
            Decoupled Supervision: predictions whose predicted IoU exceeds this take part in L_match (the paper gives
            no value); when none does, the single prediction with the highest predicted IoU is used.
        match_loss_with_void (`bool`, *optional*, defaults to `True`):
            Decoupled Supervision: the softmax of L_match also covers the void class, so that the prediction claimed
            for a label is pushed away from void too (the panoptic batches teach void for every unlabeled region,
            and the void filter drops such queries at test time). OPSNet's softmax covers the C label classes only
            (`False`).
        train_vocabulary (`list[str]`, *optional*):
            The training vocabulary (class entries of comma-separated synonyms). A test class is *seen* when one of
            its synonyms is a synonym of a training class; seen and unseen classes use different ensemble weights.
        vocabulary (`list[str]`, *optional*):
            The default vocabulary used when no text is given to the model. Its text embeddings are stored with the
            weights (buffer `default_text_embeddings`) once computed.
        is_thing (`list[bool]`, *optional*):
            For each class of `vocabulary`, whether it is a thing (instances kept apart) or stuff (merged). Flags are
            JSON booleans or true/false/1/0; anything else (`"yes"`, `"no"`) is refused.
        default_vocabulary_fingerprint (`str`, *optional*):
            Fingerprint of the token ids of `vocabulary`'s prompts, set by
            [`~EovSegForPanopticSegmentation.set_default_vocabulary_embeddings`] when the embeddings are stored. A
            model whose `vocabulary` no longer matches it re-encodes the vocabulary instead of using stale embeddings.
        kwargs:
            Remaining arguments of [`~transformers.PretrainedConfig`] (`id2label` is derived from `vocabulary`).

    transformers' common names read and write the light-weight decoder's sizes (`attribute_map`), as Mask2Former's
    configuration maps them to its transformer decoder: `hidden_size` is `hidden_dim` (the object kernels' and
    aggregated features' channels), `num_hidden_layers` is `num_stages` (decoder stages), `num_attention_heads` is
    `decoder_num_heads` (heads of the decoder's self-attention) and `num_queries` is `num_proposals` (object queries).
    The frozen CLIP towers keep their own sizes in their open_clip configurations. Numeric fields out of their range
    (a size below 1, a probability or threshold outside [0, 1], a negative loss weight) are refused.
    """

    model_type = "eovseg"
    attribute_map = {
        "hidden_size": "hidden_dim",
        "num_hidden_layers": "num_stages",
        "num_attention_heads": "decoder_num_heads",
        "num_queries": "num_proposals",
    }

    def __init__(
        self,
        variant: str | None = None,
        clip_model_name: str | None = None,
        clip_pretrained: str | None = None,
        clip_model_config: dict | None = None,
        vit_model_name: str | None = None,
        vit_pretrained: str | None = None,
        vit_model_config: dict | None = None,
        hidden_dim: int = 256,
        agg_dim: int = 128,
        num_proposals: int = 100,
        num_stages: int = 3,
        conv_kernel_size_1d: int = 3,
        conv_kernel_size_2d: int = 1,
        num_mask_fcs: int = 1,
        decoder_ffn_dim: int = 2048,
        decoder_num_heads: int = 8,
        class_embed_num_layers: int = 3,
        hard_mask_threshold: float = 0.5,
        vas_num_heads: int = 1,
        geometric_ensemble_alpha: float = 0.4,
        geometric_ensemble_beta: float = 0.8,
        ensemble_on_valid_mask: bool = True,
        object_mask_threshold: float = 0.0,
        overlap_threshold: float = 0.8,
        pixel_mean: list[float] | None = None,
        pixel_std: list[float] | None = None,
        size_divisibility: int = 32,
        text_chunk_size: int = 128,
        text_encoder_dtype: str | None = None,
        float32_sensitive_ops: bool = True,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        train_num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        class_ensemble: str = "geometric",
        modulation_alpha: float = 10.0,
        debias_beta: float = 0.5,
        modulation_normalize: bool = True,
        mask_filtering: bool = False,
        iou_loss_weight: float = 1.0,
        iou_mask_threshold: float = 0.5,
        decoupled_supervision: bool = False,
        match_loss_weight: float = 1.0,
        sum_loss_weight: float = 0.4,
        supervision_iou_threshold: float = 0.5,
        match_loss_with_void: bool = True,
        train_vocabulary: list[str] | None = None,
        vocabulary: list[str] | None = None,
        is_thing: list[bool] | None = None,
        default_vocabulary_fingerprint: str | None = None,
        **kwargs,
    ):
        self._check_numbers({**{name: value for name, value in locals().items() if name in _CHECKED_FIELDS},
                             **{alias: kwargs[alias] for alias in self.attribute_map if alias in kwargs}})
        self.variant = self._check_variant(variant, clip_model_config, vit_model_config)
        self._set_towers(clip_model_name, clip_pretrained, clip_model_config, vit_model_name, vit_pretrained,
                         vit_model_config)
        self.hidden_dim = hidden_dim
        self.agg_dim = agg_dim
        self.num_proposals = num_proposals
        self.num_stages = num_stages
        self.conv_kernel_size_1d = conv_kernel_size_1d
        self.conv_kernel_size_2d = conv_kernel_size_2d
        self.num_mask_fcs = num_mask_fcs
        self.decoder_ffn_dim = decoder_ffn_dim
        self.decoder_num_heads = decoder_num_heads
        self.class_embed_num_layers = class_embed_num_layers
        self.hard_mask_threshold = hard_mask_threshold
        self.vas_num_heads = vas_num_heads
        self.geometric_ensemble_alpha = geometric_ensemble_alpha
        self.geometric_ensemble_beta = geometric_ensemble_beta
        self.ensemble_on_valid_mask = ensemble_on_valid_mask
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.pixel_mean = list(pixel_mean) if pixel_mean is not None else list(IMAGENET_PIXEL_MEAN)
        self.pixel_std = list(pixel_std) if pixel_std is not None else list(IMAGENET_PIXEL_STD)
        self.size_divisibility = size_divisibility
        self.text_chunk_size = text_chunk_size
        self.text_encoder_dtype = self._check_text_encoder_dtype(text_encoder_dtype)
        self.float32_sensitive_ops = float32_sensitive_ops
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.no_object_weight = no_object_weight
        self.train_num_points = train_num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self._set_opsnet_options(
            class_ensemble, modulation_alpha, debias_beta, modulation_normalize, mask_filtering, iou_loss_weight,
            iou_mask_threshold, decoupled_supervision, match_loss_weight, sum_loss_weight, supervision_iou_threshold,
            match_loss_with_void,
        )

        self.train_vocabulary = list(train_vocabulary or [])
        self.vocabulary, self.is_thing = self._check_vocabulary(vocabulary, is_thing, kwargs)
        self.default_vocabulary_fingerprint = default_vocabulary_fingerprint
        if kwargs.get("custom_pipelines") and _open_vocabulary_pipeline_registered():
            # A saved folder names its pipeline for where eovseg is not imported; where it is (registered), that
            # entry would make transformers refuse the pipeline without trust_remote_code.
            kwargs.pop("custom_pipelines")
        super().__init__(**kwargs)

    @classmethod
    def _check_numbers(cls, given: dict) -> None:
        """Refuse a numeric field out of its range (see `_CHECKED_FIELDS`), by the name it was given as (a common
        name of `attribute_map` included), before it can fail deep inside torch or skew the scores silently."""
        sizes = {}
        for name, value in given.items():
            field = cls.attribute_map.get(name, name)
            sizes[field] = value
            least, most, integer = _CHECKED_FIELDS[field]
            if integer:
                valid = not isinstance(value, bool) and isinstance(value, int) and value >= least
                if not valid:
                    raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}.")
                continue
            valid = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not valid or value < least or (most is not None and value > most):
                what = f"between {least} and {most}" if most is not None else f"of at least {least}"
                raise ValueError(f"{name} must be a number {what}, got {value!r}.")
        kernel_dim = sizes["hidden_dim"] * sizes["conv_kernel_size_2d"] ** 2  # the decoder's attention width
        if kernel_dim % sizes["decoder_num_heads"]:
            raise ValueError(f"hidden_dim * conv_kernel_size_2d**2 ({kernel_dim}) must be a multiple of "
                             f"decoder_num_heads ({sizes['decoder_num_heads']}).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "EovSegConfig":
        """[`~transformers.PretrainedConfig.from_pretrained`], with errors that name the file: a missing folder is
        "not found", a config.json that is no object or holds a bad value says which file."""
        check_pretrained_source(pretrained_model_name_or_path)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except (TypeError, ValueError) as err:
            source = os.fspath(pretrained_model_name_or_path)
            if not os.path.isdir(source):
                raise
            path = os.path.join(source, kwargs.get("subfolder") or "", "config.json")
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if isinstance(err, TypeError) and "mapping" in message:
                message = "it must hold a JSON object of configuration fields"
            raise ValueError(f"{path}: {message}") from err

    def save_pretrained(self, save_directory, *args, **kwargs):
        check_save_directory(save_directory)
        return super().save_pretrained(save_directory, *args, **kwargs)

    @staticmethod
    def _check_variant(variant: str | None, clip_model_config, vit_model_config) -> str:
        towers_given = clip_model_config is not None or vit_model_config is not None
        if variant is None:
            return "custom" if towers_given else "r50"
        if variant != "custom" and variant not in PRESETS:
            raise ValueError(
                f"Unknown EOV-Seg variant {variant!r}; known variants: {', '.join(PRESETS)} (or 'custom' with explicit "
                "clip_model_config and vit_model_config)."
            )
        if variant not in ("r50", "custom") and not towers_given:
            # `variant` only records where a configuration came from; presets are applied in one place.
            raise ValueError(
                f"EovSegConfig(variant={variant!r}) does not apply the preset: use "
                f"EovSegConfig.from_variant({variant!r})."
            )
        return variant

    def _set_towers(self, clip_model_name, clip_pretrained, clip_model_config, vit_model_name, vit_pretrained,
                    vit_model_config) -> None:
        """The two CLIP towers' names, pretrained tags and open_clip configurations: those given when either
        configuration is, else the published R50 variant's (a bare `EovSegConfig()` is the R50 model)."""
        r50 = PUBLISHED_VARIANTS["r50"]
        towers_given = clip_model_config is not None or vit_model_config is not None
        self.clip_model_name = clip_model_name if clip_model_name is not None or towers_given else r50["clip_model_name"]
        self.clip_pretrained = clip_pretrained if clip_pretrained is not None or towers_given else r50["clip_pretrained"]
        self.clip_model_config = copy.deepcopy(clip_model_config if towers_given else r50["clip_model_config"])
        self.vit_model_name = vit_model_name if vit_model_name is not None or towers_given else r50["vit_model_name"]
        self.vit_pretrained = vit_pretrained if vit_pretrained is not None or towers_given else r50["vit_pretrained"]
        self.vit_model_config = copy.deepcopy(vit_model_config if towers_given else r50["vit_model_config"])
        self._check_towers()

    @staticmethod
    def _check_text_encoder_dtype(text_encoder_dtype: str | None) -> str | None:
        if text_encoder_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"text_encoder_dtype must be None, 'float32', 'bfloat16' or 'float16', not {text_encoder_dtype!r}.")
        return text_encoder_dtype

    def _check_towers(self):
        if self.clip_model_config is None or self.vit_model_config is None:
            raise ValueError("A 'custom' EOV-Seg config needs both clip_model_config and vit_model_config.")
        vision_cfg = self.clip_model_config.get("vision_cfg", {})
        if not ("timm_model_name" in vision_cfg or isinstance(vision_cfg.get("layers"), (list, tuple))):
            raise ValueError(
                "clip_model_config['vision_cfg'] must describe a CLIP ModifiedResNet ('layers' a list of 4 ints) or "
                "a timm ConvNeXt ('timm_model_name')."
            )
        if not isinstance(self.vit_model_config.get("vision_cfg", {}).get("patch_size"), int):
            raise ValueError("vit_model_config['vision_cfg'] must describe a CLIP ViT (an int 'patch_size').")

    @staticmethod
    def _check_vocabulary(vocabulary, is_thing, kwargs) -> tuple[list[str] | None, list[bool] | None]:
        """The validated default vocabulary and thing flags; sets `id2label`/`label2id` in `kwargs` from it."""
        if vocabulary is None:
            return None, parse_flags(is_thing, "is_thing") if is_thing is not None else None
        vocabulary = validate_vocabulary(vocabulary, "default vocabulary")
        if is_thing is None:
            is_thing = [True] * len(vocabulary)
        if len(is_thing) != len(vocabulary):
            raise ValueError(f"is_thing has {len(is_thing)} flags for a vocabulary of {len(vocabulary)} classes.")
        kwargs["id2label"] = {i: display_name(name) for i, name in enumerate(vocabulary)}
        kwargs.setdefault("label2id", {display_name(name): i for i, name in enumerate(vocabulary)})
        return vocabulary, parse_flags(is_thing, "is_thing")

    def _set_opsnet_options(
        self, class_ensemble, modulation_alpha, debias_beta, modulation_normalize, mask_filtering, iou_loss_weight,
        iou_mask_threshold, decoupled_supervision, match_loss_weight, sum_loss_weight, supervision_iou_threshold,
        match_loss_with_void,
    ):
        """OPSNet's options (Embedding Modulation, Mask Filtering, Decoupled Supervision), checked."""
        if class_ensemble not in CLASS_ENSEMBLES:
            raise ValueError(f"class_ensemble must be one of {', '.join(CLASS_ENSEMBLES)}, got {class_ensemble!r}.")
        if decoupled_supervision and not mask_filtering:
            raise ValueError(
                "decoupled_supervision needs mask_filtering=True: its IoU head selects the predictions matched to "
                "the image-level labels."
            )
        self.class_ensemble = class_ensemble
        self.modulation_alpha = float(modulation_alpha)
        self.debias_beta = float(debias_beta)
        self.modulation_normalize = bool(modulation_normalize)
        self.mask_filtering = bool(mask_filtering)
        self.iou_loss_weight = float(iou_loss_weight)
        self.iou_mask_threshold = float(iou_mask_threshold)
        self.decoupled_supervision = bool(decoupled_supervision)
        self.match_loss_weight = float(match_loss_weight)
        self.sum_loss_weight = float(sum_loss_weight)
        self.supervision_iou_threshold = float(supervision_iou_threshold)
        self.match_loss_with_void = bool(match_loss_with_void)

    @property
    def embed_dim(self) -> int:
        """Dimension of the CLIP joint embedding space (1024 for RN50, 640 for RN50x4, 768 for ConvNeXt-L)."""
        return int(self.clip_model_config["embed_dim"])

    @property
    def backbone_type(self) -> str:
        """`"convnext"` or `"resnet"`, from the CNN CLIP vision configuration."""
        return "convnext" if "timm_model_name" in self.clip_model_config["vision_cfg"] else "resnet"

    @classmethod
    def from_variant(cls, variant: str, **kwargs) -> "EovSegConfig":
        """The configuration of a published variant (`"r50"`, `"r50x4"`, `"convnext_l"`) or a test preset
        (`"tiny"`, `"tiny_convnext"`): the one way to get a preset. Keyword arguments override fields."""
        if variant not in PRESETS:
            raise ValueError(f"Unknown EOV-Seg variant {variant!r}; known variants: {', '.join(PRESETS)}.")
        fields = copy.deepcopy(PRESETS[variant])
        fields.update(kwargs)
        return cls(variant=variant, **fields)


__all__ = [
    "CLASS_ENSEMBLES",
    "EovSegConfig",
    "EovSegInputError",
    "IMAGENET_PIXEL_MEAN",
    "IMAGENET_PIXEL_STD",
    "PRESETS",
    "PUBLISHED_VARIANTS",
    "TEST_PRESETS",
]

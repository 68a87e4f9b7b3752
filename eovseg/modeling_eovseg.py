"""PyTorch EOV-Seg: Efficient Open-Vocabulary Panoptic Segmentation (Niu et al., AAAI 2025).

The module layout follows Fig. 4 of the paper, and [`EovSegForPanopticSegmentation.forward`] calls the parts in its
order:

* [`EovSegClipBackbone`]: the frozen CNN CLIP (ResNet or ConvNeXt) giving multi-scale features, the dense CLIP
  features of the out-of-vocabulary branch and, through its text tower, the vocabulary embeddings;
* [`EovSegSpatialAwarenessExtractor`]: the first block of a frozen ViT CLIP, giving spatial-awareness features F_s;
* [`EovSegLightAggregator`]: the light aggregator neck ([`EovSegModulatedDeformConv`], coordinate features);
* [`EovSegLightweightDecoder`]: Vocabulary-Aware Selection ([`EovSegVAS`], gating the aggregated features with the
  text embeddings), then [`EovSegLightweightDecoderLayer`] stages, each with two
  [`EovSegDynamicDepthwiseConvAttention`], self-attention, an FFN, [`EovSegMaskPooling`] and [`EovSegTDEE`]
  (Two-way Dynamic Embedding Experts);
* [`EovSegOutOfVocabularyEmbedder`]: the CLIP embedding of each predicted mask from the dense CLIP features;
* [`EovSegGeometricEnsemble`]: combines the in-vocabulary and CLIP probabilities with a void class.

The training loss, transformers' Mask2Former criterion run on every decoder stage, is [`EovSegLoss`]
(`loss_eovseg.py`).
"""

from __future__ import annotations

import hashlib
import math
import pickle
import threading
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm as ClipLayerNorm
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn
from torchvision.ops import deform_conv2d
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, add_start_docstrings_to_model_forward, logging

from .classifier_eovseg import build_synonym_index, classification_logits
from .configuration_eovseg import (
    EovSegConfig,
    EovSegInputError,
    check_pretrained_source,
    check_save_directory,
    complete_saved_folder,
)
from .cpu_memory import reuse_freed_memory
from .loss_eovseg import EovSegLoss
from .opsnet_eovseg import EovSegDecoupledSupervision, EovSegEmbeddingModulation, EovSegMaskFiltering
from .vocabulary import PROMPT_TEMPLATES, build_prompts, display_name, seen_class_mask, validate_vocabulary
from .vocabulary import synonym_counts as count_synonyms

logger = logging.get_logger(__name__)

# The text pass of a new vocabulary shows a progress bar once it has run this many seconds (a short one shows none):
# `eovseg.command_line.PROGRESS_DELAY`, the commands' rule, held here as well since this file is also the model
# folder's remote code, which has no `eovseg.command_line` (a test holds the two equal).
TEXT_PROGRESS_DELAY = 1.0


def text_pass_progress(total: int):
    """The progress bar of a text pass over `total` prompts (prompts per second), by transformers' convention: off
    where its progress bars are (`transformers.utils.logging.disable_progress_bar()`, `HF_HUB_DISABLE_PROGRESS_BARS=1`)."""
    return logging.tqdm(total=total, desc="Encoding the vocabulary", unit="prompt", delay=TEXT_PROGRESS_DELAY)


@dataclass
class EovSegOutput(ModelOutput):
    """
    Outputs of [`EovSegForPanopticSegmentation`].

    Every field but the two training losses is batch-first (its first dimension is the image), so that a batch can
    be sliced image by image as transformers' pipelines and the Trainer's evaluation loop do; what is the same for
    every image (the vocabulary's stuff ids and text embeddings, the domain similarity) is repeated along that
    dimension as an expanded view, at no copy.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            The training loss (sum over decoder stages of the weighted classification, mask and dice losses),
            returned when `mask_labels` and `class_labels` are given. One number for the whole batch.
        loss_dict (`dict[str, torch.FloatTensor]`, *optional*):
            The unweighted loss terms of the batch, named `s{stage}_loss_ce`, `s{stage}_loss_mask`,
            `s{stage}_loss_dice`; returned with `loss`.
        class_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_classes + 1)`):
            In eval mode: the log of the ensembled class probabilities, void last: the in-vocabulary and CLIP
            probabilities combined by the geometric ensemble, re-weighted by (1 - void probability), with
            `log(p + 1e-8)` as the original feeds to its post-processing. In training mode: the last decoder
            stage's cosine-similarity logits (void last), as the losses use them.
        masks_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, height / 4, width / 4)`):
            Mask logits of the last decoder stage at a quarter of the padded input resolution (a view of the last
            stage of `stage_masks_queries_logits`).
        stage_class_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_stages, num_queries, num_classes + 1)`):
            Class logits of every decoder stage, void last (`[:, s]` is stage `s`).
        stage_masks_queries_logits (`torch.FloatTensor` of shape `(batch_size, num_stages, num_queries, height / 4, width / 4)`):
            Mask logits of every decoder stage (`[:, s]` is stage `s`).
        out_of_vocabulary_logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_classes + 1)`, *optional*):
            The CLIP branch's logits (mask-pooled dense CLIP features against the text embeddings, void last); eval
            mode only.
        image_sizes (`torch.LongTensor` of shape `(batch_size, 2)`):
            Height and width of each image's valid (unpadded) region in the input, from `pixel_mask`.
        backbone_hidden_states (`tuple[torch.FloatTensor]`, *optional*):
            The CNN CLIP features res2 to res5, each `(batch_size, channels, height / stride, width / stride)`,
            returned with `output_hidden_states=True` (a tuple per level, as transformers' hidden states are).
        spatial_hidden_state (`torch.FloatTensor` of shape `(batch_size, vit_width, height / 16, width / 16)`, *optional*):
            The spatial-awareness features of the first ViT block, returned with `output_hidden_states=True`.
        aggregator_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_dim, height / 4, width / 4)`, *optional*):
            The light aggregator's output, returned with `output_hidden_states=True`.
        vas_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_dim, height / 4, width / 4)`, *optional*):
            The aggregated features after Vocabulary-Aware Selection, returned with `output_hidden_states=True`.
        decoder_hidden_states (`tuple[torch.FloatTensor]`, *optional*):
            The light-weight decoder's query features (the dynamic kernels) after each stage, each of shape
            `(batch_size, num_queries, hidden_dim)`, returned with `output_hidden_states=True`.
        text_embeddings (`torch.FloatTensor` of shape `(batch_size, num_synonyms, embed_dim)`, *optional*):
            The normalized, template-averaged text embedding of every synonym of the vocabulary that was used (the
            same for every image), returned with `output_hidden_states=True`.
        stuff_class_ids (`torch.LongTensor` of shape `(batch_size, num_stuff_classes)`, *optional*):
            When the model ran on its default vocabulary: the ids of its stuff classes (from `config.is_thing`, the
            same for every image), which panoptic post-processing merges when not told otherwise.
        iou_scores (`torch.FloatTensor` of shape `(batch_size, num_queries)`, *optional*):
            With `config.mask_filtering`: the IoU head's predicted IoU of each query's mask with its ground truth
            (last decoder stage, in [0, 1]); post-processing's `"iou"` / `"class_iou"` score modes use it.
        stage_iou_scores (`torch.FloatTensor` of shape `(batch_size, num_stages, num_queries)`, *optional*):
            With `config.mask_filtering`: the predicted IoUs of every decoder stage.
        domain_similarity (`torch.FloatTensor` of shape `(batch_size,)`, *optional*):
            With Embedding Modulation (eval mode): OPSNet's domain similarity s of the test vocabulary to the training
            vocabulary, `mean_i max_j cos(T_test[i], T_train[j])` (1 when they are the same; the same for every
            image).
        attentions (`tuple[torch.FloatTensor]`, *optional*):
            The self-attention weights of every decoder stage, each of shape `(batch_size, decoder_num_heads,
            num_queries, num_queries)` (softmax over the last axis), returned with `output_attentions=True`.
        spatial_attentions (`tuple[torch.FloatTensor]`, *optional*):
            The attention weights of the spatial-awareness extractor's ViT block, one tensor of shape `(batch_size,
            vit_heads, 1 + patches, 1 + patches)` (the class token first, then the patches of the `height / 16` x
            `width / 16` grid row by row), returned with `output_attentions=True`.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict | None = None
    class_queries_logits: torch.FloatTensor | None = None
    masks_queries_logits: torch.FloatTensor | None = None
    stage_class_queries_logits: torch.FloatTensor | None = None
    stage_masks_queries_logits: torch.FloatTensor | None = None
    out_of_vocabulary_logits: torch.FloatTensor | None = None
    image_sizes: torch.LongTensor | None = None
    backbone_hidden_states: tuple | None = None
    spatial_hidden_state: torch.FloatTensor | None = None
    aggregator_hidden_state: torch.FloatTensor | None = None
    vas_hidden_state: torch.FloatTensor | None = None
    decoder_hidden_states: tuple | None = None
    text_embeddings: torch.FloatTensor | None = None
    stuff_class_ids: torch.LongTensor | None = None
    iou_scores: torch.FloatTensor | None = None
    stage_iou_scores: torch.FloatTensor | None = None
    domain_similarity: torch.FloatTensor | None = None
    attentions: tuple | None = None
    spatial_attentions: tuple | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Frozen CLIP parts
# ----------------------------------------------------------------------------------------------------------------------


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """A half-precision tensor in float32, any other as it is: the float32-sensitive steps must not round a float64
    model's values to float32 either."""
    return tensor.float() if tensor.dtype in HALF_DTYPES else tensor


def _tracing() -> bool:
    """Whether torch.export or torch.compile is tracing the model: values are not known then, only shapes."""
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def require_finite(tensor: torch.Tensor, message: str) -> None:
    """Refuse NaN or infinite values in `tensor` with `message`: an [`EovSegInputError`] in eager mode; while torch.export
    or torch.compile traces the model, an assertion kept in the traced program (the values are unknown when tracing),
    which raises `RuntimeError(message)` when the program meets them."""
    finite = torch.isfinite(tensor).all()
    if _tracing():
        torch._assert_async(finite, message)
    elif not bool(finite):
        raise EovSegInputError(message)


@contextmanager
def offloaded_weights_loaded(modules):
    """Within the block, the weights of `modules` that accelerate offloads (`device_map` with "cpu" or "disk") are on
    the execution device, for code that reads a module's weights outside that module's own forward (offloading hooks
    load a module's weights only for its forward); modules without offloading are left as they are."""
    with ExitStack() as stack:
        for module in modules:
            if getattr(module, "_hf_hook", None) is not None:
                from accelerate.utils import align_module_device

                stack.enter_context(align_module_device(module))
        yield


def interpolate_positional_embedding(positional_embedding: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize the square grid of a CLIP positional embedding ((1 + G*G), C) to (height*width, C), bilinearly.

    The first row (class token / global query) is not part of the grid and is not returned.
    """
    grid = positional_embedding[1:]
    side = int(math.sqrt(grid.shape[0]))
    grid = grid.T.reshape(1, -1, side, side)
    grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    return grid.reshape(grid.shape[1], height * width).T


class EovSegClipBackbone(nn.Module):
    """The frozen CNN CLIP model (vision and text towers), built from an open_clip configuration dict.

    Gives the multi-scale features `stem`, `res2`..`res5` and the dense CLIP features (`clip_dense`) pooled by the
    out-of-vocabulary branch, and encodes prompts with the text tower.
    """

    def __init__(self, config: EovSegConfig):
        super().__init__()
        clip_cfg = dict(config.clip_model_config)
        self.clip_model = open_clip.model.CLIP(
            embed_dim=clip_cfg["embed_dim"],
            vision_cfg=dict(clip_cfg["vision_cfg"]),
            text_cfg=dict(clip_cfg["text_cfg"]),
            quick_gelu=bool(clip_cfg.get("quick_gelu", False)),
        )
        self.backbone_type = config.backbone_type
        visual = self.clip_model.visual
        if self.backbone_type == "convnext":
            stages = visual.trunk.stages
            self.channels = [visual.trunk.stem[0].out_channels] + [self._stage_channels(s) for s in stages]
        else:
            layers = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
            self.channels = [visual.conv3.out_channels] + [layer[-1].conv3.out_channels for layer in layers]
        for p in self.parameters():
            p.requires_grad = False
        # inside the backbone's block, as it runs the vision tower's heads: a module passed to a forward across a
        # block boundary would be moved by accelerate's device hook (`device_map`)
        self.out_of_vocabulary = EovSegOutOfVocabularyEmbedder()

    @staticmethod
    def _stage_channels(stage: nn.Module) -> int:
        for module in reversed(list(stage.modules())):
            if isinstance(module, nn.Linear):
                return module.out_features
            if isinstance(module, nn.Conv2d):
                return module.out_channels
        raise ValueError("Could not infer the channels of a ConvNeXt stage.")

    def train(self, mode: bool = True):
        # The CLIP towers are frozen: their batch norms always use running statistics, as in the original.
        return super().train(False)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        visual = self.clip_model.visual
        features = {}
        if self.backbone_type == "convnext":
            trunk = visual.trunk
            x = trunk.stem(pixel_values)
            features["stem"] = x
            for i, stage in enumerate(trunk.stages):
                x = stage(x)
                features[f"res{i + 2}"] = x
            features["clip_dense"] = trunk.norm_pre(x)
        else:
            # in half precision channels-last lets oneDNN / cuDNN skip their layout reorders (~40% faster on CPU); in
            # float32 it changes the round-off enough for the decoder's hard masks to leave the original's noise
            x = pixel_values
            if x.dtype in HALF_DTYPES:
                x = x.contiguous(memory_format=torch.channels_last)
            x = visual.act1(visual.bn1(visual.conv1(x)))
            x = visual.act2(visual.bn2(visual.conv2(x)))
            x = visual.act3(visual.bn3(visual.conv3(x)))
            features["stem"] = x
            x = visual.avgpool(x)
            for i, layer in enumerate([visual.layer1, visual.layer2, visual.layer3, visual.layer4]):
                x = layer(x)
                features[f"res{i + 2}"] = x
            features["clip_dense"] = x
        return features

    def embed_masks(self, dense: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """The out-of-vocabulary branch: the CLIP embedding (B, Q, D) of each mask (B, Q, h, w) from the dense CLIP
        features (B, C, h, w) ([`EovSegOutOfVocabularyEmbedder`])."""
        return self.out_of_vocabulary(self, dense, mask_logits.to(dense.device))

    @property
    def embed_dim(self) -> int:
        return self.clip_model.text_projection.shape[-1]

    def encode_text(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Un-normalized text embeddings of tokenized prompts (P, L).

        Only the first `max(EOT position) + 1` tokens are run through the tower: with CLIP's causal mask, tokens after
        the end-of-text token cannot change the embedding taken at the end-of-text token.
        """
        model = self.clip_model
        eot = input_ids.argmax(dim=-1)
        # (traced, the ids' own length: an exported text graph takes rows cut to their longest prompt, as the
        # processor pads them)
        length = input_ids.shape[1] if _tracing() else int(eot.max().item()) + 1
        ids = input_ids[:, :length]
        with self.text_weights_loaded():
            x = model.token_embedding(ids) + model.positional_embedding[:length]
            causal = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
            x = model.transformer(x, attn_mask=causal)
            x = model.ln_final(x)
            x = x[torch.arange(x.shape[0], device=x.device), eot]
            return x @ model.text_projection

    def text_weights_loaded(self):
        """A context in which the text tower's weights are in place even when offloaded: the text pass reads the CLIP
        model's positional embedding and projection, and torch's attention the output projections, outside those
        modules' own forwards."""
        model = self.clip_model
        return offloaded_weights_loaded([model, *model.transformer.modules(), model.ln_final])

    def encode_text_reduced(self, input_ids: torch.LongTensor, dtype: torch.dtype, chunk_size: int,
                            progress=None) -> torch.Tensor:
        """Un-normalized float32 embeddings (P, D) of distinct prompts (P, L), with the text tower's matrix products
        in `dtype`: through [`EovSegPrefixSharingTextEncoder`], or, for a tower it does not know, under autocast in
        chunks of `chunk_size` prompts of equal length."""
        if EovSegPrefixSharingTextEncoder.supports(self.clip_model):
            with self.text_weights_loaded():
                return EovSegPrefixSharingTextEncoder(self.clip_model, dtype).encode(input_ids, chunk_size, progress)
        encoded = torch.empty(input_ids.shape[0], self.embed_dim, device=input_ids.device)
        order = torch.argsort(input_ids.argmax(dim=-1), stable=True)  # by end-of-text position
        for start in range(0, input_ids.shape[0], chunk_size):
            rows = order[start : start + chunk_size]
            with torch.autocast(input_ids.device.type, dtype=dtype):
                encoded[rows] = self.encode_text(input_ids[rows]).float()
            if progress is not None:
                progress.update(len(rows))
        return encoded


def shared_prefix_lengths(input_ids: torch.LongTensor, min_share: int) -> torch.LongTensor:
    """For each prompt of (P, L): the length of its longest beginning that at least `min_share` prompts have, short of
    its end-of-text token (the embedding is read there, so that token is always computed per prompt)."""
    eot = input_ids.argmax(dim=-1)
    lengths = torch.zeros_like(eot)
    for length in range(1, int(eot.max()) + 1):
        _, inverse, counts = torch.unique(input_ids[:, :length], dim=0, return_inverse=True, return_counts=True)
        lengths[(counts[inverse] >= min_share) & (eot >= length)] = length
    return lengths


def _float_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """A layer norm in float32, whatever precision the model is in."""
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), bias, norm.eps)


class EovSegPrefixSharingTextEncoder:
    """CLIP's text tower in reduced precision, computing once the beginnings that many prompts share.

    Under CLIP's causal mask a token's states depend only on the tokens before it, so the prompts of one template
    ("There is a small {} in the scene.") share the states, keys and values of their common beginning: it runs through
    the tower once, and only the rest of each prompt (class name, end of the template: 4.5 of 10.3 tokens on ADE-150)
    is computed per prompt, attending to the shared keys and values, in batches of rests of equal length (whatever
    their beginnings) of up to `chunk_size` x 64 tokens. Matrix products run in `dtype` with the weights cast once per
    vocabulary (autocast would cast them again in every batch); layer norms and the residual stream stay float32.
    """

    MIN_SHARE = 8  # a beginning shared by fewer prompts is computed with each of them
    TOKENS_PER_PROMPT = 64  # batch size in tokens per `chunk_size` prompt: short rests need wide batches to be fast

    def __init__(self, clip_model: nn.Module, dtype: torch.dtype):
        self.clip = clip_model
        self.dtype = dtype

        def cast(tensor):
            return None if tensor is None else tensor.to(dtype)

        self.weights = [
            (block, cast(block.attn.in_proj_weight), cast(block.attn.in_proj_bias), cast(block.attn.out_proj.weight),
             cast(block.attn.out_proj.bias), cast(block.mlp.c_fc.weight), cast(block.mlp.c_fc.bias),
             cast(block.mlp.c_proj.weight), cast(block.mlp.c_proj.bias))
            for block in clip_model.transformer.resblocks
        ]

    @staticmethod
    def supports(clip_model: nn.Module) -> bool:
        """A batch-first tower of plain open_clip blocks with packed query/key/value projections."""
        transformer = getattr(clip_model, "transformer", None)
        return (
            getattr(transformer, "batch_first", False)
            and all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                    and b.attn.in_proj_weight is not None for b in transformer.resblocks)
        )

    def _layer(self, index: int, x: torch.Tensor, mask: torch.Tensor, prefix_kv=None):
        """Block `index` on float32 states x (B, n, D) whose keys and values follow `prefix_kv` ((B, p, D) each);
        returns the new states and x's own keys and values."""
        block, in_w, in_b, out_w, out_b, fc_w, fc_b, proj_w, proj_b = self.weights[index]
        query, key, value = F.linear(_float_norm(block.ln_1, x).to(self.dtype), in_w, in_b).chunk(3, dim=-1)
        own_kv = (key, value)
        if prefix_kv is not None:
            key, value = torch.cat([prefix_kv[0], key], dim=1), torch.cat([prefix_kv[1], value], dim=1)
        batch, length, width = query.shape
        heads = block.attn.num_heads

        def split(t):
            return t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=mask)
        attended = F.linear(attended.transpose(1, 2).reshape(batch, length, width), out_w, out_b)
        x = x + block.ls_1(attended.float())
        hidden = block.mlp.gelu(F.linear(_float_norm(block.ln_2, x).to(self.dtype), fc_w, fc_b))
        return x + block.ls_2(F.linear(hidden, proj_w, proj_b).float()), own_kv

    def _embed(self, ids: torch.LongTensor, starts: torch.LongTensor) -> torch.Tensor:
        """Token plus positional embeddings of rows (B, n) whose first token is at position `starts` (B,)."""
        positions = starts[:, None] + torch.arange(ids.shape[1], device=ids.device)
        return (self.clip.token_embedding(ids) + self.clip.positional_embedding[positions]).float()

    def _beginnings(self, input_ids: torch.LongTensor, starts: torch.LongTensor):
        """Per block, the keys and values (N, q, D) of the N distinct shared beginnings (each row's first `starts`
        tokens), and which beginning each row has; (None, None) where no row has one. Beginnings are padded to the
        longest, q tokens: under the causal mask padding cannot reach a beginning's own tokens, and the rows mask it."""
        if not bool((starts > 0).any()):
            return None, None
        longest = int(starts.max())
        inside = torch.arange(longest, device=input_ids.device) < starts[:, None]
        keyed = torch.where(inside, input_ids[:, :longest], -1)
        distinct, which = torch.unique(keyed, dim=0, return_inverse=True)
        x = self._embed(distinct.clamp(min=0), torch.zeros(distinct.shape[0], dtype=torch.long, device=distinct.device))
        causal = torch.ones(longest, longest, dtype=torch.bool, device=x.device).tril()
        keys_values = []
        for index in range(len(self.weights)):
            x, kv = self._layer(index, x, causal)
            keys_values.append(kv)
        return keys_values, which

    def _encode_rests(self, ids, starts, eot, prefix_kv: list | None) -> torch.Tensor:
        """Embeddings (B, D) of prompts whose tokens from `starts` (B,) on are `ids` (B, n), after beginnings whose
        keys and values ((B, q, D) each, per block) are `prefix_kv`."""
        batch, n = ids.shape
        x = self._embed(ids, starts)
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril().expand(batch, 1, n, n)
        if prefix_kv is not None:
            longest = prefix_kv[0][0].shape[1]
            inside = torch.arange(longest, device=x.device) < starts[:, None]  # (B, q): a row's own beginning
            mask = torch.cat([inside[:, None, None, :].expand(batch, 1, n, longest), mask], dim=-1)
        for index in range(len(self.weights)):
            x, _ = self._layer(index, x, mask, prefix_kv[index] if prefix_kv else None)
        x = _float_norm(self.clip.ln_final, x[torch.arange(batch, device=x.device), eot - starts])
        return x @ self.clip.text_projection.float()

    @torch.no_grad()
    def encode(self, input_ids: torch.LongTensor, chunk_size: int, progress=None) -> torch.Tensor:
        """Un-normalized float32 embeddings (P, D) of prompts (P, L) (distinct ones: a repeat is computed again);
        `progress` (a tqdm bar), when given, advances by each batch's prompts."""
        eot = input_ids.argmax(dim=-1)
        starts = shared_prefix_lengths(input_ids, self.MIN_SHARE)
        keys_values, which = self._beginnings(input_ids, starts)
        encoded = torch.empty(input_ids.shape[0], self.clip.text_projection.shape[1], device=input_ids.device)
        rest = eot - starts + 1
        for n in rest.unique().tolist():  # batches of rests of equal length, whatever their beginnings: no padding
            step = max(1, chunk_size * self.TOKENS_PER_PROMPT // n)
            for rows in (rest == n).nonzero().squeeze(1).split(step):
                prefix_kv = [(k[which[rows]], v[which[rows]]) for k, v in keys_values] if keys_values else None
                tokens = input_ids[rows].gather(1, starts[rows, None] + torch.arange(n, device=input_ids.device))
                encoded[rows] = self._encode_rests(tokens, starts[rows], eot[rows], prefix_kv)
                if progress is not None:
                    progress.update(len(rows))
        return encoded


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, the `"eager"` entry of transformers' attention interface: queries, keys and values
    (batch, heads, tokens, head_dim) give the output (batch, tokens, heads, head_dim) and the weights (batch, heads,
    tokens, tokens). The softmax runs in float32 for half-precision inputs, in the inputs' precision otherwise (a float64
    model is not rounded)."""
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(dim=-1, dtype=torch.float32 if query.dtype in HALF_DTYPES else None).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class EovSegAttention(nn.Module):
    """Multi-head self-attention over batch-first tokens (batch, tokens, channels), computed by the function that
    `config._attn_implementation` names in transformers' attention interface (`"eager"`: [`eager_attention_forward`];
    `"sdpa"`: torch's `scaled_dot_product_attention`, which `nn.MultiheadAttention` calls too).

    The parameters are `nn.MultiheadAttention`'s, under its names (packed `in_proj_weight` and `in_proj_bias`,
    `out_proj`), so the original's checkpoints and converted ones load unchanged; built directly they are drawn in its
    order. Each weight is read inside this module's or `out_proj`'s own forward, where offloading hooks load it.
    """

    def __init__(self, config: EovSegConfig, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"The attention width {embed_dim} is not a multiple of its {num_heads} heads.")
        self.config = config
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the attended tokens (batch, tokens, channels) and, with `output_attentions` (computed by the
        `"eager"` function then, whatever the configured one: the others do not form the weights), the attention
        weights (batch, heads, tokens, tokens)."""
        batch, length, channels = hidden_states.shape
        packed = F.linear(hidden_states, self.in_proj_weight, self.in_proj_bias)
        query, key, value = packed.view(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attended, weights = attention(
            self, query, key, value, None, scaling=self.scaling, dropout=0.0, is_causal=False
        )
        attended = self.out_proj(attended.reshape(batch, length, channels))
        return attended, weights if output_attentions else None


class EovSegViTBlock(nn.Module):
    """A residual block of a CLIP ViT under open_clip's parameter names (`ln_1`, `attn`, `ln_2`, `mlp.c_fc`,
    `mlp.c_proj`): pre-norm self-attention, then a pre-norm MLP.

    It takes and returns sequence-first tokens (tokens, batch, channels), the original's layout: the features it hands
    the decoder keep the original's memory layout, hence its convolutions' round-off."""

    def __init__(self, config: EovSegConfig, width: int, heads: int, mlp_ratio: float, act_layer: type[nn.Module]):
        super().__init__()
        self.ln_1 = ClipLayerNorm(width)
        self.attn = EovSegAttention(config, width, heads)
        self.ln_2 = ClipLayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, hidden), gelu=act_layer(), c_proj=nn.Linear(hidden, width))
        )

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.ln_1(x).transpose(0, 1), output_attentions)
        x = x + attended.transpose(0, 1)
        return x + self.mlp(self.ln_2(x)), weights


class EovSegSpatialAwarenessExtractor(nn.Module):
    """The first residual block of a frozen CLIP ViT (patch embedding, interpolated positional embedding, `ln_pre`),
    giving the spatial-awareness features F_s at the patch stride (16 for ViT-B/16)."""

    def __init__(self, config: EovSegConfig):
        super().__init__()
        vit_cfg = config.vit_model_config
        vision = vit_cfg["vision_cfg"]
        width = vision["width"]
        patch = vision["patch_size"]
        grid = vision["image_size"] // patch
        heads = width // vision.get("head_width", 64)
        act_layer = QuickGELU if vit_cfg.get("quick_gelu", False) else nn.GELU
        self.patch_size = patch
        self.width = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = ClipLayerNorm(width)
        self.block = EovSegViTBlock(config, width, heads, vision.get("mlp_ratio", 4.0), act_layer)
        for p in self.parameters():
            p.requires_grad = False

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(
        self, pixel_values: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The features F_s (batch, width, height / patch, width / patch) and, with `output_attentions`, the block's
        attention weights (batch, heads, 1 + patches, 1 + patches), the class token first, then the patches row by
        row."""
        x = self.conv1(pixel_values)
        batch, channels, height, width = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(batch, 1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = interpolate_positional_embedding(self.positional_embedding.to(x.dtype), height, width)
        x = x + torch.cat([self.positional_embedding[:1].to(x.dtype), pos], dim=0)
        x, attention = self.block(self.ln_pre(x).transpose(0, 1), output_attentions)
        return x[1:].permute(1, 2, 0).reshape(batch, channels, height, width), attention


# ----------------------------------------------------------------------------------------------------------------------
# Light aggregator neck
# ----------------------------------------------------------------------------------------------------------------------


class EovSegModulatedDeformConv(nn.Module):
    """A 3x3 modulated deformable convolution (DCNv2) whose offsets and modulation come from a plain convolution.

    The offset convolution predicts 27 channels: the first 18 are the (y, x) offsets in the layout that
    `torchvision.ops.deform_conv2d` takes, the last 9 pass through a sigmoid as the modulation mask.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.offset_conv = nn.Conv2d(in_channels, 3 * kernel_size * kernel_size, kernel_size, padding=padding)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset_y_x_mask = self.offset_conv(x)
        offsets, modulation = offset_y_x_mask.split([offset_y_x_mask.shape[1] * 2 // 3, offset_y_x_mask.shape[1] // 3], 1)
        # torchvision's CPU kernel reads out of bounds (a crash, no error) at a NaN offset: finite pixels give NaN
        # offsets only through non-finite weights (a diverged training step, an uninitialised tensor)
        require_finite(
            offsets, "The light aggregator's deformable-convolution offsets are NaN or infinite: the model's weights "
            "hold non-finite values (a diverged training step or a corrupt checkpoint?)."
        )
        if x.dtype == offsets.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64):
            return deform_conv2d(x, offsets, self.weight, padding=self.padding, mask=modulation.sigmoid())
        if x.dtype == offsets.dtype == self.weight.dtype and x.device.type == "cpu":
            # torchvision has no half kernel on CPU (and its float32 one samples on one thread): gather in the
            # model's precision, with sampling positions and weights computed in float32
            return gathered_deform_conv2d(x, offsets, self.weight, modulation.float().sigmoid(), self.padding)
        # torchvision's kernels have no bfloat16 (and on CPU no float16) version and it casts to float32 itself
        # only under CUDA autocast: under CPU autocast or in a model cast to half precision on GPU, compute in
        # float32 and return the dtype the offset convolution gave (autocast's or the model's).
        with torch.autocast(x.device.type, enabled=False):
            out = deform_conv2d(
                x.float(), offsets.float(), self.weight.float(), padding=self.padding, mask=modulation.float().sigmoid()
            )
        return out.to(offsets.dtype)


def _deform_sampling(offsets: torch.Tensor, mask: torch.Tensor, kernel_size: int, padding: int):
    """Bilinear sampling of a stride-1 modulated deformable convolution as 4 corners per (pixel, tap): flat input
    indices and weights (the modulation folded in), each (B * H * W * K, 4), rows in (b, y, x, tap) order. Positions
    outside the image contribute 0, as in torchvision's kernel."""
    batch, _, height, width = offsets.shape
    taps = kernel_size * kernel_size
    device = offsets.device
    offsets = offsets.float().view(batch, taps, 2, height, width).permute(0, 3, 4, 1, 2)  # (B, H, W, K, 2)
    grid = torch.arange(kernel_size, device=device, dtype=torch.float32) - padding
    tap_y, tap_x = grid.repeat_interleave(kernel_size), grid.repeat(kernel_size)
    y = offsets[..., 0] + (torch.arange(height, device=device, dtype=torch.float32).view(1, -1, 1, 1) + tap_y)
    x = offsets[..., 1] + (torch.arange(width, device=device, dtype=torch.float32).view(1, 1, -1, 1) + tap_x)
    y0, x0 = y.floor(), x.floor()
    ly, lx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    modulation = mask.view(batch, taps, height, width).permute(0, 2, 3, 1)
    rows = ((y0 >= 0) & (y0 < height), (y0 >= -1) & (y0 < height - 1))
    columns = ((x0 >= 0) & (x0 < width), (x0 >= -1) & (x0 < width - 1))
    weight_y = ((1 - ly) * rows[0] * modulation, ly * rows[1] * modulation)
    weight_x = ((1 - lx) * columns[0], lx * columns[1])
    index_y = (y0.clamp(0, height - 1), (y0 + 1).clamp(0, height - 1))
    index_x = (x0.clamp(0, width - 1), (x0 + 1).clamp(0, width - 1))
    base = torch.arange(batch, device=device).view(batch, 1, 1, 1) * (height * width)
    index = torch.stack([base + index_y[i] * width + index_x[j] for i in (0, 1) for j in (0, 1)], dim=-1)
    weight = torch.stack([weight_y[i] * weight_x[j] for i in (0, 1) for j in (0, 1)], dim=-1)
    return index.view(-1, 4), weight.view(-1, 4)


def gathered_deform_conv2d(
    x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, padding: int
) -> torch.Tensor:
    """A stride-1 modulated deformable convolution (torchvision's `deform_conv2d` semantics, offsets (y, x) per tap)
    as one weighted gather (`embedding_bag` over channels-last pixels) and one matrix product, both multi-threaded,
    in the dtype of `x`. Returns (B, O, H, W) in channels-last memory."""
    batch, channels, height, width = x.shape
    out_channels, kernel_size = weight.shape[0], weight.shape[-1]
    index, sample_weight = _deform_sampling(offsets, mask, kernel_size, padding)
    pixels = x.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    columns = F.embedding_bag(index, pixels, mode="sum", per_sample_weights=sample_weight.to(x.dtype))
    columns = columns.view(batch * height * width, kernel_size * kernel_size * channels)
    out = columns @ weight.permute(0, 2, 3, 1).reshape(out_channels, -1).T
    return out.view(batch, height, width, out_channels).permute(0, 3, 1, 2)


def bilinear_upsampling_kernel(shape: torch.Size) -> torch.Tensor:
    """The original's transposed-convolution weight of shape (C_in, C_out, k, k) for bilinear upsampling: a separable
    tent in output channel 0 of every input channel, zeros elsewhere."""
    size = shape[-1]
    factor = math.ceil(size / 2)
    center = (2 * factor - 1 - factor % 2) / (2.0 * factor)
    ramp = 1 - (torch.arange(size, dtype=torch.float32, device="cpu") / factor - center).abs()
    kernel = torch.zeros(shape, device="cpu")
    kernel[:, 0] = ramp[:, None] * ramp[None, :]
    return kernel


class EovSegDeformUpsampleLayer(nn.Module):
    """Modulated deformable conv, BN, ReLU, then a x2 transposed-conv upsampling, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.deform_conv = EovSegModulatedDeformConv(in_channels, out_channels)
        self.deform_norm = nn.BatchNorm2d(out_channels)
        self.upsample = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=False)
        self.upsample_norm = nn.BatchNorm2d(out_channels)
        self._init_bilinear_upsampling()

    def _init_bilinear_upsampling(self):
        with torch.no_grad():
            self.upsample.weight.copy_(bilinear_upsampling_kernel(self.upsample.weight.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.deform_norm(self.deform_conv(x)))
        return F.relu(self.upsample_norm(self.upsample(x)))


class EovSegLightAggregator(nn.Module):
    """The light aggregator: top-down deformable upsampling of res5..res2 with lateral 1x1 convs, fusion of all four
    levels at stride 4, a 3x3 output conv, then coordinate features and a projection to `hidden_dim`."""

    def __init__(self, config: EovSegConfig, in_channels: list[int]):
        super().__init__()
        # in_channels: res2..res5; every level is halved, the fused output has agg_dim channels.
        lateral = [c // 2 for c in in_channels]
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, c // 2, 1) for c in reversed(in_channels))
        self.deform_layers = nn.ModuleList(
            EovSegDeformUpsampleLayer(lateral[i], lateral[i - 1]) for i in range(len(lateral) - 1, 0, -1)
        )
        self.fuse_convs = nn.ModuleList(nn.Conv2d(c, config.agg_dim, 1, bias=False) for c in reversed(lateral))
        self.fuse_bias = nn.Parameter(torch.zeros(1, config.agg_dim, 1, 1))
        self.output_conv = nn.Conv2d(config.agg_dim, config.agg_dim, 3, padding=1)
        self.coord_proj = nn.Conv2d(config.agg_dim + 2, config.hidden_dim, 1)

    @staticmethod
    def coordinate_features(x: torch.Tensor) -> torch.Tensor:
        """CoordConv features: x and y in [-1, 1] over the feature map, (B, 2, H, W)."""
        if _tracing():
            # `torch.linspace` takes its length as a plain int, so tracing would fix the image size; the traced program
            # calls it through an operator of its own (same values), whose output size follows the input's
            return torch.ops.eovseg.coordinate_features(x)
        batch, _, height, width = x.shape
        ys = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([grid_x, grid_y]).expand(batch, -1, -1, -1)


    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        # features: res2..res5. Walk from the coarsest level down.
        levels = list(reversed(features))
        x = self.lateral_convs[0](levels[0])
        merged = [x]
        for lateral_conv, deform_layer, level in zip(self.lateral_convs[1:], self.deform_layers, levels[1:]):
            x = lateral_conv(level) + deform_layer(x)
            merged.append(x)
        # Sum the levels coarsest first, then the bias: the original's order (it matters for float32 round-off,
        # which the hard masks of the decoder can amplify).
        fused = None
        for i, (conv, level) in enumerate(zip(self.fuse_convs, merged)):
            y = conv(level)
            scale = 2 ** (len(merged) - 1 - i)
            if scale > 1:
                y = F.interpolate(y, scale_factor=scale, mode="bilinear", align_corners=False)
            fused = y if fused is None else fused + y
        fused = fused + self.fuse_bias
        x = self.output_conv(fused)
        return self.coord_proj(torch.cat([x, self.coordinate_features(x)], dim=1))


def _register_coordinate_features_operator():
    """`torch.ops.eovseg.coordinate_features(x)`: [`EovSegLightAggregator.coordinate_features`] as one operator for
    traced programs (torch.export, torch.compile), whose output shape (B, 2, H, W) follows x's symbolic shape. Defined
    once per process (the code may be imported twice: as a package and as a model folder's remote code)."""
    if hasattr(torch.ops.eovseg, "coordinate_features"):
        return

    @torch.library.custom_op("eovseg::coordinate_features", mutates_args=())
    def coordinate_features(x: torch.Tensor) -> torch.Tensor:
        return EovSegLightAggregator.coordinate_features(x).contiguous()

    @coordinate_features.register_fake
    def _(x):
        return x.new_empty(x.shape[0], 2, x.shape[2], x.shape[3])


_register_coordinate_features_operator()


# ----------------------------------------------------------------------------------------------------------------------
# Paper components
# ----------------------------------------------------------------------------------------------------------------------


class EovSegMaskPooling(nn.Module):
    """Average features inside each binarized mask (mask logit > 0): (B, C, H, W), (B, Q, h, w) -> (B, Q, C).

    Masks of another size are first resized bilinearly to the features' size. No gradient flows through the masks.
    """

    def forward(
        self, features: torch.Tensor, mask_logits: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`weights`: `pooling_weights(mask_logits, ...)` for these features, when several features share them."""
        if weights is None:
            weights = self.pooling_weights(mask_logits, features.shape[-2:], features.dtype)
        return torch.einsum("bchw,bqhw->bqc", features, weights)

    @staticmethod
    @torch.no_grad()
    def pooling_weights(mask_logits: torch.Tensor, size, dtype: torch.dtype) -> torch.Tensor:
        """Each binarized mask divided by its area (+1e-8), at `size`: (B, Q, *size)."""
        if mask_logits.shape[-2:] != size:
            mask_logits = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
        masks = (mask_logits.detach() > 0).to(dtype)
        return masks / (masks.sum(dim=(-2, -1), keepdim=True) + 1e-8)


# similarities VAS computes at once (float32: 64 MiB); ADE20K-150 at 640x960 fits in one chunk
VAS_CHUNK_ELEMENTS = 1 << 24


class EovSegVAS(nn.Module):
    """Vocabulary-Aware Selection: each pixel's aggregated feature is scaled by how strongly it matches its best
    vocabulary entry (softmax over the text embeddings, max), with a learned scale and offset per head."""

    def __init__(self, in_channels: int, embed_channels: int, guide_channels: int, num_heads: int = 1):
        super().__init__()
        if embed_channels % num_heads or in_channels % num_heads:
            raise ValueError("VAS channels must be divisible by the number of heads.")
        self.num_heads = num_heads
        self.head_channels = embed_channels // num_heads
        if embed_channels != in_channels:
            self.embed_conv = nn.Sequential(
                OrderedDict(
                    depthwise=nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
                    depthwise_norm=nn.BatchNorm2d(in_channels),
                    depthwise_act=nn.GELU(),
                    pointwise=nn.Conv2d(in_channels, embed_channels, 1, bias=False),
                    pointwise_norm=nn.BatchNorm2d(embed_channels),
                    pointwise_act=nn.GELU(),
                )
            )
        else:
            self.embed_conv = nn.Identity()
        self.guide_fc = nn.Linear(guide_channels, embed_channels)
        self.scale = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        self.offset = nn.Parameter(torch.zeros(1, num_heads, 1, 1))

    def forward(self, features: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = features.shape
        # a per-image copy of the guide (same values) keeps the original's matmul shapes, hence its float32 round-off
        guide = self.guide_fc(text_embeddings.unsqueeze(0).expand(batch, -1, -1))
        guide = guide.reshape(batch, -1, self.num_heads, self.head_channels)
        embed = self.embed_conv(features).reshape(batch, self.num_heads, self.head_channels, height, width)
        if height * width * guide.shape[1] * batch * self.num_heads <= VAS_CHUNK_ELEMENTS:
            # the original's expression (its float32 round-off, which the decoder's hard masks amplify)
            similarity = torch.einsum("bmchw,bnmc->bmhwn", embed, guide) / math.sqrt(self.head_channels)
            gate = similarity.softmax(dim=-1).amax(dim=-1)
        else:
            gate = self._best_match(embed.reshape(batch * self.num_heads, self.head_channels, height * width),
                                    guide.permute(0, 2, 3, 1).reshape(batch * self.num_heads, self.head_channels, -1))
        gate = gate.reshape(batch, self.num_heads, height, width) * self.scale + self.offset
        features = features.reshape(batch, self.num_heads, -1, height, width) * gate.unsqueeze(2)
        return features.reshape(batch, channels, height, width)


    def _best_match(self, embed: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """max over the vocabulary of softmax(similarity), (G, C, P) x (G, C, N) -> (G, P); pixels go in chunks of
        about `VAS_CHUNK_ELEMENTS` similarities, so a large vocabulary does not hold a (P, N) matrix at once."""
        pixels, entries = embed.shape[-1], guide.shape[-1]
        chunk = max(1, min(pixels, VAS_CHUNK_ELEMENTS // max(1, entries * embed.shape[0])))
        scale = math.sqrt(self.head_channels)
        gates = []
        for start in range(0, pixels, chunk):
            similarity = torch.matmul(embed[..., start : start + chunk].transpose(1, 2), guide) / scale
            gates.append(similarity.softmax(dim=-1).amax(dim=-1))
        return gates[0] if len(gates) == 1 else torch.cat(gates, dim=-1)


class EovSegDynamicDepthwiseConvAttention(nn.Module):
    """Dynamic depth-wise "attention": each query predicts a 1-D kernel that convolves its value vector along the
    channel axis; then LayerNorm. The whole batch runs as one grouped convolution."""

    def __init__(self, hidden_dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.kernel_proj = nn.Linear(hidden_dim, kernel_size)
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        batch, num_queries, channels = value.shape
        kernels = self.kernel_proj(query).reshape(batch * num_queries, 1, self.kernel_size)
        out = F.conv1d(value.reshape(1, batch * num_queries, channels), kernels, groups=batch * num_queries, padding="same")
        return self.norm(out.reshape(batch, num_queries, channels))


class EovSegTDEE(nn.Module):
    """Two-way Dynamic Embedding Experts: fuses the mask-pooled aggregated embedding (update) with the mask-pooled
    spatial-awareness embedding (input) through two sigmoid routers computed from their product."""

    def __init__(self, in_channels: int = 256, feat_channels: int = 256, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or in_channels
        self.feat_channels = feat_channels
        self.dynamic_layer = nn.Linear(in_channels, 2 * feat_channels)
        self.input_layer = nn.Linear(in_channels, 2 * feat_channels)
        self.update_router = nn.Linear(in_channels, feat_channels)
        self.input_router = nn.Linear(in_channels, feat_channels)
        self.norm_in = nn.LayerNorm(feat_channels)
        self.input_norm_in = nn.LayerNorm(feat_channels)
        self.norm_out = nn.LayerNorm(feat_channels)
        self.input_norm_out = nn.LayerNorm(feat_channels)
        self.fc_layer = nn.Linear(feat_channels, out_channels)
        self.fc_norm = nn.LayerNorm(out_channels)
        self.activation = nn.GELU()

    def forward(self, update_embedding: torch.Tensor, input_embedding: torch.Tensor) -> torch.Tensor:
        update_in, update_out = self.dynamic_layer(update_embedding).split(self.feat_channels, dim=-1)
        input_in, input_out = self.input_layer(input_embedding).split(self.feat_channels, dim=-1)
        routed = input_in * update_in
        update_gate = self.norm_in(self.update_router(routed)).sigmoid()
        input_gate = self.input_norm_in(self.input_router(routed)).sigmoid()
        fused = update_gate * self.norm_out(update_out) + input_gate * self.input_norm_out(input_out)
        return self.activation(self.fc_norm(self.fc_layer(fused)))


class EovSegMLP(nn.Module):
    """A plain MLP with ReLU between layers."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class EovSegLightweightDecoderLayer(GradientCheckpointingLayer):
    """One stage of the light-weight decoder.

    Hard masks of the previous stage gather features per query; two dynamic depth-wise attentions update the
    gathered features and the kernels; self-attention and an FFN refine the kernels; new masks come from the kernels
    and the VAS features; mask pooling on the VAS features and on the spatial-awareness features, fused by TDEE and
    added to the kernels, gives the instance embedding classified against the text embeddings.
    """

    def __init__(self, config: EovSegConfig, spatial_channels: int):
        super().__init__()
        hidden = config.hidden_dim
        kernel_dim = hidden * config.conv_kernel_size_2d**2
        self.hard_mask_threshold = config.hard_mask_threshold
        self.float32_sensitive_ops = config.float32_sensitive_ops
        self.feature_attention = EovSegDynamicDepthwiseConvAttention(hidden, config.conv_kernel_size_1d)
        self.feature_attention_norm = nn.LayerNorm(kernel_dim)
        self.kernel_attention = EovSegDynamicDepthwiseConvAttention(hidden, config.conv_kernel_size_1d)
        self.kernel_attention_norm = nn.LayerNorm(kernel_dim)
        self.self_attention = EovSegAttention(config, kernel_dim, config.decoder_num_heads)
        self.self_attention_norm = nn.LayerNorm(kernel_dim)
        self.ffn = nn.Sequential(
            OrderedDict(fc1=nn.Linear(hidden, config.decoder_ffn_dim), act=nn.ReLU(), fc2=nn.Linear(config.decoder_ffn_dim, hidden))
        )
        self.ffn_norm = nn.LayerNorm(hidden)
        mask_fcs = []
        for _ in range(config.num_mask_fcs):
            mask_fcs += [nn.Linear(hidden, hidden, bias=False), nn.LayerNorm(hidden), nn.ReLU()]
        self.mask_fcs = nn.Sequential(*mask_fcs)
        self.mask_kernel_proj = nn.Linear(hidden, hidden)
        self.mask_pooling = EovSegMaskPooling()
        self.mask_pooling_proj = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden))
        self.spatial_pooling_proj = nn.Sequential(nn.LayerNorm(spatial_channels), nn.Linear(spatial_channels, hidden))
        self.tdee = EovSegTDEE(hidden, hidden, hidden)
        self.class_embed = EovSegMLP(hidden, hidden, config.embed_dim, config.class_embed_num_layers)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(
        self, spatial_features, features, kernels, mask_logits, vocabulary_embeddings, synonym_index, mask_features=None,
        output_attentions=False,
    ):
        # mask_features: the features the mask logits are computed from (in half precision with
        # `float32_sensitive_ops`: the decoder's float32 copy of `features`, made once for all stages)
        # in half precision a logit near 0 rounds to a sigmoid of exactly 0.5 and flips the hard mask
        logits = _at_least_float32(mask_logits) if self.float32_sensitive_ops else mask_logits
        hard_masks = (logits.sigmoid() > self.hard_mask_threshold).to(features.dtype)
        gathered = torch.einsum("bnhw,bchw->bnc", hard_masks, features)
        gathered = self.feature_attention_norm(gathered + self.feature_attention(kernels, gathered))
        kernels = self.kernel_attention_norm(gathered + self.kernel_attention(kernels, gathered))
        attended, attention = self.self_attention(kernels, output_attentions)
        kernels = self.self_attention_norm(kernels + attended)
        kernels = self.ffn_norm(kernels + self.ffn(kernels))

        mask_kernels = self.mask_kernel_proj(self.mask_fcs(kernels))
        if self.float32_sensitive_ops and features.dtype in HALF_DTYPES:
            # the masks' boundaries are where the logits are near 0: half-precision rounding moves them
            mask_features = features.float() if mask_features is None else mask_features
            mask_logits = torch.einsum("bqc,bchw->bqhw", mask_kernels.float(), mask_features)
        else:
            mask_logits = torch.einsum("bqc,bchw->bqhw", mask_kernels, features)

        weights = None  # both poolings binarize the same masks: once when sizes and dtypes agree
        if features.shape[-2:] == spatial_features.shape[-2:] and features.dtype == spatial_features.dtype:
            weights = self.mask_pooling.pooling_weights(mask_logits, features.shape[-2:], features.dtype)
        pooled = self.mask_pooling_proj(self.mask_pooling(features, mask_logits, weights))
        spatial_pooled = self.spatial_pooling_proj(self.mask_pooling(spatial_features, mask_logits, weights))
        instance_embeddings = self.tdee(pooled, spatial_pooled)
        class_embeddings = self.class_embed(instance_embeddings + kernels)
        embeddings, text, scale = class_embeddings, vocabulary_embeddings, self.logit_scale
        if self.float32_sensitive_ops:  # logits up to 100 (scaled cosines): half precision rounds them by ~0.5
            embeddings, text, scale = (_at_least_float32(t) for t in (embeddings, text, scale))
        class_logits = classification_logits(embeddings, text, scale, synonym_index)
        return class_logits, mask_logits, kernels, class_embeddings, attention


class EovSegLayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class EovSegChannelsLastConvTranspose2d(nn.ConvTranspose2d):
    """A transposed convolution given channels-last input, returning channels-last output.

    oneDNN computes transposed convolutions in channels-last memory; for NCHW input PyTorch converts the input and the
    output around it: the same numbers (bit for bit) in about twice the time on the decoder's x4 upscaling of the
    spatial-awareness features. Later layers take either memory layout.
    """

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last), output_size)


class EovSegLightweightDecoder(nn.Module):
    """VAS, initial masks from learned object kernels, x4 upsampling of the spatial-awareness features, then
    `num_stages` [`EovSegLightweightDecoderLayer`]s."""

    def __init__(self, config: EovSegConfig, spatial_channels: int):
        super().__init__()
        self.vas = EovSegVAS(config.hidden_dim, config.embed_dim, config.embed_dim, config.vas_num_heads)
        self.object_kernels = nn.Embedding(config.num_proposals, config.hidden_dim)
        self.spatial_upscaling = nn.Sequential(
            nn.ConvTranspose2d(spatial_channels, spatial_channels, kernel_size=2, stride=2),
            EovSegLayerNorm2d(spatial_channels),
            nn.GELU(),
            EovSegChannelsLastConvTranspose2d(spatial_channels, spatial_channels, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.layers = nn.ModuleList(EovSegLightweightDecoderLayer(config, spatial_channels) for _ in range(config.num_stages))

    def forward(self, spatial_features, features, vocabulary_embeddings, synonym_index, output_attentions=False):
        """Returns the VAS features, then per stage the class logits, mask logits, queries, class embeddings and (with
        `output_attentions`, else None) the self-attention weights."""
        features = self.vas(features, vocabulary_embeddings)
        # the weight itself, not a lookup's copy: BLAS rounds by the memory's alignment, and the decoder's hard masks
        # amplify that past the original's noise (the guard); loaded here when offloaded
        with offloaded_weights_loaded([self.object_kernels]):
            kernels = self.object_kernels.weight.unsqueeze(0).expand(features.shape[0], -1, -1)
        mask_logits = torch.einsum("bnc,bchw->bnhw", kernels, features)
        spatial_features = self.spatial_upscaling(spatial_features)
        class_logits_per_stage, mask_logits_per_stage = [], []
        # per stage: the updated queries (kernels) and the class embeddings E_q, for OPSNet's options
        queries_per_stage, embeddings_per_stage, attentions_per_stage = [], [], []
        # the float32 copy the stages' mask logits use in half precision, made once and only when a stage uses it
        half = features.dtype in HALF_DTYPES
        mask_features = features.float() if half and any(l.float32_sensitive_ops for l in self.layers) else None
        for layer in self.layers:
            class_logits, mask_logits, kernels, embeddings, attention = layer(
                spatial_features, features, kernels, mask_logits, vocabulary_embeddings, synonym_index,
                mask_features=mask_features, output_attentions=output_attentions,
            )
            class_logits_per_stage.append(class_logits)
            mask_logits_per_stage.append(mask_logits)
            queries_per_stage.append(kernels)
            embeddings_per_stage.append(embeddings)
            attentions_per_stage.append(attention)
        attentions = tuple(attentions_per_stage) if output_attentions else None
        return features, class_logits_per_stage, mask_logits_per_stage, queries_per_stage, embeddings_per_stage, attentions


class EovSegOutOfVocabularyEmbedder(nn.Module):
    """The out-of-vocabulary branch's embedder: the (B, Q, D) CLIP embedding of each predicted mask from the frozen
    dense CLIP features (the model classifies them against the vocabulary, as the decoder's instance embeddings).

    ConvNeXt: mask pooling, then the trunk head and the projection head of the CLIP vision tower. ResNet: CLIP's
    attention pooling with each query's attention restricted to its mask (a mask with no positive pixel gets a
    zero attention output; its CLIP probabilities are not used when `ensemble_on_valid_mask` is set).
    """

    def __init__(self):
        super().__init__()
        self.mask_pooling = EovSegMaskPooling()

    def forward(self, backbone: EovSegClipBackbone, dense: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        visual = backbone.clip_model.visual
        if backbone.backbone_type == "convnext":
            pooled = self.mask_pooling(dense, mask_logits)
            batch, queries, channels = pooled.shape
            x = visual.trunk.head(pooled.reshape(batch * queries, channels, 1, 1))
            x = visual.head(x)
            return x.reshape(batch, queries, -1)
        with offloaded_weights_loaded([visual.attnpool]):  # its positional embedding is read here
            return self._masked_attention_pool(visual.attnpool, dense, mask_logits)

    @staticmethod
    def _masked_attention_pool(attnpool: nn.Module, dense: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = dense.shape
        if mask_logits.shape[-2:] != (height, width):
            mask_logits = F.interpolate(mask_logits, size=(height, width), mode="bilinear", align_corners=False)
        num_queries = mask_logits.shape[1]
        heads = attnpool.num_heads
        pos = attnpool.positional_embedding.to(dense.dtype)
        tokens = dense.flatten(2).transpose(1, 2)  # (B, HW, C)
        keys = tokens + interpolate_positional_embedding(pos, height, width)
        query = (tokens.mean(dim=1, keepdim=True) + pos[:1]).expand(-1, num_queries, -1)  # (B, Q, C)

        # A query attends only to the pixels of its mask. For an empty mask every key is masked: torch's attention
        # then returns zeros (no NaN), as it does in the original; such queries are left out of the ensemble.
        inside = (mask_logits.flatten(2) > 0).unsqueeze(1)  # (B, 1, Q, HW), broadcast over heads

        def split(x):
            return x.reshape(batch, x.shape[1], heads, -1).transpose(1, 2)

        q = split(attnpool.q_proj(query))
        k = split(attnpool.k_proj(keys))
        v = split(attnpool.v_proj(keys))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=inside)
        # the zeros said explicitly: exported attention (ONNX) gives an empty mask's row uniform weights instead
        out = out.masked_fill(~inside.any(-1, keepdim=True), 0)
        out = out.transpose(1, 2).reshape(batch, num_queries, -1)
        return attnpool.c_proj(out)


class EovSegGeometricEnsemble(nn.Module):
    """Geometric ensemble of in-vocabulary and out-of-vocabulary (CLIP) class probabilities, with void re-weighting.

    For seen classes p = p_in^(1 - alpha) * p_out^alpha, for unseen ones p = p_in^(1 - beta) * p_out^beta (both over
    the K real classes); the combined logits log p are soft-maxed, scaled by (1 - void probability) of the decoder and
    the void probability appended. Returns log(p + 1e-8).
    """

    def __init__(self, alpha: float, beta: float, on_valid_mask: bool):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.on_valid_mask = on_valid_mask

    def forward(self, in_vocab_logits, out_vocab_logits, seen_mask, valid_queries=None):
        in_probs = in_vocab_logits[..., :-1].softmax(-1)
        out_probs = out_vocab_logits[..., :-1].softmax(-1)
        seen = seen_mask.to(in_probs.dtype).expand_as(in_probs)
        alpha = torch.full_like(in_probs, self.alpha)
        beta = torch.full_like(in_probs, self.beta)
        if self.on_valid_mask and valid_queries is not None:
            valid = valid_queries.to(in_probs.dtype).unsqueeze(-1)
            alpha = alpha * valid
            beta = beta * valid
        seen_logits = (in_probs ** (1 - alpha) * out_probs**alpha).log()
        unseen_logits = (in_probs ** (1 - beta) * out_probs**beta).log()
        # The original computes `seen_logits * seen + unseen_logits * (1 - seen)`: where a probability underflows to
        # 0, the branch not taken is -inf and 0 * -inf is NaN. Selecting gives the same numbers where they are
        # finite; a -inf kept by the selection becomes the lowest finite value, so that a query whose classes all
        # underflow still has a (uniform) softmax instead of NaN.
        combined = torch.where(seen.bool(), seen_logits, unseen_logits)
        combined = combined.clamp_min(torch.finfo(combined.dtype).min)
        void_prob = in_vocab_logits.softmax(-1)[..., -1:]
        probs = torch.cat([combined.softmax(-1) * (1.0 - void_prob), void_prob], dim=-1)
        return torch.log(probs + 1e-8)


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained model
# ----------------------------------------------------------------------------------------------------------------------


def _explain_loading_error(err: Exception, source) -> Exception | None:
    """One line naming the folder and the problem for the errors of loading weights that transformers, torch and
    safetensors give as tracebacks or advice (None: leave the error as it is)."""
    message = str(err)
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in message:
        # torch's own message advises weights_only=False, which would run whatever code the file holds
        return OSError(f"{source}: the weights file holds Python objects besides tensors and was refused, since "
                       "unpickling them could run code; use a model.safetensors of this model instead.")
    if type(err).__name__ == "SafetensorError" or "deserializing header" in message:
        return OSError(f"{source}: a safetensors weights file is damaged or incomplete ({message.splitlines()[0]}).")
    if isinstance(err, RuntimeError) and ("ignore_mismatched_sizes" in message or "size mismatch" in message):
        return ValueError(f"{source}: the weights do not have the shapes its config describes (the config and the "
                          "weights are of different models; the report above lists them).")
    return None


class EovSegPreTrainedModel(PreTrainedModel):
    config_class = EovSegConfig
    base_model_prefix = "eovseg"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    # Each part of Fig. 4 stays on one device under `device_map`: the frozen towers, the neck, the decoder (whose
    # stages share the VAS features and the vocabulary embeddings).
    _no_split_modules = [
        "EovSegClipBackbone",
        "EovSegSpatialAwarenessExtractor",
        "EovSegLightAggregator",
        "EovSegLightweightDecoder",
    ]
    # The decoder stages are recomputed in the backward pass when enabled; the neck is not, as recomputing its batch
    # norms in training mode would update their running statistics twice.
    supports_gradient_checkpointing = True
    # The loss is normalised by the number of target masks, not by a token count: the Trainer must not pass
    # `num_items_in_batch` and must divide the loss by the gradient-accumulation steps itself (`forward` takes
    # `**kwargs`, from which the Trainer would otherwise infer the opposite).
    accepts_loss_kwargs = False
    # The ViT block's and the decoder stages' self-attention go through transformers' attention interface
    # (`EovSegAttention`): unmasked, non-causal attention over all tokens, which "eager" and torch's sdpa compute (the
    # original's nn.MultiheadAttention calls sdpa), as does any function registered with the interface.
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """Initialise one module through `transformers.initialization`, which leaves loaded tensors (flagged
        `_is_hf_initialized`) alone.

        Built directly, every module keeps what its constructor drew except the neck and the decoder stages, which
        get the original's initialisation as a whole (and in its order, so a seeded model is what it always was).
        Loaded (built on the meta device), whatever the checkpoint lacks gets the same rules module by module.
        The frozen CLIP towers come from checkpoints (`from_pretrained` refuses one that lacks a tower weight); built
        directly they keep open_clip's and timm's initialisation; built on the meta device they get defined values
        too (`_init_frozen_tower_module`), so that no tensor is ever left as uninitialised memory.
        """
        if getattr(module, "_eovseg_frozen", False):
            if not getattr(self, "_eovseg_built_directly", False):
                _init_frozen_tower_module(module)
            return
        if getattr(self, "_eovseg_built_directly", False):
            if isinstance(module, EovSegLightAggregator):
                _init_neck(module)
            elif isinstance(module, EovSegLightweightDecoderLayer):
                for sub in module.modules():
                    _init_decoder_stage_module(sub, attention=False)
            return
        rule = getattr(module, "_eovseg_init", None)
        if rule == "decoder_stage":
            _init_decoder_stage_module(module)
        elif rule is not None:
            _init_neck_module(module, rule)
        else:
            _init_torch_default(module)


def _init_neck(aggregator: EovSegLightAggregator):
    """The original's initialisation of the light aggregator: Xavier-uniform for every weight of 2 dimensions or more,
    then Kaiming-normal deformable kernels, zero offset convolutions and bilinear upsampling kernels."""
    for p in aggregator.parameters():
        if p.dim() > 1:
            init.xavier_uniform_(p)
    for layer in aggregator.deform_layers:
        init.kaiming_normal_(layer.deform_conv.weight, mode="fan_out", nonlinearity="relu")
        init.zeros_(layer.deform_conv.offset_conv.weight)
        init.zeros_(layer.deform_conv.offset_conv.bias)
        init.copy_(layer.upsample.weight, bilinear_upsampling_kernel(layer.upsample.weight.shape))


def _init_neck_module(module: nn.Module, rule: str):
    """`_init_neck`'s rule for one module of the neck (`rule`: "neck", "offset" or "bilinear")."""
    if rule == "offset":
        init.zeros_(module.weight)
        init.zeros_(module.bias)
    elif rule == "bilinear":
        init.copy_(module.weight, bilinear_upsampling_kernel(module.weight.shape))
    elif isinstance(module, EovSegModulatedDeformConv):
        init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, EovSegLightAggregator):
        init.xavier_uniform_(module.fuse_bias)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        init.xavier_uniform_(module.weight)
        _init_torch_default_bias(module)
    else:
        _init_torch_default(module)


def _init_decoder_stage_module(module: nn.Module, attention: bool = True):
    """The original's initialisation of a decoder stage: truncated-normal (std 0.02) linear weights, zero biases,
    unit layer norms, CLIP's initial logit scale; the attention's input projection keeps torch's (drawn by its
    constructor when built directly, hence `attention=False` then)."""
    if isinstance(module, nn.Linear):
        init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, EovSegLightweightDecoderLayer):
        init.constant_(module.logit_scale, math.log(1 / 0.07))
    elif isinstance(module, (nn.MultiheadAttention, EovSegAttention)) and attention:
        init.xavier_uniform_(module.in_proj_weight)
        init.zeros_(module.in_proj_bias)


def _init_torch_default_bias(module: nn.Module):
    if module.bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        init.uniform_(module.bias, -bound, bound)


def _init_torch_default(module: nn.Module):
    """torch's own initialisation of the modules outside the neck and the decoder stages."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        _init_torch_default_bias(module)
    elif isinstance(module, nn.Embedding):
        init.normal_(module.weight)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, EovSegLayerNorm2d)):
        init.ones_(module.weight)
        init.zeros_(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
    elif isinstance(module, (nn.MultiheadAttention, EovSegAttention)):
        init.xavier_uniform_(module.in_proj_weight)
        init.zeros_(module.in_proj_bias)
    elif isinstance(module, EovSegVAS):
        init.ones_(module.scale)
        init.zeros_(module.offset)
    elif isinstance(module, EovSegForPanopticSegmentation) and module.default_text_embeddings is not None:
        init.zeros_(module.default_text_embeddings)


_TORCH_DEFAULT_MODULES = (
    nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding, nn.LayerNorm, nn.BatchNorm2d, nn.MultiheadAttention
)


def _init_frozen_tower_module(module: nn.Module):
    """Values for one module of a frozen CLIP tower built on the meta device. A real model always loads the towers
    (they are never trained); these only make every tensor defined: torch's defaults for its layers, CLIP's initial
    logit scale, timm's initial layer scale, the text tower's causal mask, and the open_clip scale
    (`normal(0, width ** -0.5)`) for the remaining embeddings and projections."""
    if isinstance(module, _TORCH_DEFAULT_MODULES):
        _init_torch_default(module)
        return
    for name, param in module.named_parameters(recurse=False):
        if name == "logit_scale":
            init.constant_(param, math.log(1 / 0.07))
        elif name == "gamma":  # timm's ConvNeXt layer scale
            init.constant_(param, 1e-6)
        else:
            init.normal_(param, std=param.shape[-1] ** -0.5)
    for name, buffer in module.named_buffers(recurse=False):
        if name == "attn_mask":  # additive causal mask of the text tower
            init.copy_(buffer, torch.full(buffer.shape, float("-inf")).triu_(1))
        else:
            init.zeros_(buffer)


def vocabulary_fingerprint(input_ids: torch.Tensor) -> str:
    """A fingerprint of a vocabulary's prompts' token ids, independent of how far they are padded with 0."""
    length = int(input_ids.argmax(dim=-1).max()) + 1 if input_ids.numel() else 0  # the end token is the largest id
    return _hash_tensor(input_ids[:, :length])


def _hash_tensor(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha1(data + str(tuple(tensor.shape)).encode()).hexdigest()


_FORWARD_INPUTS_DOCSTRING = r"""
    Args:
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
            Normalized images, padded to a multiple of `config.size_divisibility`.
        pixel_mask (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            1 on valid pixels, 0 on padding; gives `image_sizes` in the output.
        input_ids (`torch.LongTensor` of shape `(num_prompts, length)`, *optional*):
            Token ids of every prompt of the vocabulary (class, synonym, template order), from `EovSegProcessor`.
        synonym_counts (`torch.LongTensor` of shape `(num_classes,)`, *optional*):
            Number of synonyms of each class; required with `input_ids` or `text_embeddings`.
        class_seen_mask (`torch.BoolTensor` of shape `(num_classes,)`, *optional*):
            Whether each class was seen in training (selects the ensemble weight alpha rather than beta);
            all unseen when not given.
        text_embeddings (`torch.FloatTensor` of shape `(num_synonyms, embed_dim)`, *optional*):
            Precomputed synonym embeddings from `get_text_embeddings`, instead of `input_ids`.
        mask_labels (`list[torch.FloatTensor]`, *optional*):
            Per image, (num_targets, height, width) binary target masks at the padded input size.
        class_labels (`list[torch.LongTensor]`, *optional*):
            Per image, (num_targets,) class indices into the vocabulary.
        output_hidden_states (`bool`, *optional*):
            Also return backbone, spatial, aggregator and VAS features and the text embeddings; defaults to
            `config.output_hidden_states`.
        output_attentions (`bool`, *optional*):
            Also return the attention weights of the decoder stages' self-attention (`attentions`) and of the ViT
            block (`spatial_attentions`); defaults to `config.output_attentions`. The weights are formed by the
            `"eager"` attention function for this call whatever `attn_implementation` the model uses (`"sdpa"` never
            forms them); the outputs then carry eager's float32 round-off.
        return_dict (`bool`, *optional*):
            Return an [`EovSegOutput`] (default) or a tuple.
        class_ensemble (`str`, *optional*):
            Eval-mode class scoring for this call, `"geometric"` or `"embedding_modulation"`; defaults to
            `config.class_ensemble`. Embedding Modulation needs `train_input_ids` and `train_synonym_counts`.
        train_input_ids (`torch.LongTensor` of shape `(num_prompts, length)`, *optional*):
            Prompt token ids of the training vocabulary (Embedding Modulation), from
            `EovSegProcessor(..., class_ensemble="embedding_modulation")`.
        train_synonym_counts (`torch.LongTensor` of shape `(num_train_classes,)`, *optional*):
            Number of synonyms of each training class.
        image_labels (`list[torch.LongTensor | None]`, *optional*):
            Decoupled Supervision: per image, the class indices (into the image-level vocabulary) of its
            image-level labels, or None for an image with panoptic targets (`mask_labels` / `class_labels`; give
            empty ones for image-level images).
        image_label_input_ids (`torch.LongTensor` of shape `(num_prompts, length)`, *optional*):
            Prompt token ids of the image-level vocabulary (kept apart from the panoptic one).
        image_label_synonym_counts (`torch.LongTensor` of shape `(num_image_label_classes,)`, *optional*):
            Number of synonyms of each image-level class.
"""


class EovSegForPanopticSegmentation(EovSegPreTrainedModel):
    """EOV-Seg for open-vocabulary panoptic (and semantic / instance) segmentation.

    Give it normalized, padded `pixel_values` (from [`EovSegImageProcessor`]) and a vocabulary: token ids of the
    prompts from [`EovSegProcessor`] (`input_ids`, `synonym_counts`, `class_seen_mask`), or precomputed
    `text_embeddings` from [`~EovSegForPanopticSegmentation.get_text_embeddings`]; with neither, the default
    vocabulary of the configuration is used, whose embeddings are stored with the weights.
    """

    _keys_to_ignore_on_load_unexpected = [r"clip_backbone\.clip_model\.attn_mask"]

    def __init__(self, config: EovSegConfig):
        super().__init__(config)
        self.clip_backbone = EovSegClipBackbone(config)
        self.spatial_extractor = EovSegSpatialAwarenessExtractor(config)
        for frozen in (self.clip_backbone, self.spatial_extractor):
            for m in frozen.modules():
                m._eovseg_frozen = True
        self.aggregator = EovSegLightAggregator(config, self.clip_backbone.channels[1:])
        self.decoder = EovSegLightweightDecoder(config, self.spatial_extractor.width)
        self.void_embedding = nn.Embedding(1, config.embed_dim)
        self.ensemble = EovSegGeometricEnsemble(
            config.geometric_ensemble_alpha, config.geometric_ensemble_beta, config.ensemble_on_valid_mask
        )
        if config.vocabulary:
            num_synonyms = sum(count_synonyms(config.vocabulary))
            self.register_buffer("default_text_embeddings", torch.zeros(num_synonyms, config.embed_dim))
        else:  # a buffer slot all the same, so that `set_default_vocabulary` can fill it
            self.register_buffer("default_text_embeddings", None)
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._verified_vocabulary: tuple | None = None
        self.embedding_modulation = EovSegEmbeddingModulation(
            config.modulation_alpha, config.debias_beta, config.modulation_normalize
        )
        self.mask_filtering = (
            EovSegMaskFiltering(config.hidden_dim, config.num_stages, config.iou_mask_threshold)
            if config.mask_filtering
            else None
        )
        self.decoupled_supervision = EovSegDecoupledSupervision(
            config.supervision_iou_threshold, config.match_loss_with_void
        )
        self.text_cache_size = 8
        self.num_text_encoder_calls = 0
        self.criterion = EovSegLoss(config)
        self._tag_initialisation_rules()
        # `_init_weights` reads this: built directly (not on the meta device for loading), only the neck and the
        # decoder stages are initialised again, as the original does.
        self._eovseg_built_directly = not self.void_embedding.weight.is_meta
        self.post_init()
        self._eovseg_built_directly = False

    def _tag_initialisation_rules(self):
        for module in self.aggregator.modules():
            module._eovseg_init = "neck"
        for layer in self.aggregator.deform_layers:
            layer.deform_conv.offset_conv._eovseg_init = "offset"
            layer.upsample._eovseg_init = "bilinear"
        for module in self.decoder.layers.modules():
            module._eovseg_init = "decoder_stage"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        check_pretrained_source(pretrained_model_name_or_path)
        wants_info = kwargs.get("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, **{**kwargs, "output_loading_info": True}
            )
        except Exception as err:  # safetensors' errors derive from Exception only
            explained = _explain_loading_error(err, pretrained_model_name_or_path)
            if explained is None:
                raise
            raise explained from err
        # `from_pretrained(None, config=..., state_dict={})` loads nothing: a build from the configuration
        if pretrained_model_name_or_path is not None or kwargs.get("state_dict"):
            _check_towers_loaded(info, pretrained_model_name_or_path)
        # Loading puts new parameters in place (requires_grad=True): the CLIP towers are frozen again here, so that
        # every fine-tuning entry point (our train loop, Trainer, a plain optimizer) sees them frozen.
        model.freeze_clip_towers()
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with the default vocabulary's text embeddings brought up to date first
        (see [`~EovSegForPanopticSegmentation.store_default_vocabulary`]), so that every saved folder (the
        Trainer's too) runs in the pipelines with no class list; then the folder gets the code files for
        `trust_remote_code`, the pipelines' entries and a model card (where `eovseg` is imported)."""
        check_save_directory(save_directory)
        if self.store_default_vocabulary() and kwargs.get("state_dict") is not None:
            # the Trainer hands over a state dict taken before this call
            kwargs["state_dict"] = {**kwargs["state_dict"], "default_text_embeddings": self.default_text_embeddings}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            complete_saved_folder(save_directory, self)
        return result

    def freeze_clip_towers(self) -> None:
        """No gradients for the frozen CLIP towers (the CNN CLIP and the ViT block), as in the original."""
        for tower in (self.clip_backbone, self.spatial_extractor):
            tower.requires_grad_(False)

    # ------------------------------------------------------------------ vocabulary

    def _clear_text_cache(self):
        self._text_cache.clear()

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting the model invalidates cached text embeddings.
        self._text_cache = OrderedDict()
        return super()._apply(fn, *args, **kwargs)

    def _check_input_ids(self, input_ids) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise EovSegInputError(f"input_ids must be a 2-D (num_prompts, length) tensor, got {shape}.")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise EovSegInputError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}.")
        vocab_size = self.clip_backbone.clip_model.token_embedding.num_embeddings
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
            raise EovSegInputError(
                f"input_ids holds token ids from {int(input_ids.min())} to {int(input_ids.max())}; this model's text "
                f"tower knows ids 0 to {vocab_size - 1} (tokenize with this model's EovSegProcessor)."
            )
        context = self.clip_backbone.clip_model.positional_embedding.shape[0]
        if input_ids.shape[1] > context:
            raise EovSegInputError(f"input_ids are {input_ids.shape[1]} tokens long; the text tower takes {context}.")

    @torch.no_grad()
    def get_text_embeddings(self, input_ids: torch.LongTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Embeddings (S, D) of every synonym from its prompts' token ids (S * num_templates, L) ordered by synonym then
        template: each prompt's embedding normalized, averaged over the templates, normalized again.

        Results are cached by the token ids, the text tower's weights and the precision, so a repeated vocabulary
        costs no text pass; the caller gets its own copy. In float32 (the default) the prompts go as given,
        `config.text_chunk_size` at a time, each chunk only as long as its longest prompt (the original's grouping,
        hence its round-off). `dtype` (default `config.text_encoder_dtype`) `torch.bfloat16` or `torch.float16` runs
        the text tower's matrix products in that precision, each distinct prompt once and the beginnings many prompts
        share once ([`EovSegPrefixSharingTextEncoder`]).
        """
        return self._cached_text_embeddings(input_ids, dtype).clone()

    @torch.no_grad()
    def _cached_text_embeddings(self, input_ids: torch.LongTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        # The cache's own tensor: used by the model only, never handed out.
        self._check_input_ids(input_ids)
        num_templates = len(PROMPT_TEMPLATES)
        if input_ids.shape[0] == 0 or input_ids.shape[0] % num_templates:
            raise EovSegInputError(
                f"input_ids has {input_ids.shape[0]} prompts; expected a positive multiple of {num_templates} "
                "(every synonym in every prompt template), as EovSegProcessor makes them."
            )
        # Keyed by the token ids and by the text tower's weights as they are now (any in-place change, such as
        # load_state_dict or an optimizer step, bumps a tensor's version; a replaced tensor has another address).
        text_dtype = dtype if dtype is not None else getattr(torch, self.config.text_encoder_dtype or "", None)
        key = (_hash_tensor(input_ids), self._text_tower_signature(), str(text_dtype))
        dtype = self.void_embedding.weight.dtype
        cached = self._text_cache.get(key)
        if cached is not None:
            self._text_cache.move_to_end(key)
            return cached
        embeddings = self._encode_prompts(input_ids, text_dtype)
        self.num_text_encoder_calls += 1
        embeddings = F.normalize(embeddings.reshape(-1, num_templates, embeddings.shape[-1]).mean(1), dim=-1).to(dtype)
        self._text_cache[key] = embeddings
        while len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return embeddings

    def _text_tower_signature(self) -> tuple:
        clip = self.clip_backbone.clip_model
        tensors = [clip.token_embedding.weight, clip.positional_embedding, clip.text_projection]
        tensors += [*clip.transformer.parameters(), *clip.ln_final.parameters()]
        return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)

    def load_state_dict(self, *args, **kwargs):
        self._clear_text_cache()
        self._verified_vocabulary = None
        return super().load_state_dict(*args, **kwargs)

    def _encode_prompts(self, input_ids: torch.LongTensor, text_dtype: torch.dtype | None) -> torch.Tensor:
        """Unit-normalized embeddings (P, D) of prompts (P, L).

        Float32 (the default): `config.text_chunk_size` prompts at a time in the given order, as the original groups
        them, each chunk only as long as its longest prompt; regrouping changes the float32 round-off, which the
        decoder's hard masks amplify past the original's own noise. With a reduced `text_dtype`: distinct prompts
        only, their shared beginnings once (`EovSegClipBackbone.encode_text_reduced`)."""
        device = self.void_embedding.weight.device
        size = self.config.text_chunk_size
        if text_dtype is None or text_dtype == torch.float32:
            chunks = []
            with text_pass_progress(input_ids.shape[0]) as progress:
                for start in range(0, input_ids.shape[0], size):
                    chunks.append(self.clip_backbone.encode_text(input_ids[start : start + size].to(device)))
                    progress.update(chunks[-1].shape[0])
            return F.normalize(_at_least_float32(torch.cat(chunks)), dim=-1)
        unique, inverse = torch.unique(input_ids.to(device), dim=0, return_inverse=True)
        with text_pass_progress(unique.shape[0]) as progress:
            encoded = self.clip_backbone.encode_text_reduced(unique, text_dtype, size, progress)
        return F.normalize(encoded, dim=-1)[inverse]

    @torch.no_grad()
    def set_default_vocabulary_embeddings(self, input_ids: torch.LongTensor) -> None:
        """Compute and store (with the weights) the text embeddings of `config.vocabulary` from its prompts' ids
        (`EovSegProcessor.encode_vocabulary(config.vocabulary)["input_ids"]`), with a fingerprint of those ids in
        `config.default_vocabulary_fingerprint`. This is the one way to store default-vocabulary embeddings: a model
        whose config's vocabulary no longer matches the fingerprint re-encodes it (or refuses) instead of using
        embeddings of other names."""
        if self.default_text_embeddings is None:
            raise EovSegInputError("This model's config has no default vocabulary (config.vocabulary is empty).")
        embeddings = self.get_text_embeddings(input_ids)
        if embeddings.shape != self.default_text_embeddings.shape:
            raise EovSegInputError(
                f"The prompts give {embeddings.shape[0]} synonyms, but the default vocabulary has "
                f"{self.default_text_embeddings.shape[0]}."
            )
        self.default_text_embeddings.copy_(embeddings)
        self.config.default_vocabulary_fingerprint = vocabulary_fingerprint(input_ids)
        self._verified_vocabulary = tuple(self.config.vocabulary)

    @torch.no_grad()
    def store_default_vocabulary(self) -> bool:
        """Make sure the stored default-vocabulary embeddings are those of `config.vocabulary` (encoding them when
        they are not: a model built from a preset has zeros, an edited config.vocabulary other names). A model with
        no default vocabulary takes its training vocabulary (`config.train_vocabulary`, every class a thing), else
        the built-in `coco_panoptic` (the training vocabulary of every released checkpoint). Returns whether the
        embeddings changed; a model that cannot encode the vocabulary (no text tower, weights not materialised, a
        text tower smaller than CLIP's tokenizer) is left as it is."""
        if not self._has_text_tower() or self.void_embedding.weight.is_meta:
            return False
        vocabulary = list(self.config.vocabulary or [])
        if not vocabulary:
            if self.config.train_vocabulary:
                names, is_thing = list(self.config.train_vocabulary), [True] * len(self.config.train_vocabulary)
            else:
                from .vocabularies import get_vocabulary

                default = get_vocabulary("coco_panoptic")
                names, is_thing = list(default.class_names), list(default.is_thing)
            input_ids = self._default_vocabulary_input_ids(names)
            if not self._can_encode(input_ids):
                return False
            self.set_default_vocabulary(names, is_thing, input_ids)
            return True
        input_ids = self._default_vocabulary_input_ids(vocabulary)
        if not self._can_encode(input_ids):
            return False
        stored = getattr(self.config, "default_vocabulary_fingerprint", None)
        if stored is not None and stored == vocabulary_fingerprint(input_ids):
            return False
        self.set_default_vocabulary_embeddings(input_ids)
        return True

    def _can_encode(self, input_ids: torch.LongTensor) -> bool:
        return int(input_ids.max()) < self.clip_backbone.clip_model.token_embedding.num_embeddings

    def _default_vocabulary_input_ids(self, vocabulary) -> torch.LongTensor:
        context = self.clip_backbone.clip_model.positional_embedding.shape[0]
        return open_clip.tokenize(build_prompts(vocabulary), context_length=context)

    def _has_text_tower(self) -> bool:
        return getattr(self.clip_backbone.clip_model, "transformer", None) is not None

    def _checked_default_embeddings(self) -> torch.Tensor:
        """The stored default-vocabulary embeddings, after checking (once per vocabulary) that they were computed
        from `config.vocabulary`'s prompts; re-encoded when they were not (the config was edited)."""
        vocabulary = tuple(self.config.vocabulary)
        stored = getattr(self.config, "default_vocabulary_fingerprint", None)
        if stored is None or self._verified_vocabulary == vocabulary:
            return self.default_text_embeddings
        input_ids = self._default_vocabulary_input_ids(vocabulary)
        if vocabulary_fingerprint(input_ids) != stored:
            if not self._has_text_tower():
                raise EovSegInputError(
                    "The stored default-vocabulary embeddings were computed for another vocabulary than "
                    "config.vocabulary (edited?), and this model has no text tower to encode it: pass the "
                    "vocabulary's text_embeddings, or restore config.vocabulary."
                )
            logger.warning(
                "config.vocabulary does not match the stored default-vocabulary embeddings (fingerprint of the "
                "prompts' token ids): encoding it with the text tower."
            )
            self.set_default_vocabulary_embeddings(input_ids)
        self._verified_vocabulary = vocabulary
        return self.default_text_embeddings

    @torch.no_grad()
    def set_default_vocabulary(
        self, class_names: list[str], is_thing: list[bool], input_ids: torch.LongTensor
    ) -> None:
        """Make `class_names` (with its thing flags) the default vocabulary: `config.vocabulary`, `config.is_thing`,
        `id2label` / `label2id` are updated and the text embeddings computed from the prompts' token ids
        (`EovSegProcessor.encode_vocabulary(class_names)["input_ids"]`) are stored with the weights, so that a saved
        model runs on it with no text pass (as `pipeline("image-segmentation")` does)."""
        class_names = validate_vocabulary(class_names, "default vocabulary")
        if len(is_thing) != len(class_names):
            raise EovSegInputError(f"is_thing has {len(is_thing)} flags for {len(class_names)} classes.")
        self.config.vocabulary = list(class_names)
        self.config.is_thing = [bool(t) for t in is_thing]
        self.config.id2label = {i: display_name(name) for i, name in enumerate(class_names)}
        self.config.label2id = {display_name(name): i for i, name in enumerate(class_names)}
        reference = self.void_embedding.weight
        num_synonyms = sum(count_synonyms(class_names))
        self.register_buffer(
            "default_text_embeddings",
            torch.zeros(num_synonyms, self.config.embed_dim, device=reference.device, dtype=reference.dtype),
        )
        self.set_default_vocabulary_embeddings(input_ids)

    def _resolve_vocabulary(self, input_ids, synonym_counts, class_seen_mask, text_embeddings, dtype) -> _Vocabulary:
        embeddings, counts, seen = self._vocabulary_tensors(input_ids, synonym_counts, class_seen_mask, text_embeddings)
        embeddings = embeddings.to(dtype)
        void = F.normalize(self.void_embedding.weight, dim=-1).to(dtype)
        return _Vocabulary(
            text_embeddings=embeddings,
            embeddings_with_void=torch.cat([embeddings, void], dim=0),
            synonym_index=build_synonym_index(counts, device=embeddings.device),
            seen=seen,
            is_default=input_ids is None and text_embeddings is None,
        )

    def _vocabulary_tensors(self, input_ids, synonym_counts, class_seen_mask, text_embeddings):
        """(synonym embeddings, synonyms per class as a list of ints, seen flags) from the inputs, or from the default
        vocabulary."""
        device = self.void_embedding.weight.device
        if input_ids is not None and text_embeddings is not None:
            raise EovSegInputError("Give either input_ids or text_embeddings, not both.")
        if input_ids is None and text_embeddings is None:
            stored = self.default_text_embeddings
            # (while tracing, the stored values are unknown: a model without them is refused in eager mode)
            if stored is None or (not _tracing() and not bool(stored.abs().sum() > 0)):
                raise EovSegInputError(
                    "No vocabulary was given and this model has no stored default-vocabulary embeddings: pass the "
                    "processor's text outputs (processor(images=..., text=class_names)) or text_embeddings."
                )
            embeddings = self._checked_default_embeddings()
            vocab = self.config.vocabulary
            seen = torch.tensor(seen_class_mask(vocab, self.config.train_vocabulary), device=device)
            return embeddings, count_synonyms(vocab), seen
        if synonym_counts is None:
            raise EovSegInputError("synonym_counts (the number of synonyms of each class) must come with the vocabulary.")
        counts = _synonym_counts_list(synonym_counts)
        if not counts or min(counts) <= 0:
            raise EovSegInputError("synonym_counts must be a non-empty list of positive integers (an empty vocabulary?).")
        if input_ids is not None:
            embeddings = self._cached_text_embeddings(input_ids)
        else:
            embeddings = self._check_text_embeddings(text_embeddings)
        if embeddings.shape[0] != sum(counts):
            raise EovSegInputError(
                f"The vocabulary has {embeddings.shape[0]} synonym embeddings but synonym_counts sums to {sum(counts)}."
            )
        if class_seen_mask is None:
            return embeddings, counts, torch.zeros(len(counts), dtype=torch.bool, device=device)
        seen = torch.as_tensor(class_seen_mask, device=device).to(torch.bool).flatten()
        if seen.shape[0] != len(counts):
            raise EovSegInputError(f"class_seen_mask has {seen.shape[0]} entries for {len(counts)} classes.")
        return embeddings, counts, seen

    # ------------------------------------------------------------------ OPSNet options

    def _check_class_ensemble(self, class_ensemble: str | None) -> str:
        from .configuration_eovseg import CLASS_ENSEMBLES

        class_ensemble = class_ensemble if class_ensemble is not None else self.config.class_ensemble
        if class_ensemble not in CLASS_ENSEMBLES:
            raise EovSegInputError(f"class_ensemble must be one of {', '.join(CLASS_ENSEMBLES)}, got {class_ensemble!r}.")
        return class_ensemble

    def _vocabulary_text(self, input_ids, counts, what: str, how: str):
        """Synonym embeddings and synonym indices of a second vocabulary (training or image-level) from its prompts."""
        if input_ids is None or counts is None:
            raise EovSegInputError(f"{what} needs the prompts of its vocabulary: {how}.")
        counts = torch.as_tensor(counts, device=self.void_embedding.weight.device).to(torch.long).flatten()
        if counts.numel() == 0 or bool((counts <= 0).any()):
            raise EovSegInputError(f"{what}: the synonym counts must be a non-empty list of positive integers.")
        text = self.get_text_embeddings(input_ids)
        if text.shape[0] != int(counts.sum()):
            raise EovSegInputError(
                f"{what}: {text.shape[0]} synonym embeddings but the synonym counts sum to {int(counts.sum())}."
            )
        return text, build_synonym_index(counts)

    def _train_vocabulary(self, train_input_ids, train_synonym_counts):
        return self._vocabulary_text(
            train_input_ids, train_synonym_counts, "Embedding Modulation",
            "pass train_input_ids and train_synonym_counts (processor(..., class_ensemble='embedding_modulation'))",
        )

    def _loss_with_image_labels(
        self, stage_class_logits, stage_mask_logits, stage_iou, class_embeddings, mask_labels, class_labels,
        image_labels, pixel_mask, image_label_input_ids, image_label_synonym_counts,
    ):
        """Decoupled Supervision: the set criterion (and IoU loss) on the images with panoptic targets, L_match and
        L_sum on the images with image-level labels (`image_labels[i]` not None)."""
        if not self.config.decoupled_supervision:
            raise EovSegInputError("image_labels were given but config.decoupled_supervision is off.")
        batch = stage_mask_logits[0].shape[0]
        if len(image_labels) != batch:
            raise EovSegInputError(f"image_labels has {len(image_labels)} entries for a batch of {batch} images.")
        labelled = [i for i, labels in enumerate(image_labels) if labels is not None]
        panoptic = [i for i in range(batch) if image_labels[i] is None]
        loss, loss_dict = None, {}
        if panoptic:
            if mask_labels is None or class_labels is None:
                raise EovSegInputError("Images without image_labels need mask_labels and class_labels.")
            loss, loss_dict = self.compute_loss(
                [x[panoptic] for x in stage_class_logits], [x[panoptic] for x in stage_mask_logits],
                [mask_labels[i] for i in panoptic], [class_labels[i] for i in panoptic],
                None if stage_iou is None else [x[panoptic] for x in stage_iou],
            )
        if labelled:
            text, synonym_index = self._vocabulary_text(
                image_label_input_ids, image_label_synonym_counts, "Decoupled Supervision",
                "pass image_label_input_ids and image_label_synonym_counts (the collator's image_label_vocabulary)",
            )
            void = F.normalize(self.void_embedding.weight, dim=-1)
            vocabulary_embeddings = torch.cat([text, void.to(text.dtype)], dim=0).to(class_embeddings.dtype)
            match, coverage = self.decoupled_supervision(
                class_embeddings[labelled], stage_mask_logits[-1][labelled], stage_iou[-1][labelled],
                None if pixel_mask is None else pixel_mask[labelled], [image_labels[i] for i in labelled],
                vocabulary_embeddings, synonym_index, self.decoder.layers[-1].logit_scale,
            )
            loss_dict.update(loss_match=match, loss_sum=coverage)
            extra = self.config.match_loss_weight * match + self.config.sum_loss_weight * coverage
            loss = extra if loss is None else loss + extra
        return loss, loss_dict

    def _complete_loss_dict(self, loss_dict: dict, loss: torch.Tensor) -> dict:
        """Every loss term, zero when the batch had no image of its kind: with Decoupled Supervision a batch may hold
        only panoptic or only image-level images, and a multi-process run logs the same terms on every process."""
        stages = range(self.config.num_stages)
        names = [f"s{stage}_{key}" for stage in stages for key in ("loss_ce", "loss_mask", "loss_dice", "loss_iou")]
        names += ["loss_match", "loss_sum"]
        zero = loss.detach() * 0.0
        return {name: loss_dict.get(name, zero) for name in names}

    # ------------------------------------------------------------------ forward

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Refuse what the kernels cannot take (a non-finite pixel crashes torchvision's deformable convolution), and
        cast floating inputs of another precision to the model's. Returns the pixel values to use."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise EovSegInputError(
                f"pixel_values must be a (batch, 3, height, width) RGB tensor, got {shape}; use EovSegImageProcessor."
            )
        if not pixel_values.is_floating_point():
            raise EovSegInputError(
                f"pixel_values has dtype {pixel_values.dtype}; the model takes normalized floating-point images "
                "(EovSegImageProcessor rescales and normalizes raw pixels)."
            )
        if _tracing():  # the values are unknown: the check goes into the traced program
            require_finite(pixel_values, "pixel_values holds NaN or infinite values; every pixel must be finite.")
        elif not bool(torch.isfinite(pixel_values).all()):
            bad = int((~torch.isfinite(pixel_values)).sum())
            raise EovSegInputError(f"pixel_values holds {bad} NaN or infinite value(s); every pixel must be finite.")
        height, width = pixel_values.shape[-2:]
        div = self.config.size_divisibility
        if height < div or width < div:
            raise EovSegInputError(f"The input is {height}x{width} pixels; EOV-Seg needs at least {div}x{div}.")
        if height % div or width % div:
            raise EovSegInputError(
                f"The input is {height}x{width}; height and width must be multiples of {div} (pad it, as "
                "EovSegImageProcessor does)."
            )
        dtype = self.void_embedding.weight.dtype
        if pixel_values.dtype != dtype and not torch.is_autocast_enabled(pixel_values.device.type):
            pixel_values = pixel_values.to(dtype)
        return pixel_values

    @staticmethod
    def _check_pixel_mask(pixel_mask, pixel_values: torch.Tensor) -> None:
        """A pixel mask must cover pixel_values pixel for pixel: (batch, height, width)."""
        if pixel_mask is None:
            return
        expected = (pixel_values.shape[0], *pixel_values.shape[-2:])
        if not isinstance(pixel_mask, torch.Tensor) or tuple(pixel_mask.shape) != expected:
            shape = tuple(pixel_mask.shape) if isinstance(pixel_mask, torch.Tensor) else type(pixel_mask).__name__
            raise EovSegInputError(
                f"pixel_mask has shape {shape} but pixel_values has shape {tuple(pixel_values.shape)}: the mask must be "
                f"(batch, height, width) = {expected}, as EovSegImageProcessor makes it."
            )
        if not _tracing():  # (data-dependent: left to the caller in an exported program)
            empty = [i for i in range(pixel_mask.shape[0]) if not bool(pixel_mask[i].any())]
            if empty:
                raise EovSegInputError(f"pixel_mask marks no valid pixel in image(s) {empty} of the batch: an image "
                                       "needs at least one (1 where the image is, 0 on its padding).")

    def _check_text_embeddings(self, text_embeddings) -> torch.Tensor:
        if not isinstance(text_embeddings, torch.Tensor) or text_embeddings.dim() != 2:
            shape = tuple(text_embeddings.shape) if isinstance(text_embeddings, torch.Tensor) else type(text_embeddings).__name__
            raise EovSegInputError(f"text_embeddings must be a (num_synonyms, embed_dim) tensor, got {shape}.")
        if text_embeddings.shape[1] != self.config.embed_dim:
            raise EovSegInputError(
                f"text_embeddings are {text_embeddings.shape[1]} wide; this model's text embeddings are "
                f"{self.config.embed_dim} wide (make them with this model's get_text_embeddings)."
            )
        if not text_embeddings.is_floating_point():
            raise EovSegInputError("text_embeddings must be finite floating-point values.")
        require_finite(text_embeddings, "text_embeddings must be finite floating-point values.")
        return text_embeddings.to(self.void_embedding.weight.device)

    @add_start_docstrings_to_model_forward(_FORWARD_INPUTS_DOCSTRING)
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        synonym_counts: torch.LongTensor | None = None,
        class_seen_mask: torch.BoolTensor | None = None,
        text_embeddings: torch.Tensor | None = None,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        class_ensemble: str | None = None,
        train_input_ids: torch.LongTensor | None = None,
        train_synonym_counts: torch.LongTensor | None = None,
        image_labels: list[torch.LongTensor | None] | None = None,
        image_label_input_ids: torch.LongTensor | None = None,
        image_label_synonym_counts: torch.LongTensor | None = None,
        **kwargs,
    ) -> EovSegOutput | tuple:
        """Fig. 4 of the paper, left to right: the frozen CLIP backbone and the spatial-awareness extractor, the
        light aggregator neck (`_encode_image`); the light-weight decoder, which applies Vocabulary-Aware Selection
        to the aggregated features before its stages (`_decode`); in eval mode the out-of-vocabulary head and the
        ensemble of both heads' scores (`_classify`); in training the set criterion (`_training_loss`)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        class_ensemble = self._check_class_ensemble(class_ensemble)
        pixel_values = self._check_pixel_values(pixel_values)
        self._check_pixel_mask(pixel_mask, pixel_values)
        if pixel_values.device.type == "cpu" and not _tracing():
            reuse_freed_memory()
        vocabulary = self._resolve_vocabulary(
            input_ids, synonym_counts, class_seen_mask, text_embeddings, pixel_values.dtype
        )

        image = self._encode_image(pixel_values, output_attentions)
        decoded = self._decode(image, vocabulary, output_attentions)
        class_logits, out_vocab_logits, domain_similarity = decoded.class_logits[-1], None, None
        if not self.training:
            class_logits, out_vocab_logits, domain_similarity = self._classify(
                image, decoded, vocabulary, class_ensemble, train_input_ids, train_synonym_counts
            )
        loss, loss_dict = self._training_loss(
            decoded.class_logits, decoded.mask_logits, decoded.iou, decoded.embeddings[-1], mask_labels, class_labels,
            image_labels, pixel_mask, image_label_input_ids, image_label_synonym_counts,
        )
        batch_size = pixel_values.shape[0]
        stage_masks = torch.stack(decoded.mask_logits, dim=1)
        stage_iou = torch.stack(decoded.iou, dim=1) if decoded.iou is not None else None
        stuff = self._default_stuff_class_ids(pixel_values.device) if vocabulary.is_default else None
        output = EovSegOutput(
            loss=loss,
            loss_dict=loss_dict,
            class_queries_logits=class_logits,
            masks_queries_logits=stage_masks[:, -1],
            stage_class_queries_logits=torch.stack(decoded.class_logits, dim=1),
            stage_masks_queries_logits=stage_masks,
            out_of_vocabulary_logits=out_vocab_logits,
            image_sizes=_image_sizes(pixel_values, pixel_mask),
            stuff_class_ids=_per_image(stuff, batch_size),
            iou_scores=stage_iou[:, -1] if stage_iou is not None else None,
            stage_iou_scores=stage_iou,
            domain_similarity=_per_image(domain_similarity, batch_size),
            **(_hidden_states(image, decoded, vocabulary) if output_hidden_states else {}),
            attentions=decoded.attentions,
            spatial_attentions=(image.spatial_attention,) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    def _encode_image(self, pixel_values: torch.Tensor, output_attentions: bool = False) -> _ImageFeatures:
        """The frozen CLIP backbone and the spatial-awareness extractor (no gradients), then the light aggregator
        neck on the backbone's res2-res5 features."""
        # The neck's deformable convolutions sample on one thread on CPU (torchvision's kernel): in inference the
        # extractor, which does not depend on the neck, runs beside it on another thread and fills the idle cores.
        # Every operation computes what it computes in sequence (same operations, same thread count).
        beside_the_neck = _can_overlap(pixel_values)  # asked before no_grad below: in training it runs in sequence
        with torch.no_grad():
            clip_features = self.clip_backbone(pixel_values)
            spatial = _Background(self.spatial_extractor, pixel_values, output_attentions, run_here=not beside_the_neck)
        aggregated = self.aggregator([clip_features[f"res{i}"] for i in range(2, 6)])
        spatial_features, spatial_attention = spatial.result()
        return _ImageFeatures(clip_features, spatial_features, aggregated, spatial_attention)

    def _decode(self, image: _ImageFeatures, vocabulary: _Vocabulary, output_attentions: bool = False) -> _Decoded:
        """The light-weight decoder (Vocabulary-Aware Selection first, then its stages), and with Mask Filtering
        each stage's IoU scores."""
        vas_features, class_logits, mask_logits, queries, embeddings, attentions = self.decoder(
            image.spatial, image.aggregated, vocabulary.embeddings_with_void, vocabulary.synonym_index,
            output_attentions=output_attentions,
        )
        iou = self.mask_filtering(queries) if self.mask_filtering is not None else None
        return _Decoded(vas_features, class_logits, mask_logits, embeddings, queries, iou, attentions)

    def _classify(self, image, decoded, vocabulary, class_ensemble, train_input_ids, train_synonym_counts):
        """Eval-mode class scores: the out-of-vocabulary head on the last stage's masks, ensembled with the decoder's
        scores. Returns (class logits, out-of-vocabulary logits, domain similarity)."""
        return self._ensemble_with_clip(
            image.clip["clip_dense"], decoded.mask_logits[-1], decoded.embeddings[-1], decoded.class_logits[-1],
            vocabulary, class_ensemble, train_input_ids, train_synonym_counts,
        )

    @torch.no_grad()
    def out_of_vocabulary_logits(self, clip_dense, mask_logits, vocabulary: _Vocabulary):
        """The out-of-vocabulary head: each mask's CLIP embedding from the frozen dense CLIP features, classified
        against the vocabulary with CLIP's logit scale. Returns the logits (B, Q, K + 1), which queries have a mask
        with at least one positive pixel at the CLIP feature resolution, and the CLIP embeddings (B, Q, D)."""
        masks = F.interpolate(mask_logits, size=clip_dense.shape[-2:], mode="bilinear", align_corners=False)
        clip_embeddings = self.clip_backbone.embed_masks(clip_dense, masks)
        with offloaded_weights_loaded([self.clip_backbone.clip_model]):
            logit_scale = self.clip_backbone.clip_model.logit_scale.to(clip_embeddings.device)
        classifier = vocabulary.embeddings_with_void
        if self.config.float32_sensitive_ops:  # the ensemble takes logs of these probabilities
            clip_embeddings, classifier, logit_scale = (
                _at_least_float32(t) for t in (clip_embeddings, classifier, logit_scale)
            )
        logits = classification_logits(clip_embeddings, classifier, logit_scale, vocabulary.synonym_index)
        return logits, (masks > 0).flatten(2).any(-1), clip_embeddings

    def _ensemble_with_clip(
        self, clip_dense, mask_logits, query_embeddings, class_logits, vocabulary, class_ensemble, train_input_ids,
        train_synonym_counts,
    ):
        """Eval-mode class scores: EOV-Seg's geometric ensemble of the decoder's and the out-of-vocabulary head's
        probabilities, or OPSNet's Embedding Modulation. Returns (class logits, CLIP logits, domain similarity)."""
        out_vocab_logits, valid, clip_embeddings = self.out_of_vocabulary_logits(clip_dense, mask_logits, vocabulary)
        if self.config.float32_sensitive_ops:
            class_logits = _at_least_float32(class_logits)
        if class_ensemble == "geometric":
            return self.ensemble(class_logits, out_vocab_logits, vocabulary.seen, valid), out_vocab_logits, None
        if self.config.ensemble_on_valid_mask:
            clip_embeddings = clip_embeddings * valid.unsqueeze(-1).to(clip_embeddings.dtype)
        train_text, train_index = self._train_vocabulary(train_input_ids, train_synonym_counts)
        classifier = vocabulary.embeddings_with_void
        with offloaded_weights_loaded([self.decoder.layers[-1]]):  # its logit scale is read here
            class_logits, domain_similarity = self.embedding_modulation(
                query_embeddings, clip_embeddings, classifier, vocabulary.synonym_index,
                train_text.to(classifier.dtype), train_index, self.decoder.layers[-1].logit_scale, class_logits,
            )
        return class_logits, out_vocab_logits, domain_similarity

    def _training_loss(
        self, stage_class_logits, stage_mask_logits, stage_iou, query_embeddings, mask_labels, class_labels,
        image_labels, pixel_mask, image_label_input_ids, image_label_synonym_counts,
    ):
        if image_labels is not None:
            loss, loss_dict = self._loss_with_image_labels(
                stage_class_logits, stage_mask_logits, stage_iou, query_embeddings, mask_labels, class_labels,
                image_labels, pixel_mask, image_label_input_ids, image_label_synonym_counts,
            )
        elif mask_labels is not None or class_labels is not None:
            loss, loss_dict = self.compute_loss(stage_class_logits, stage_mask_logits, mask_labels, class_labels, stage_iou)
        else:
            return None, None
        if self.config.decoupled_supervision:
            loss_dict = self._complete_loss_dict(loss_dict, loss)
        return loss, loss_dict

    def _default_stuff_class_ids(self, device) -> torch.LongTensor | None:
        if self.config.is_thing is None:
            return None
        stuff = [i for i, thing in enumerate(self.config.is_thing) if not thing]
        return torch.tensor(stuff, dtype=torch.long, device=device)

    def compute_loss(self, stage_class_logits, stage_mask_logits, mask_labels, class_labels, stage_iou=None):
        """The original's set criterion (Hungarian matching; cross-entropy with a down-weighted void class,
        point-sampled sigmoid BCE and dice) on every decoder stage, weighted and summed; with Mask Filtering, plus
        the IoU head's L2 loss on every stage (`s{stage}_loss_iou`), on the criterion's own matches."""
        if mask_labels is None or class_labels is None:
            raise EovSegInputError("Training needs both mask_labels and class_labels.")
        hook = None
        if stage_iou is not None:
            def hook(stage, indices):
                iou_loss = self.mask_filtering.loss(stage_iou[stage], stage_mask_logits[stage], mask_labels, indices)
                return {"loss_iou": (self.config.iou_loss_weight, iou_loss)}
        return self.criterion(
            list(stage_class_logits), list(stage_mask_logits), mask_labels, class_labels, stage_hook=hook
        )


_TOWER_PREFIXES = ("clip_backbone.", "spatial_extractor.")


def _check_towers_loaded(loading_info: dict, source) -> None:
    """A checkpoint must hold every weight of the frozen CLIP towers: they are never trained, so a weight initialised
    in their place (missing, or of another shape with `ignore_mismatched_sizes`) is never right."""
    mismatched = [entry[0] if isinstance(entry, tuple) else entry for entry in loading_info.get("mismatched_keys", ())]
    lacking = sorted(key for key in [*loading_info.get("missing_keys", ()), *mismatched] if key.startswith(_TOWER_PREFIXES))
    if lacking:
        shown = ", ".join(lacking[:4]) + (f" and {len(lacking) - 4} more" if len(lacking) > 4 else "")
        raise EovSegInputError(
            f"{source}: the checkpoint lacks {len(lacking)} weight(s) of the frozen CLIP towers ({shown}); the towers "
            "are never trained, so they must come from the checkpoint (convert the original checkpoint again)."
        )


def _synonym_counts_list(synonym_counts) -> list[int]:
    """Synonyms per class as Python ints. While torch.export or torch.compile traces the model a tensor's values are
    unknown, and the vocabulary's structure must be known: it is then given as a list of ints."""
    if isinstance(synonym_counts, (list, tuple)) and all(isinstance(c, int) for c in synonym_counts):
        return [int(c) for c in synonym_counts]
    if _tracing():
        raise EovSegInputError(
            "While torch.export or torch.compile traces the model, give synonym_counts as a list of ints (the "
            "vocabulary's structure is fixed in the traced program), not as a tensor."
        )
    return torch.as_tensor(synonym_counts).to(torch.long).flatten().tolist()


def _can_overlap(pixel_values: torch.Tensor) -> bool:
    """Inference on CPU with more than one intra-op thread."""
    return (
        pixel_values.device.type == "cpu" and not torch.is_grad_enabled() and torch.get_num_threads() > 1
        and not _tracing()
    )


class _Background:
    """`function(*args)` on a worker thread (or at once with `run_here`), with the caller's grad, inference-mode and
    intra-op thread settings (all per thread in PyTorch); `result()` waits and re-raises its error in the caller."""

    def __init__(self, function, *args, run_here: bool = False):
        self._value, self._error, self._thread = None, None, None
        if run_here:
            self._value = function(*args)
            return
        settings = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_num_threads())
        # a plain thread per call, not a pool: a pool's idle workers do not survive a fork (data-loader workers)
        self._thread = threading.Thread(target=self._run, args=(function, args, settings), daemon=True)
        self._thread.start()

    def _run(self, function, args, settings):
        grad, inference, threads = settings
        try:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                self._value = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            self._error = error

    def result(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self._value


class _Vocabulary(NamedTuple):
    """The vocabulary of one forward call, as the decoder and the out-of-vocabulary branch use it."""

    text_embeddings: torch.Tensor  # (S, D) normalized synonym embeddings
    embeddings_with_void: torch.Tensor  # (S + 1, D): the synonyms, then the normalized void embedding
    synonym_index: torch.LongTensor  # (K, max_synonyms) rows of each class's synonyms, -1 padded
    seen: torch.BoolTensor  # (K,) classes seen in training
    is_default: bool  # the configuration's default vocabulary (no text was given)


class _ImageFeatures(NamedTuple):
    """What `_encode_image` gives the decoder and the out-of-vocabulary head."""

    clip: dict[str, torch.Tensor]  # the CLIP backbone's res2-res5 and its dense features ("clip_dense")
    spatial: torch.Tensor  # the spatial-awareness extractor's features
    aggregated: torch.Tensor  # the light aggregator neck's output
    spatial_attention: torch.Tensor | None = None  # the ViT block's attention weights, with `output_attentions`


class _Decoded(NamedTuple):
    """What `_decode` gives: per decoder stage, class logits, mask logits, query embeddings and IoU scores."""

    vas: torch.Tensor  # the aggregated features after Vocabulary-Aware Selection
    class_logits: list[torch.Tensor]
    mask_logits: list[torch.Tensor]
    embeddings: list[torch.Tensor]
    queries: list[torch.Tensor]  # the decoder's query features (kernels) after each stage
    iou: list[torch.Tensor] | None  # with Mask Filtering only
    attentions: tuple[torch.Tensor, ...] | None = None  # each stage's self-attention weights, with `output_attentions`


def _hidden_states(image: _ImageFeatures, decoded: _Decoded, vocabulary: _Vocabulary) -> dict:
    """The `output_hidden_states` fields of [`EovSegOutput`]."""
    return {
        "backbone_hidden_states": tuple(image.clip[f"res{i}"] for i in range(2, 6)),
        "spatial_hidden_state": image.spatial,
        "aggregator_hidden_state": image.aggregated,
        "vas_hidden_state": decoded.vas,
        "decoder_hidden_states": tuple(decoded.queries),
        # never the cache's own tensor
        "text_embeddings": _per_image(vocabulary.text_embeddings.clone(), image.aggregated.shape[0]),
    }


def _per_image(value: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
    """A value shared by every image of the batch, repeated batch-first as an expanded view (no copy)."""
    return None if value is None else value.unsqueeze(0).expand(batch_size, *value.shape)


def _image_sizes(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.LongTensor:
    """(B, 2) height and width of each image's valid region: from `pixel_mask`, else the whole input."""
    if pixel_mask is None:
        size = torch.tensor(list(pixel_values.shape[-2:]), device=pixel_values.device)
        return size.repeat(pixel_values.shape[0], 1)  # (not a list times the batch size, which tracing would fix)
    rows = pixel_mask.any(dim=2).sum(dim=1)
    cols = pixel_mask.any(dim=1).sum(dim=1)
    return torch.stack([rows, cols], dim=1).to(torch.long)


__all__ = [
    "EovSegForPanopticSegmentation",
    "EovSegPreTrainedModel",
    "EovSegOutput",
    "EovSegVAS",
    "EovSegTDEE",
    "EovSegMaskPooling",
    "EovSegLightweightDecoderLayer",
    "EovSegDynamicDepthwiseConvAttention",
    "EovSegGeometricEnsemble",
    "EovSegOutOfVocabularyEmbedder",
]

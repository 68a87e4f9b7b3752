"""Mapping between the original EOV-Seg (detectron2) state-dict keys and ours.

The original checkpoint holds the whole model: the frozen open_clip CNN model under `cnn_backbone.clip_model.`, the
whole open_clip ViT model under `vit_backbone.clip_model.` (of which only the patch embedding, positional embedding,
`ln_pre` and the first residual block are used), the neck under `lite_aggr.`, the decoder under
`light_weight_decoder.` and the void embedding.
"""

from __future__ import annotations

import re

# (pattern on the original key, replacement). The first match wins; a key matching no rule is unexpected.
_RENAME_RULES: list[tuple[str, str]] = [
    (r"^cnn_backbone\.clip_model\.(.+)$", r"clip_backbone.clip_model.\1"),
    (r"^vit_backbone\.clip_model\.visual\.(conv1\.weight|class_embedding|positional_embedding|ln_pre\.weight|ln_pre\.bias)$", r"spatial_extractor.\1"),
    (r"^vit_backbone\.clip_model\.visual\.transformer\.resblocks\.0\.(.+)$", r"spatial_extractor.block.\1"),
    # light aggregator
    (r"^lite_aggr\.deconv\.lateral_conv(\d)\.(.+)$", r"aggregator.lateral_convs.\1.\2"),
    (r"^lite_aggr\.deconv\.deform_conv(\d)\.dcn_offset\.(.+)$", r"aggregator.deform_layers.{\1-1}.deform_conv.offset_conv.\2"),
    (r"^lite_aggr\.deconv\.deform_conv(\d)\.dcn\.weight$", r"aggregator.deform_layers.{\1-1}.deform_conv.weight"),
    (r"^lite_aggr\.deconv\.deform_conv(\d)\.dcn_bn\.(.+)$", r"aggregator.deform_layers.{\1-1}.deform_norm.\2"),
    (r"^lite_aggr\.deconv\.deform_conv(\d)\.up_sample\.(.+)$", r"aggregator.deform_layers.{\1-1}.upsample.\2"),
    (r"^lite_aggr\.deconv\.deform_conv(\d)\.up_bn\.(.+)$", r"aggregator.deform_layers.{\1-1}.upsample_norm.\2"),
    (r"^lite_aggr\.deconv\.conv_a5\.(.+)$", r"aggregator.fuse_convs.0.\1"),
    (r"^lite_aggr\.deconv\.conv_a4\.(.+)$", r"aggregator.fuse_convs.1.\1"),
    (r"^lite_aggr\.deconv\.conv_a3\.(.+)$", r"aggregator.fuse_convs.2.\1"),
    (r"^lite_aggr\.deconv\.conv_a2\.(.+)$", r"aggregator.fuse_convs.3.\1"),
    (r"^lite_aggr\.deconv\.bias$", r"aggregator.fuse_bias"),
    (r"^lite_aggr\.deconv\.output_conv\.(.+)$", r"aggregator.output_conv.\1"),
    (r"^lite_aggr\.loc_conv\.(.+)$", r"aggregator.coord_proj.\1"),
    # decoder
    (r"^light_weight_decoder\.object_kernels\.weight$", r"decoder.object_kernels.weight"),
    (r"^light_weight_decoder\.output_upscaling\.([013])\.(.+)$", r"decoder.spatial_upscaling.\1.\2"),
    (r"^light_weight_decoder\.vas\.embed_conv\.(depthwise|pointwise)\.weight$", r"decoder.vas.embed_conv.\1.weight"),
    (r"^light_weight_decoder\.vas\.embed_conv\.(depthwise|pointwise)\.norm\.(.+)$", r"decoder.vas.embed_conv.\1_norm.\2"),
    (r"^light_weight_decoder\.vas\.(guide_fc\.weight|guide_fc\.bias|scale|offset)$", r"decoder.vas.\1"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.tdee\.(.+)$", r"decoder.layers.\1.tdee.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.f_atten\.weight_linear\.(.+)$", r"decoder.layers.\1.feature_attention.kernel_proj.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.f_atten\.norm\.(.+)$", r"decoder.layers.\1.feature_attention.norm.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.f_atten_norm\.(.+)$", r"decoder.layers.\1.feature_attention_norm.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.k_atten\.weight_linear\.(.+)$", r"decoder.layers.\1.kernel_attention.kernel_proj.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.k_atten\.norm\.(.+)$", r"decoder.layers.\1.kernel_attention.norm.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.k_atten_norm\.(.+)$", r"decoder.layers.\1.kernel_attention_norm.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.s_atten\.(.+)$", r"decoder.layers.\1.self_attention.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.s_atten_norm\.(.+)$", r"decoder.layers.\1.self_attention_norm.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.ffn\.layers\.0\.0\.(.+)$", r"decoder.layers.\1.ffn.fc1.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.ffn\.layers\.1\.(.+)$", r"decoder.layers.\1.ffn.fc2.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.ffn_norm\.(.+)$", r"decoder.layers.\1.ffn_norm.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.mask_fcs\.(\d+)\.(.+)$", r"decoder.layers.\1.mask_fcs.\2.\3"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.fc_mask\.(.+)$", r"decoder.layers.\1.mask_kernel_proj.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\._mask_pooling_proj\.(.+)$", r"decoder.layers.\1.mask_pooling_proj.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\._spatial_mask_pooling_proj\.(.+)$", r"decoder.layers.\1.spatial_pooling_proj.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.class_embed\.(.+)$", r"decoder.layers.\1.class_embed.\2"),
    (r"^light_weight_decoder\.mask_heads\.(\d+)\.logit_scale$", r"decoder.layers.\1.logit_scale"),
    (r"^void_embedding\.weight$", r"void_embedding.weight"),
]

# Original keys our model does not hold: the rest of the ViT CLIP (blocks after the first, its head and its text
# tower), the criterion's class-weight buffer (rebuilt from the config), and non-persistent buffers if present.
_DROP_RULES: list[str] = [
    r"^vit_backbone\.",
    r"^light_weight_decoder\.criterion\.",
    r"^criterion\.",
    r"^pixel_(mean|std)$",
    r"^cnn_backbone\.clip_model\.attn_mask$",
]

_COMPILED_RENAMES = [(re.compile(p), r) for p, r in _RENAME_RULES]
_COMPILED_DROPS = [re.compile(p) for p in _DROP_RULES]
_ARITH = re.compile(r"\{(\d+)-1\}")


def original_key_to_ours(key: str) -> str | None:
    """Our name for an original key; None when our model does not hold it; raises KeyError when it is unknown."""
    for pattern, replacement in _COMPILED_RENAMES:
        if pattern.match(key):
            new_key = pattern.sub(replacement, key)
            return _ARITH.sub(lambda m: str(int(m.group(1)) - 1), new_key)
    for pattern in _COMPILED_DROPS:
        if pattern.match(key):
            return None
    raise KeyError(key)


def convert_original_state_dict(original: dict) -> tuple[dict, list[str], list[str]]:
    """Rename an original state dict. Returns (our state dict, dropped original keys, unexpected original keys)."""
    converted, dropped, unexpected = {}, [], []
    for key, value in original.items():
        try:
            new_key = original_key_to_ours(key)
        except KeyError:
            unexpected.append(key)
            continue
        if new_key is None:
            dropped.append(key)
        else:
            converted[new_key] = value
    return converted, dropped, unexpected


def ours_to_original_key(key: str) -> str:
    """The original name of one of our keys (for writing original-format checkpoints in tests)."""
    inverse = _inverse_rules()
    for pattern, replacement in inverse:
        match = pattern.match(key)
        if match:
            return re.sub(r"\{(\d+)\+1\}", lambda m: str(int(m.group(1)) + 1), pattern.sub(replacement, key))
    raise KeyError(key)


_INVERSE_CACHE: list | None = None


def _inverse_rules():
    global _INVERSE_CACHE
    if _INVERSE_CACHE is None:
        rules = [
            (r"^clip_backbone\.clip_model\.(.+)$", r"cnn_backbone.clip_model.\1"),
            (r"^spatial_extractor\.block\.(.+)$", r"vit_backbone.clip_model.visual.transformer.resblocks.0.\1"),
            (r"^spatial_extractor\.(.+)$", r"vit_backbone.clip_model.visual.\1"),
            (r"^aggregator\.lateral_convs\.(\d)\.(.+)$", r"lite_aggr.deconv.lateral_conv\1.\2"),
            (r"^aggregator\.deform_layers\.(\d)\.deform_conv\.offset_conv\.(.+)$", r"lite_aggr.deconv.deform_conv{\1+1}.dcn_offset.\2"),
            (r"^aggregator\.deform_layers\.(\d)\.deform_conv\.weight$", r"lite_aggr.deconv.deform_conv{\1+1}.dcn.weight"),
            (r"^aggregator\.deform_layers\.(\d)\.deform_norm\.(.+)$", r"lite_aggr.deconv.deform_conv{\1+1}.dcn_bn.\2"),
            (r"^aggregator\.deform_layers\.(\d)\.upsample\.(.+)$", r"lite_aggr.deconv.deform_conv{\1+1}.up_sample.\2"),
            (r"^aggregator\.deform_layers\.(\d)\.upsample_norm\.(.+)$", r"lite_aggr.deconv.deform_conv{\1+1}.up_bn.\2"),
            (r"^aggregator\.fuse_convs\.0\.(.+)$", r"lite_aggr.deconv.conv_a5.\1"),
            (r"^aggregator\.fuse_convs\.1\.(.+)$", r"lite_aggr.deconv.conv_a4.\1"),
            (r"^aggregator\.fuse_convs\.2\.(.+)$", r"lite_aggr.deconv.conv_a3.\1"),
            (r"^aggregator\.fuse_convs\.3\.(.+)$", r"lite_aggr.deconv.conv_a2.\1"),
            (r"^aggregator\.fuse_bias$", r"lite_aggr.deconv.bias"),
            (r"^aggregator\.output_conv\.(.+)$", r"lite_aggr.deconv.output_conv.\1"),
            (r"^aggregator\.coord_proj\.(.+)$", r"lite_aggr.loc_conv.\1"),
            (r"^decoder\.object_kernels\.weight$", r"light_weight_decoder.object_kernels.weight"),
            (r"^decoder\.spatial_upscaling\.(.+)$", r"light_weight_decoder.output_upscaling.\1"),
            (r"^decoder\.vas\.embed_conv\.(depthwise|pointwise)\.weight$", r"light_weight_decoder.vas.embed_conv.\1.weight"),
            (r"^decoder\.vas\.embed_conv\.(depthwise|pointwise)_norm\.(.+)$", r"light_weight_decoder.vas.embed_conv.\1.norm.\2"),
            (r"^decoder\.vas\.(.+)$", r"light_weight_decoder.vas.\1"),
            (r"^decoder\.layers\.(\d+)\.feature_attention\.kernel_proj\.(.+)$", r"light_weight_decoder.mask_heads.\1.f_atten.weight_linear.\2"),
            (r"^decoder\.layers\.(\d+)\.feature_attention\.norm\.(.+)$", r"light_weight_decoder.mask_heads.\1.f_atten.norm.\2"),
            (r"^decoder\.layers\.(\d+)\.feature_attention_norm\.(.+)$", r"light_weight_decoder.mask_heads.\1.f_atten_norm.\2"),
            (r"^decoder\.layers\.(\d+)\.kernel_attention\.kernel_proj\.(.+)$", r"light_weight_decoder.mask_heads.\1.k_atten.weight_linear.\2"),
            (r"^decoder\.layers\.(\d+)\.kernel_attention\.norm\.(.+)$", r"light_weight_decoder.mask_heads.\1.k_atten.norm.\2"),
            (r"^decoder\.layers\.(\d+)\.kernel_attention_norm\.(.+)$", r"light_weight_decoder.mask_heads.\1.k_atten_norm.\2"),
            (r"^decoder\.layers\.(\d+)\.self_attention\.(.+)$", r"light_weight_decoder.mask_heads.\1.s_atten.\2"),
            (r"^decoder\.layers\.(\d+)\.self_attention_norm\.(.+)$", r"light_weight_decoder.mask_heads.\1.s_atten_norm.\2"),
            (r"^decoder\.layers\.(\d+)\.ffn\.fc1\.(.+)$", r"light_weight_decoder.mask_heads.\1.ffn.layers.0.0.\2"),
            (r"^decoder\.layers\.(\d+)\.ffn\.fc2\.(.+)$", r"light_weight_decoder.mask_heads.\1.ffn.layers.1.\2"),
            (r"^decoder\.layers\.(\d+)\.mask_kernel_proj\.(.+)$", r"light_weight_decoder.mask_heads.\1.fc_mask.\2"),
            (r"^decoder\.layers\.(\d+)\.mask_pooling_proj\.(.+)$", r"light_weight_decoder.mask_heads.\1._mask_pooling_proj.\2"),
            (r"^decoder\.layers\.(\d+)\.spatial_pooling_proj\.(.+)$", r"light_weight_decoder.mask_heads.\1._spatial_mask_pooling_proj.\2"),
            (r"^decoder\.layers\.(\d+)\.(.+)$", r"light_weight_decoder.mask_heads.\1.\2"),
            (r"^void_embedding\.weight$", r"void_embedding.weight"),
        ]
        _INVERSE_CACHE = [(re.compile(p), r) for p, r in rules]
    return _INVERSE_CACHE

"""Behaviour of EovSegForPanopticSegmentation on the tiny presets (random weights, CPU)."""

import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision

from eovseg import EovSegConfig, EovSegForPanopticSegmentation
from eovseg.conversion_scripts.key_mapping import convert_original_state_dict, ours_to_original_key
from eovseg.modeling_eovseg import (
    EovSegGeometricEnsemble,
    EovSegDynamicDepthwiseConvAttention,
    EovSegInputError,
    EovSegMaskPooling,
    classification_logits,
    build_synonym_index,
)
from eovseg.vocabulary import (
    PROMPT_TEMPLATES,
    VocabularyError,
    build_prompts,
    seen_class_mask,
    synonym_counts,
    validate_vocabulary,
)

TOKENIZER = open_clip.get_tokenizer("RN50")  # open_clip's bundled BPE: no download


def vocab_inputs(config, vocabulary=None):
    vocabulary = vocabulary or config.vocabulary
    return {
        "input_ids": TOKENIZER(build_prompts(vocabulary)),
        "synonym_counts": torch.tensor(synonym_counts(vocabulary)),
        "class_seen_mask": torch.tensor(seen_class_mask(vocabulary, config.train_vocabulary)),
    }


def make_model(variant="tiny", seed=0):
    torch.manual_seed(seed)
    config = EovSegConfig.from_variant(variant)
    model = EovSegForPanopticSegmentation(config).eval()
    # Random weights everywhere, including what is initialised to constants (offsets, VAS scale/offset, norms).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                continue
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def tiny():
    return make_model("tiny")


@pytest.fixture(scope="module")
def tiny_convnext():
    return make_model("tiny_convnext")


@pytest.mark.parametrize("fixture", ["tiny", "tiny_convnext"])
def test_output_shapes(fixture, request):
    model = request.getfixturevalue(fixture)
    config = model.config
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(pixel_values, **vocab_inputs(config), output_hidden_states=True)
    num_classes = len(config.vocabulary)
    q = config.num_proposals
    assert out.class_queries_logits.shape == (2, q, num_classes + 1)
    assert out.masks_queries_logits.shape == (2, q, 16, 24)
    # every field batch-first: stages on the second dimension
    assert config.num_stages == 3
    assert out.stage_class_queries_logits.shape == (2, 3, q, num_classes + 1)
    assert out.stage_masks_queries_logits.shape == (2, 3, q, 16, 24)
    assert torch.equal(out.stage_masks_queries_logits[:, -1], out.masks_queries_logits)
    assert out.out_of_vocabulary_logits.shape == (2, q, num_classes + 1)
    assert out.spatial_hidden_state.shape[-2:] == (4, 6)
    assert out.aggregator_hidden_state.shape == (2, config.hidden_dim, 16, 24)
    assert out.text_embeddings.shape == (2, sum(synonym_counts(config.vocabulary)), config.embed_dim)
    assert torch.equal(out.text_embeddings[0], out.text_embeddings[1])
    assert out.image_sizes.tolist() == [[64, 96], [64, 96]]
    # eval-mode class logits are log-probabilities (plus 1e-8 per class) over K classes + void
    probs = out.class_queries_logits.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(2, q), atol=1e-5)
    assert torch.isfinite(out.class_queries_logits).all()


def test_tuple_output_and_image_sizes_from_pixel_mask(tiny):
    pixel_values = torch.randn(1, 3, 64, 96)
    pixel_mask = torch.zeros(1, 64, 96, dtype=torch.long)
    pixel_mask[:, :50, :70] = 1
    with torch.no_grad():
        out = tiny(pixel_values, pixel_mask=pixel_mask, **vocab_inputs(tiny.config))
        as_tuple = tiny(pixel_values, **vocab_inputs(tiny.config), return_dict=False)
    assert out.image_sizes.tolist() == [[50, 70]]
    assert torch.equal(as_tuple[0], out.class_queries_logits)


def test_save_and_load_round_trip(tiny, tmp_path):
    tiny.set_default_vocabulary_embeddings(vocab_inputs(tiny.config)["input_ids"])
    tiny.save_pretrained(tmp_path)
    loaded = EovSegForPanopticSegmentation.from_pretrained(tmp_path).eval()
    original_state, loaded_state = tiny.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key in original_state:
        assert torch.equal(original_state[key], loaded_state[key]), key
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = tiny(pixel_values)  # default vocabulary, stored with the weights
        b = loaded(pixel_values)
    # Parameters are bit-identical; loaded tensors live at other memory alignments, which lets BLAS round the last
    # bit differently, so outputs are compared at float32 round-off.
    torch.testing.assert_close(a.class_queries_logits, b.class_queries_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.masks_queries_logits, b.masks_queries_logits, atol=1e-5, rtol=0)
    # same weights in fresh memory: exactly the same outputs
    for p in loaded.parameters():
        p.data = p.data.clone()
    with torch.no_grad():
        c = loaded(pixel_values)
    assert torch.equal(a.class_queries_logits, c.class_queries_logits)
    assert torch.equal(a.masks_queries_logits, c.masks_queries_logits)


def test_default_vocabulary_matches_explicit_vocabulary(tiny):
    inputs = vocab_inputs(tiny.config)
    tiny.set_default_vocabulary_embeddings(inputs["input_ids"])
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        default = tiny(pixel_values)
        explicit = tiny(pixel_values, **inputs)
    assert torch.equal(default.class_queries_logits, explicit.class_queries_logits)
    # the default vocabulary's stuff classes travel with the outputs (for post-processing); not for given text
    assert default.stuff_class_ids.tolist() == [[4, 5, 6, 7]]
    assert explicit.stuff_class_ids is None


def test_batch_members_are_independent(tiny):
    """Two images of different sizes padded into one batch give, each, the output of that padded image alone."""
    small = torch.randn(3, 48, 64)
    large = torch.randn(3, 64, 96)
    batch = torch.zeros(2, 3, 64, 96)
    batch[0, :, :48, :64] = small
    batch[1] = large
    inputs = vocab_inputs(tiny.config)
    with torch.no_grad():
        together = tiny(batch, **inputs)
        alone = [tiny(batch[i : i + 1], **inputs) for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(together.class_queries_logits[i], alone[i].class_queries_logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together.masks_queries_logits[i], alone[i].masks_queries_logits[0], atol=1e-5, rtol=0)


def test_frozen_parts_get_no_gradient_and_decoder_does(tiny):
    model = tiny
    model.train()
    try:
        assert not model.clip_backbone.training and not model.spatial_extractor.training
        out = model(torch.randn(2, 3, 64, 64), **vocab_inputs(model.config))
        loss = out.stage_class_queries_logits.float().pow(2).mean() + out.masks_queries_logits.pow(2).mean()
        loss.backward()
        for name, p in model.named_parameters():
            if name.startswith(("clip_backbone.", "spatial_extractor.")):
                assert not p.requires_grad and p.grad is None, name
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(not n.startswith(("clip_backbone", "spatial_extractor")) for n in trainable)
        for name in ["decoder.layers.2.class_embed.layers.0.weight", "aggregator.coord_proj.weight",
                     "decoder.vas.guide_fc.weight", "void_embedding.weight", "decoder.layers.0.tdee.fc_layer.weight"]:
            grad = dict(model.named_parameters())[name].grad
            assert grad is not None and grad.abs().sum() > 0, name
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_deterministic(tiny):
    pixel_values = torch.randn(1, 3, 64, 64)
    inputs = vocab_inputs(tiny.config)
    with torch.no_grad():
        a = tiny(pixel_values, **inputs)
        b = tiny(pixel_values, **inputs)
    assert torch.equal(a.class_queries_logits, b.class_queries_logits)
    assert torch.equal(a.masks_queries_logits, b.masks_queries_logits)


def test_vocabulary_cache_hit_does_no_text_pass(tiny):
    tiny._clear_text_cache()
    inputs = vocab_inputs(tiny.config, ["zebra, okapi", "river"])
    calls = tiny.num_text_encoder_calls
    with torch.no_grad():
        tiny(torch.randn(1, 3, 64, 64), **inputs)
        assert tiny.num_text_encoder_calls == calls + 1
        tiny(torch.randn(1, 3, 64, 64), **{k: v.clone() for k, v in inputs.items()})
        assert tiny.num_text_encoder_calls == calls + 1
        tiny(torch.randn(1, 3, 64, 64), **vocab_inputs(tiny.config, ["zebra", "river"]))
        assert tiny.num_text_encoder_calls == calls + 2


def test_text_embeddings_match_open_clip_full_length(tiny):
    """Running only up to the longest prompt equals open_clip's own 77-token encode_text, and chunking changes
    nothing."""
    vocabulary = ["person, child", "a very long class name with many many words in it, and a synonym", "sky"]
    ids = TOKENIZER(build_prompts(vocabulary))
    tiny._clear_text_cache()
    ours = tiny.get_text_embeddings(ids)
    clip = tiny.clip_backbone.clip_model
    with torch.no_grad():
        reference = F.normalize(clip.encode_text(ids), dim=-1)
    reference = F.normalize(reference.reshape(-1, len(PROMPT_TEMPLATES), reference.shape[-1]).mean(1), dim=-1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    tiny._clear_text_cache()
    old = tiny.config.text_chunk_size
    tiny.config.text_chunk_size = 5
    try:
        chunked = tiny.get_text_embeddings(ids)
    finally:
        tiny.config.text_chunk_size = old
        tiny._clear_text_cache()
    torch.testing.assert_close(chunked, ours, atol=1e-5, rtol=0)
    assert ours.shape == (sum(synonym_counts(vocabulary)), tiny.config.embed_dim)


def test_precomputed_text_embeddings(tiny):
    inputs = vocab_inputs(tiny.config)
    embeddings = tiny.get_text_embeddings(inputs["input_ids"])
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = tiny(pixel_values, **inputs)
        b = tiny(pixel_values, text_embeddings=embeddings, synonym_counts=inputs["synonym_counts"],
                 class_seen_mask=inputs["class_seen_mask"])
    assert torch.equal(a.class_queries_logits, b.class_queries_logits)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("vocabulary,message", [
    ([], "empty"),
    ("person", "list of class-name strings"),
    (["person", 3], "only strings"),
    (["person", "person"], "duplicate"),
    (["person", " , "], "no class name"),
])
def test_bad_vocabularies_are_named(vocabulary, message):
    with pytest.raises(VocabularyError, match=message):
        validate_vocabulary(vocabulary)


def test_empty_vocabulary_tensors_rejected(tiny):
    with pytest.raises(EovSegInputError, match="empty vocabulary"):
        tiny(torch.randn(1, 3, 64, 64), text_embeddings=torch.zeros(0, tiny.config.embed_dim),
             synonym_counts=torch.zeros(0, dtype=torch.long))
    with pytest.raises(EovSegInputError, match="multiple of 14"):
        tiny(torch.randn(1, 3, 64, 64), input_ids=torch.zeros(0, 5, dtype=torch.long), synonym_counts=torch.tensor([1]))


def test_inconsistent_vocabulary_tensors_rejected(tiny):
    inputs = vocab_inputs(tiny.config)
    inputs["synonym_counts"] = inputs["synonym_counts"][:-1]
    with pytest.raises(EovSegInputError, match="synonym_counts sums to"):
        tiny(torch.randn(1, 3, 64, 64), **inputs)


@pytest.mark.parametrize("shape,message", [
    ((1, 3, 16, 64), "at least 32x32"),
    ((1, 3, 48, 64), "multiples of 32"),
    ((1, 4, 64, 64), "RGB"),
    ((3, 64, 64), "RGB"),
])
def test_bad_images_are_named(tiny, shape, message):
    with pytest.raises(EovSegInputError, match=message):
        tiny(torch.randn(*shape), **vocab_inputs(tiny.config))


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="Unknown EOV-Seg variant 'r101'.*r50, r50x4, convnext_l"):
        EovSegConfig.from_variant("r101")
    with pytest.raises(ValueError, match="Unknown EOV-Seg variant"):
        EovSegConfig(variant="vit_h")


def test_no_vocabulary_and_no_stored_embeddings(tmp_path):
    config = EovSegConfig.from_variant("tiny")
    model = EovSegForPanopticSegmentation(config).eval()
    with pytest.raises(EovSegInputError, match="No vocabulary was given"):
        model(torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------------------------------------------ components


def test_synonym_max_and_void_last():
    embeddings = torch.tensor([[[1.0, 0.0]]])  # B=1, Q=1
    classifier = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]), dim=-1)
    index = build_synonym_index(torch.tensor([2, 1]))  # class 0: rows 0-1, class 1: row 2, void: row 3
    assert index.tolist() == [[0, 1], [2, -1]]
    logits = classification_logits(embeddings, classifier, torch.tensor(math.log(10.0)), index)
    torch.testing.assert_close(logits, torch.tensor([[[10.0, 10.0 / math.sqrt(2), -10.0]]]))
    # the logit scale is clamped at 100
    logits = classification_logits(embeddings, classifier, torch.tensor(math.log(1000.0)), index)
    assert logits[0, 0, 0].item() == pytest.approx(100.0)


def test_geometric_ensemble_by_hand():
    in_logits = torch.log(torch.tensor([[[0.6, 0.2, 0.2]]]))  # two classes + void
    out_logits = torch.log(torch.tensor([[[0.1, 0.3, 0.6]]]))
    seen = torch.tensor([True, False])
    ensemble = EovSegGeometricEnsemble(alpha=0.4, beta=0.8, on_valid_mask=True)
    result = ensemble(in_logits, out_logits, seen, valid_queries=torch.tensor([[True]])).exp()
    p_in = torch.tensor([0.75, 0.25])  # softmax over the two real classes
    p_out = torch.tensor([0.25, 0.75])
    combined = torch.tensor([p_in[0] ** 0.6 * p_out[0] ** 0.4, p_in[1] ** 0.2 * p_out[1] ** 0.8])
    expected = torch.cat([combined / combined.sum() * 0.8, torch.tensor([0.2])]) + 1e-8
    torch.testing.assert_close(result[0, 0], expected, atol=1e-6, rtol=0)
    # an invalid query (empty mask) uses the in-vocabulary probabilities only
    result = ensemble(in_logits, out_logits, seen, valid_queries=torch.tensor([[False]])).exp()
    torch.testing.assert_close(result[0, 0], torch.cat([p_in * 0.8, torch.tensor([0.2])]) + 1e-8, atol=1e-6, rtol=0)


def test_mask_pooling_by_hand():
    features = torch.arange(8.0).reshape(1, 2, 2, 2)
    masks = torch.tensor([[[[1.0, -1.0], [2.0, -3.0]], [[-1.0, -1.0], [-1.0, -1.0]]]])
    pooled = EovSegMaskPooling()(features, masks)
    torch.testing.assert_close(pooled[0, 0], torch.tensor([1.0, 5.0]))
    torch.testing.assert_close(pooled[0, 1], torch.zeros(2))


def test_dynamic_depthwise_attention_is_a_per_query_channel_convolution():
    torch.manual_seed(0)
    attention = EovSegDynamicDepthwiseConvAttention(hidden_dim=6, kernel_size=3)
    query, value = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    out = attention(query, value)
    kernels = attention.kernel_proj(query)
    padded = F.pad(value, (1, 1))
    expected = torch.stack([padded[..., i : i + 6] * kernels[..., i : i + 1] for i in range(3)]).sum(0)
    torch.testing.assert_close(out, attention.norm(expected), atol=1e-6, rtol=0)


def test_key_mapping_round_trip(tiny_convnext):
    for model in (tiny_convnext,):
        # default_text_embeddings are ours alone: the conversion computes them from the vocabulary
        ours = {k: v for k, v in model.state_dict().items() if k != "default_text_embeddings"}
        original = {ours_to_original_key(k): v for k, v in ours.items()}
        original["vit_backbone.clip_model.visual.transformer.resblocks.5.attn.in_proj_weight"] = torch.zeros(1)
        original["vit_backbone.clip_model.token_embedding.weight"] = torch.zeros(1)
        converted, dropped, unexpected = convert_original_state_dict(original)
        assert unexpected == []
        assert sorted(dropped) == sorted(k for k in original if k.startswith("vit_backbone.clip_model.") and
                                         ("resblocks.5" in k or "token_embedding" in k))
        assert converted.keys() == ours.keys()


def test_modulated_deform_conv_in_half_precision():
    """Under CPU autocast torchvision's float32 kernel runs; in a model cast to bfloat16 the gathered kernel runs in
    bfloat16 (sampling in float32): both within bfloat16 round-off of the float32 computation."""
    from eovseg.modeling_eovseg import EovSegModulatedDeformConv

    torch.manual_seed(0)
    conv = EovSegModulatedDeformConv(4, 6)
    with torch.no_grad():
        conv.offset_conv.weight.normal_(std=0.3)
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # torchvision has no bfloat16 CPU kernel
        under_autocast = conv(x)
    half = copy.deepcopy(conv).to(torch.bfloat16)
    with torch.no_grad():
        cast = half(x.to(torch.bfloat16))
        # the same bfloat16 inputs and weights, computed in float32
        offsets = half.offset_conv(x.to(torch.bfloat16)).float()
        expected = torchvision.ops.deform_conv2d(
            x.to(torch.bfloat16).float(), offsets[:, :18], half.weight.float(), padding=1, mask=offsets[:, 18:].sigmoid()
        )
    assert under_autocast.dtype == torch.bfloat16 and cast.dtype == torch.bfloat16
    assert torch.allclose(cast.float(), expected, atol=0.03, rtol=0.02)
    assert not torch.equal(cast, expected.to(torch.bfloat16))  # really the bfloat16 kernel
    assert torch.allclose(under_autocast.float(), conv(x).detach(), atol=0.05, rtol=0.02)


def test_model_cast_to_bfloat16_runs(tiny):
    model = copy.deepcopy(tiny).to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16), **vocab_inputs(tiny.config))
    # the sensitive steps (hard masks, ensemble) stay in float32 by default: see config.float32_sensitive_ops
    assert out.masks_queries_logits.dtype == out.class_queries_logits.dtype == torch.float32
    assert out.stage_class_queries_logits.dtype == torch.float32
    assert torch.isfinite(out.class_queries_logits.float()).all() and torch.isfinite(out.masks_queries_logits.float()).all()


# ------------------------------------------------------------------------------------------------ attention interface


def _attention_reference(attention):
    """torch's nn.MultiheadAttention holding `attention`'s parameters (the module the original and earlier versions
    of this model used)."""
    embed_dim = attention.out_proj.in_features
    reference = torch.nn.MultiheadAttention(embed_dim, attention.num_heads)
    reference.load_state_dict(attention.state_dict())
    return reference.eval()


@pytest.mark.parametrize("where", ["vit_block", "decoder"])
def test_attention_functions_match_torch_multihead_attention(tiny, where):
    """sdpa gives nn.MultiheadAttention's numbers bit for bit (it calls the same kernel); eager, written out, agrees to
    float32 round-off and forms the weights nn.MultiheadAttention returns with need_weights=True."""
    attention = tiny.spatial_extractor.block.attn if where == "vit_block" else tiny.decoder.layers[0].self_attention
    reference = _attention_reference(attention)
    width = attention.out_proj.in_features
    tokens = torch.randn(2, 13, width, generator=torch.Generator().manual_seed(4))
    implementation = tiny.config._attn_implementation
    try:
        with torch.no_grad():
            expected, expected_weights = reference(*[tokens.transpose(0, 1)] * 3, average_attn_weights=False)
            plain = reference(*[tokens.transpose(0, 1)] * 3, need_weights=False)[0].transpose(0, 1)
            tiny.set_attn_implementation("sdpa")
            sdpa, no_weights = attention(tokens)
            tiny.set_attn_implementation("eager")
            eager, _ = attention(tokens)
            _, weights = attention(tokens, output_attentions=True)
    finally:
        tiny.set_attn_implementation(implementation)
    assert torch.equal(sdpa, plain) and no_weights is None
    torch.testing.assert_close(eager, expected.transpose(0, 1), atol=2e-6, rtol=0)
    assert weights.shape == (2, attention.num_heads, 13, 13)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=0)


def test_attn_implementation_through_from_pretrained_and_config(tiny, tmp_path):
    """sdpa by default, eager on request; converted checkpoints' keys load into either (the names of
    nn.MultiheadAttention and open_clip's block)."""
    tiny.save_pretrained(tmp_path)
    default = EovSegForPanopticSegmentation.from_pretrained(tmp_path).eval()
    eager = EovSegForPanopticSegmentation.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = EovSegForPanopticSegmentation._from_config(tiny.config, attn_implementation="sdpa")
    assert default.config._attn_implementation == sdpa.config._attn_implementation == "sdpa"
    assert eager.config._attn_implementation == "eager"
    assert eager.decoder.layers[0].self_attention.config._attn_implementation == "eager"
    for key in ("spatial_extractor.block.attn.in_proj_weight", "spatial_extractor.block.attn.out_proj.weight",
                "spatial_extractor.block.mlp.c_fc.weight", "decoder.layers.0.self_attention.in_proj_bias",
                "decoder.layers.2.self_attention.out_proj.bias"):
        assert torch.equal(eager.state_dict()[key], tiny.state_dict()[key]), key
    pixel_values = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = default(pixel_values, **vocab_inputs(tiny.config))
        b = eager(pixel_values, **vocab_inputs(tiny.config))
    torch.testing.assert_close(a.class_queries_logits, b.class_queries_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.masks_queries_logits, b.masks_queries_logits, atol=1e-4, rtol=0)


def test_output_attentions_returns_the_weights(tiny):
    """`attentions`: one (batch, heads, queries, queries) tensor per decoder stage; `spatial_attentions`: the ViT
    block's (batch, heads, 1 + patches, 1 + patches); both the weights nn.MultiheadAttention forms on the same
    inputs, batch first."""
    config = tiny.config
    seen = {}

    def keep_input(name):
        def hook(module, args):
            seen.setdefault(name, args[0])  # (returns None: the arguments go on unchanged)
        return hook

    hooks = [tiny.decoder.layers[0].self_attention.register_forward_pre_hook(keep_input("decoder")),
             tiny.spatial_extractor.block.attn.register_forward_pre_hook(keep_input("vit"))]
    pixel_values = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    try:
        with torch.no_grad():
            out = tiny(pixel_values, **vocab_inputs(config), output_attentions=True)
            plain = tiny(pixel_values, **vocab_inputs(config))
    finally:
        for hook in hooks:
            hook.remove()
    assert plain.attentions is None and plain.spatial_attentions is None
    assert isinstance(out.attentions, tuple) and len(out.attentions) == config.num_stages
    for weights in out.attentions:
        assert weights.shape == (2, config.decoder_num_heads, config.num_proposals, config.num_proposals)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    (vit,) = out.spatial_attentions
    heads = tiny.spatial_extractor.block.attn.num_heads
    assert vit.shape == (2, heads, 1 + 4 * 6, 1 + 4 * 6)  # class token + the 64/16 x 96/16 patches
    for name, weights, attention in (("decoder", out.attentions[0], tiny.decoder.layers[0].self_attention),
                                     ("vit", vit, tiny.spatial_extractor.block.attn)):
        tokens = seen[name].transpose(0, 1)
        with torch.no_grad():
            _, expected = _attention_reference(attention)(tokens, tokens, tokens, average_attn_weights=False)
        torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)
    # the returned weights are what the model used (eager for this call): the outputs are eager's
    torch.testing.assert_close(out.class_queries_logits, plain.class_queries_logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ offloading


@pytest.mark.parametrize("block", ["clip_backbone", "spatial_extractor", "aggregator", "decoder"])
def test_each_block_offloaded_to_disk(tiny, tmp_path, block):
    """A device_map that puts any one of the `_no_split_modules` blocks on disk (accelerate's hooks load its weights
    for each forward) gives the outputs of the model in memory, the text pass included."""
    assert {type(getattr(tiny, block)).__name__ for block in ("clip_backbone", "spatial_extractor", "aggregator",
                                                               "decoder")} == set(tiny._no_split_modules)
    tiny.save_pretrained(tmp_path / "model")
    in_memory = EovSegForPanopticSegmentation.from_pretrained(tmp_path / "model").eval()
    device_map = {name: "cpu" for name, _ in in_memory.named_children()}
    device_map.update({name: "cpu" for name in [*in_memory._parameters, *in_memory._buffers]})
    device_map[block] = "disk"
    offloaded = EovSegForPanopticSegmentation.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload").eval()
    assert any(p.is_meta for p in getattr(offloaded, block).parameters())  # really offloaded
    pixel_values = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = in_memory(pixel_values, **vocab_inputs(tiny.config))
        out = offloaded(pixel_values, **vocab_inputs(tiny.config))
    for name in ("class_queries_logits", "masks_queries_logits", "out_of_vocabulary_logits"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ torch.export


class _ImagePath(torch.nn.Module):
    """The image path with a given vocabulary: pixel values and text embeddings in, class and mask logits out."""

    def __init__(self, model, synonym_counts):
        super().__init__()
        self.model, self.synonym_counts = model, synonym_counts

    def forward(self, pixel_values, text_embeddings):
        out = self.model(pixel_values, text_embeddings=text_embeddings, synonym_counts=self.synonym_counts)
        return out.class_queries_logits, out.masks_queries_logits, out.image_sizes


@pytest.fixture(scope="module")
def image_path(tiny):
    inputs = vocab_inputs(tiny.config)
    text = tiny.get_text_embeddings(inputs["input_ids"])
    return _ImagePath(tiny, inputs["synonym_counts"].tolist()).eval(), text


def test_export_with_static_image_size(image_path):
    module, text = image_path
    pixel_values = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(8))
    program = torch.export.export(module, (pixel_values, text))
    with torch.no_grad():
        for ours, eager in zip(program.module()(pixel_values, text), module(pixel_values, text)):
            assert torch.equal(ours, eager)
    # the finiteness checks stay in the exported program
    with pytest.raises(RuntimeError, match="pixel_values holds NaN or infinite values"):
        program.module()(torch.full_like(pixel_values, float("nan")), text)


def test_export_with_dynamic_image_sizes(image_path):
    """Batch, height and width as torch.export.Dim (height and width multiples of 32, at least 64: tracing treats a
    size-1 feature map as a special case): the program runs at sizes it was not traced at, with eager's outputs
    (symbolic shapes may pick other matrix kernels: float32 round-off)."""
    module, text = image_path
    batch, height, width = torch.export.Dim("batch", max=8), torch.export.Dim("h", min=2, max=32), \
        torch.export.Dim("w", min=2, max=32)
    program = torch.export.export(
        module, (torch.randn(2, 3, 64, 96), text),
        dynamic_shapes=({0: batch, 2: 32 * height, 3: 32 * width}, None))
    for shape in [(1, 3, 96, 64), (3, 3, 128, 160)]:
        pixel_values = torch.randn(*shape, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            ours, eager = program.module()(pixel_values, text), module(pixel_values, text)
        for a, b in zip(ours, eager):
            assert a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ bad inputs


def test_pixel_mask_of_another_size_is_refused(tiny):
    with pytest.raises(EovSegInputError, match=r"pixel_mask has shape \(1, 10, 10\) but pixel_values has shape "
                                               r"\(1, 3, 64, 64\)"):
        tiny(torch.randn(1, 3, 64, 64), pixel_mask=torch.ones(1, 10, 10, dtype=torch.long), **vocab_inputs(tiny.config))
    with pytest.raises(EovSegInputError, match="pixel_mask has shape"):  # a mask per image, not one for the batch
        tiny(torch.randn(2, 3, 64, 64), pixel_mask=torch.ones(1, 64, 64, dtype=torch.long), **vocab_inputs(tiny.config))
    mask = torch.ones(2, 64, 64, dtype=torch.long)
    mask[1] = 0  # before: accepted, the image's valid size (0, 0) went to post-processing
    with pytest.raises(EovSegInputError, match=r"pixel_mask marks no valid pixel in image\(s\) \[1\]"):
        tiny(torch.randn(2, 3, 64, 64), pixel_mask=mask, **vocab_inputs(tiny.config))


_NON_FINITE_WEIGHTS = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_modeling import make_model, vocab_inputs
from eovseg.modeling_eovseg import EovSegInputError
model = make_model("tiny")
with torch.no_grad():
    {poison}
try:
    model(torch.randn(1, 3, 64, 64), **vocab_inputs(model.config))
except EovSegInputError as error:
    print("refused:", error)
"""


@pytest.mark.parametrize("poison", [
    "model.clip_backbone.clip_model.visual.conv1.weight[0, 0, 0, 0] = float('nan')",  # a NaN backbone weight
    "model.aggregator.deform_layers[0].deform_conv.offset_conv.bias[3] = float('nan')",  # a NaN offset
    "model.aggregator.lateral_convs[0].weight.fill_(float('inf'))",  # infinite weights before the offsets
])
def test_non_finite_weights_never_reach_deform_conv2d(poison, tmp_path):
    """torchvision's CPU deform_conv2d crashes the process on NaN offsets: the model refuses them with one line.
    Run in a subprocess, so that a crash fails the test instead of ending pytest."""
    import subprocess
    import sys
    from pathlib import Path

    script = _NON_FINITE_WEIGHTS.format(tests=str(Path(__file__).parent), poison=poison)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "refused: The light aggregator's deformable-convolution offsets are NaN or infinite" in done.stdout


def test_non_finite_pixels_are_refused(tiny):
    pixel_values = torch.randn(1, 3, 64, 64)
    pixel_values[0, 1, 5, 7] = float("nan")
    pixel_values[0, 2, 0, 0] = float("inf")
    with pytest.raises(EovSegInputError, match="pixel_values holds 2 NaN or infinite value"):
        tiny(pixel_values, **vocab_inputs(tiny.config))

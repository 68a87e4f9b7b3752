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

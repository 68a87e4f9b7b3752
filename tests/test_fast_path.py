"""The fast paths: each gives the plain computation's numbers (up to float32 round-off) on small models."""

import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from eovseg import EovSegConfig, EovSegForPanopticSegmentation, EovSegProcessor
from eovseg import modeling_eovseg
from eovseg.modeling_eovseg import EovSegVAS

VOCABULARY = ["cup, mug", "saucer, plate", "table", "spoon", "wall", "floor"]
IS_THING = [True, True, True, True, False, False]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny", vocabulary=VOCABULARY, is_thing=IS_THING, train_vocabulary=["cup, mug"])
    model = EovSegForPanopticSegmentation(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    processor = EovSegProcessor.from_config(config)
    model.set_default_vocabulary_embeddings(processor.encode_vocabulary(VOCABULARY)["input_ids"])
    return model, processor


def test_vas_in_pixel_chunks_matches_one_pass(monkeypatch):
    torch.manual_seed(0)
    vas = EovSegVAS(8, 16, 12, num_heads=2).eval()
    features, text = torch.randn(2, 8, 5, 7), F.normalize(torch.randn(9, 12), dim=-1)
    whole = vas(features, text)
    monkeypatch.setattr(modeling_eovseg, "VAS_CHUNK_ELEMENTS", 2 * 2 * 9 * 4)  # 4 pixels per chunk
    chunked = vas(features, text)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    # the plain formula: softmax over the vocabulary, max, per head
    guide = vas.guide_fc(text).reshape(9, 2, 8)
    embed = vas.embed_conv(features).reshape(2, 2, 8, 5, 7)
    gate = (torch.einsum("bmchw,nmc->bmhwn", embed, guide) / 8**0.5).softmax(-1).amax(-1)
    expected = (features.reshape(2, 2, 4, 5, 7) * (gate * vas.scale + vas.offset).unsqueeze(2)).reshape(2, 8, 5, 7)
    torch.testing.assert_close(whole, expected, atol=1e-6, rtol=1e-5)


def test_shared_prefix_lengths_by_hand():
    end = 99  # the end-of-text token is the largest id
    ids = torch.tensor([
        [1, 5, 6, 7, end, 0],
        [1, 5, 6, 8, end, 0],
        [1, 5, 6, 8, 9, end],
        [1, 5, end, 0, 0, 0],
        [1, 2, end, 0, 0, 0],
    ])
    # shared by >= 2: [1, 5, 6] by rows 0-2, [1, 5, 6, 8] by rows 1-2, [1, 5] by rows 0-3, [1] by all
    assert modeling_eovseg.shared_prefix_lengths(ids, 2).tolist() == [3, 4, 4, 2, 1]
    # shared by >= 4: [1, 5] (rows 0-3), [1] (row 4); the end token always stays out of the prefix
    assert modeling_eovseg.shared_prefix_lengths(ids, 4).tolist() == [2, 2, 2, 2, 1]
    assert modeling_eovseg.shared_prefix_lengths(ids, 6).tolist() == [0, 0, 0, 0, 0]


def test_prefix_sharing_text_encoder_equals_the_plain_pass(tiny):
    model, processor = tiny
    ids = torch.unique(processor.encode_vocabulary(VOCABULARY + ["a rather long name of a thing"])["input_ids"], dim=0)
    clip = model.clip_backbone
    assert modeling_eovseg.EovSegPrefixSharingTextEncoder.supports(clip.clip_model)
    with torch.no_grad():
        plain = clip.encode_text(ids)
    for chunk_size in (1, 128):  # a few prompts per batch, and all at once
        shared = modeling_eovseg.EovSegPrefixSharingTextEncoder(clip.clip_model, torch.float32).encode(ids, chunk_size)
        torch.testing.assert_close(shared, plain, atol=2e-5, rtol=1e-4)


def test_text_encoding_reduced_precision_encodes_distinct_prompts_once(tiny, monkeypatch):
    model, processor = tiny
    vocabulary = ["cup, mug", "a rather long name of a thing", "cup", "mug, cup"]  # repeated synonyms
    ids = processor.encode_vocabulary(vocabulary)["input_ids"]
    encoder = modeling_eovseg.EovSegPrefixSharingTextEncoder
    rests, beginnings_computed = [], []
    original_rests, original_beginnings = encoder._encode_rests, encoder._beginnings

    def record_rests(self, ids, *args):
        rests.append(ids.shape)
        return original_rests(self, ids, *args)

    def record_beginnings(self, *args):
        keys_values, which = original_beginnings(self, *args)
        beginnings_computed.append(keys_values[0][0].shape[0])
        return keys_values, which

    monkeypatch.setattr(encoder, "_encode_rests", record_rests)
    monkeypatch.setattr(encoder, "_beginnings", record_beginnings)
    model._clear_text_cache()
    float32 = model.get_text_embeddings(ids)
    assert not rests  # float32: the plain pass, in the original's grouping
    reduced = model.get_text_embeddings(ids, dtype=torch.bfloat16)
    distinct = torch.unique(ids, dim=0)
    assert sum(shape[0] for shape in rests) == distinct.shape[0] < ids.shape[0]
    # no padding: each prompt's tokens after its shared beginning, and each distinct beginning once
    starts = modeling_eovseg.shared_prefix_lengths(distinct, encoder.MIN_SHARE).tolist()
    ends = (distinct.argmax(-1) + 1).tolist()
    assert min(starts) > 0  # every prompt begins with the start token, and there are more than MIN_SHARE of them
    beginnings = {tuple(row[:start].tolist()) for row, start in zip(distinct, starts)}
    rest_tokens = sum(s[0] * s[1] for s in rests)
    assert rest_tokens == sum(end - start for start, end in zip(starts, ends))
    assert beginnings_computed == [len(beginnings)]
    assert rest_tokens + len(beginnings) * max(starts) < 0.65 * sum(ends)
    assert reduced.dtype == torch.float32
    assert F.cosine_similarity(reduced, float32, dim=-1).min() > 1 - 1e-3
    assert not torch.equal(reduced, float32)  # really another precision, and not served from the float32 cache
    # a text tower the prefix-sharing encoder does not know: autocast over the distinct prompts, as close
    monkeypatch.setattr(encoder, "supports", staticmethod(lambda clip_model: False))
    model._clear_text_cache()
    rests.clear()
    fallback = model.get_text_embeddings(ids, dtype=torch.bfloat16)
    assert not rests
    assert F.cosine_similarity(fallback, float32, dim=-1).min() > 1 - 1e-3


def test_text_encoding_reduced_precision_in_a_bfloat16_model(tiny):
    model, processor = tiny
    ids = processor.encode_vocabulary(VOCABULARY)["input_ids"]
    half = EovSegForPanopticSegmentation(copy.deepcopy(model.config)).eval()
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    embeddings = half.get_text_embeddings(ids, dtype=torch.bfloat16)  # float32 layer norms on bfloat16 weights
    assert embeddings.dtype == torch.bfloat16
    reference = model.get_text_embeddings(ids)
    assert F.cosine_similarity(embeddings.float(), reference, dim=-1).min() > 1 - 1e-3


def test_bfloat16_model_keeps_sensitive_steps_in_float32(tiny):
    model, processor = tiny
    pixels = processor(images=torch.zeros(3, 64, 96, dtype=torch.uint8), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        full = model(pixels)
        half = EovSegForPanopticSegmentation(copy.deepcopy(model.config)).eval()
        half.load_state_dict(model.state_dict())
        half = half.to(torch.bfloat16)
        out = half(pixels.to(torch.bfloat16))
        assert out.class_queries_logits.dtype == out.masks_queries_logits.dtype == torch.float32
        assert torch.isfinite(out.class_queries_logits).all()
        # class probabilities close to float32's (same argmax where float32 is confident)
        p_full, p_half = full.class_queries_logits.softmax(-1), out.class_queries_logits.softmax(-1)
        assert (p_full - p_half).abs().max() < 0.1
        half.config.float32_sensitive_ops = False
        for layer in half.decoder.layers:
            layer.float32_sensitive_ops = False
        assert half(pixels.to(torch.bfloat16)).class_queries_logits.dtype == torch.bfloat16


def test_float64_model_is_not_rounded_to_float32(tiny):
    """float32_sensitive_ops only raises half precision: a float64 model gives the same numbers with it on and off
    (the fidelity comparison with the original runs in float64)."""
    model, processor = tiny
    text = processor.encode_vocabulary(VOCABULARY)
    pixels = processor(images=torch.zeros(3, 64, 96, dtype=torch.uint8), return_tensors="pt")["pixel_values"]
    double = EovSegForPanopticSegmentation(copy.deepcopy(model.config)).eval()
    double.load_state_dict(model.state_dict())
    double = double.double()
    with torch.no_grad():
        embeddings = double.get_text_embeddings(text["input_ids"])
        kept = double(pixels.double(), **text)
        double.config.float32_sensitive_ops = False
        for layer in double.decoder.layers:
            layer.float32_sensitive_ops = False
        plain = double(pixels.double(), **text)
    assert embeddings.dtype == torch.float64
    assert not torch.equal(embeddings, embeddings.float().double())  # not float32 values in a float64 tensor
    for ours, reference in [(kept.class_queries_logits, plain.class_queries_logits),
                            (kept.out_of_vocabulary_logits, plain.out_of_vocabulary_logits),
                            (kept.stage_class_queries_logits, plain.stage_class_queries_logits),
                            (kept.stage_masks_queries_logits, plain.stage_masks_queries_logits)]:
        assert ours.dtype == torch.float64
        assert torch.equal(ours, reference)


@pytest.mark.parametrize("batch,channels,height,width", [(2, 6, 7, 9), (1, 5, 4, 3)])
def test_gathered_deformable_convolution_matches_torchvision(batch, channels, height, width):
    """The half-precision CPU kernel of the neck: torchvision's modulated deformable convolution, offsets reaching
    past every border (zero there), on a weighted gather; float64 to compare the arithmetic, not the round-off."""
    from torchvision.ops import deform_conv2d

    from eovseg.modeling_eovseg import gathered_deform_conv2d

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)
    offsets = 3 * torch.randn(batch, 18, height, width, generator=generator, dtype=torch.float64)
    offsets[0, :, 0, 0] = torch.tensor([-0.5, -0.5, -1.0, 0.0, height + 0.5, 0.0] * 3, dtype=torch.float64)
    mask = torch.rand(batch, 9, height, width, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, channels, 3, 3, generator=generator, dtype=torch.float64)
    expected = deform_conv2d(x, offsets, weight, padding=1, mask=mask)
    torch.testing.assert_close(gathered_deform_conv2d(x, offsets, weight, mask, 1), expected, atol=1e-5, rtol=1e-5)
    # in bfloat16 (positions and bilinear weights still computed in float32)
    half = gathered_deform_conv2d(x.bfloat16(), offsets, weight.bfloat16(), mask, 1)
    assert half.dtype == torch.bfloat16
    assert (half.double() - expected).abs().max() < 0.05 * expected.abs().max()


def test_channels_last_transposed_convolution_is_bit_identical():
    torch.manual_seed(0)
    plain = torch.nn.ConvTranspose2d(24, 16, kernel_size=2, stride=2)
    fast = modeling_eovseg.EovSegChannelsLastConvTranspose2d(24, 16, kernel_size=2, stride=2)
    assert fast.load_state_dict(plain.state_dict()) is not None  # the same parameter names (checkpoints load)
    x = torch.randn(2, 24, 9, 13)
    with torch.no_grad():
        out = fast(x)
        assert torch.equal(out, plain(x))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_spatial_extractor_runs_beside_the_neck_with_the_same_numbers(tiny, monkeypatch):
    """In inference on CPU with two threads the extractor runs on another thread; every output stays bit-identical."""
    model, _ = tiny
    pixel_values = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    threads_seen = []
    handle = model.spatial_extractor.register_forward_hook(
        lambda module, args, output: threads_seen.append(threading.get_ident()))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            beside = model(pixel_values=pixel_values)
            monkeypatch.setattr(modeling_eovseg, "_can_overlap", lambda pixel_values: False)
            sequential = model(pixel_values=pixel_values)
    finally:
        torch.set_num_threads(threads)
    assert threads_seen[0] != threading.get_ident() and threads_seen[1] == threading.get_ident()
    # when gradients are recorded (training) the extractor runs in sequence, on the caller's thread
    torch.set_num_threads(2)
    try:
        monkeypatch.undo()
        model(pixel_values=pixel_values)
    finally:
        torch.set_num_threads(threads)
        handle.remove()
    assert threads_seen[2] == threading.get_ident()
    for name in ("class_queries_logits", "masks_queries_logits", "out_of_vocabulary_logits"):
        assert torch.equal(getattr(beside, name), getattr(sequential, name)), name
    assert torch.equal(beside.stage_class_queries_logits, sequential.stage_class_queries_logits)


def test_background_work_hands_its_error_to_the_caller():
    def fails(value):
        raise ValueError(f"bad {value}")

    work = modeling_eovseg._Background(fails, 7)
    with pytest.raises(ValueError, match="bad 7"):
        work.result()
    assert modeling_eovseg._Background(lambda a, b: a + b, 2, 3).result() == 5


REUSE_PROBE = """
import resource, torch
import eovseg.modeling_eovseg  # the process of a forward pass (which calls it): torch, transformers, the model
from eovseg.cpu_memory import reuse_freed_memory
torch.set_num_threads(1)
applied = reuse_freed_memory() if {call} else None
faults = []
for step in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    # about 200 MB, above glibc's mmap threshold; 1 MB less each pass, so each block fits the hole the previous one
    # left even when a small allocation has taken the few bytes beside it (an equal size then grows the heap)
    block = torch.ones(50_000_000 - 250_000 * step)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del block
print(applied, max(faults[-2:]))  # steady state: the first calls grow the heap
"""


@pytest.mark.parametrize("call, env, reused", [(True, "1", True), (True, "0", False), (False, "1", False)])
def test_freed_memory_is_reused_between_calls(call, env, reused):
    """A freed 200 MB block is handed out again without page faults once the setting is in effect, and
    `EOVSEG_CPU_MEMORY_REUSE=0` leaves malloc alone (glibc, as on this project's machines and CI)."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", REUSE_PROBE.format(call=call)], capture_output=True, text=True,
                            env={**os.environ, "EOVSEG_CPU_MEMORY_REUSE": env}, check=True)
    applied, faults = result.stdout.split()
    assert applied == {True: {"1": "True", "0": "False"}, False: {"1": "None"}}[call][env]
    pages = 200_000_000 // 4096
    if reused:
        assert int(faults) < pages // 100  # the heap's pages are already mapped
    else:
        assert int(faults) > pages // 2  # a fresh mapping: every page faults at first touch


BOUND_PROBE = """
import torch
from eovseg import cpu_memory

torch.set_num_threads(1)
assert cpu_memory.reuse_freed_memory()
# about 200 MB a pass, 1 MB less each time: each block fits the hole the previous one left (an equal size may not,
# once a small allocation has taken the few bytes beside the hole)
sizes = iter(range(50_000_000, 0, -250_000))
for _ in range(4):
    block = torch.ones(next(sizes)); del block
first = cpu_memory.release_if_grown()  # measures the resident set after such a pass
same = []
for _ in range(3):
    block = torch.ones(next(sizes)); del block  # another such pass: reused, nothing grows
    same.append(cpu_memory.release_if_grown())
small, large = torch.ones(50_000_000), torch.ones(150_000_000); del small, large  # a larger pass: 600 MB more
before = cpu_memory.resident_bytes()
grown = cpu_memory.release_if_grown()
print(first, any(same), grown, (before - cpu_memory.resident_bytes()) // 2**20)
"""


def test_kept_memory_is_returned_once_it_grows_past_the_bound():
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", BOUND_PROBE], capture_output=True, text=True, check=True,
                            env={**os.environ, "EOVSEG_CPU_MEMORY_REUSE": "1"})
    first, same, grown, released_mib = result.stdout.split()
    assert (first, same, grown) == ("False", "False", "True")
    assert int(released_mib) > 500  # the 800 MB left free go back to the system

"""transformers' conventions on EovSegForPanopticSegmentation: presets, gradient checkpointing, hidden states from the
config, meta-device loading (`low_cpu_mem_usage`, `device_map="auto"` on CPU), `_init_weights` that leaves loaded
weights alone, frozen towers after loading, and a package without import cycles."""

import ast
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eovseg import EovSegConfig, EovSegForPanopticSegmentation
from eovseg.configuration_eovseg import PRESETS, PUBLISHED_VARIANTS, TEST_PRESETS

PACKAGE = Path(__file__).resolve().parents[1] / "eovseg"


def perturbed_tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny", **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def text_inputs(config, num_classes=5):
    generator = torch.Generator().manual_seed(1)
    text = torch.nn.functional.normalize(torch.randn(num_classes, config.embed_dim, generator=generator), dim=-1)
    return {"text_embeddings": text, "synonym_counts": torch.ones(num_classes, dtype=torch.long)}


def training_batch(config, batch=2, size=64, num_targets=3):
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, num_targets, (batch, size // 8, size // 8), generator=generator)
    ids = ids.repeat_interleave(8, 1).repeat_interleave(8, 2)
    return {
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator),
        "mask_labels": [torch.stack([(i == t).float() for t in range(num_targets)]) for i in ids],
        "class_labels": [torch.randint(0, 5, (num_targets,), generator=generator) for _ in range(batch)],
        **text_inputs(config),
    }


# ------------------------------------------------------------------------------------------------ presets


def test_one_way_to_a_preset():
    assert set(PUBLISHED_VARIANTS) == {"r50", "r50x4", "convnext_l"}
    assert not set(TEST_PRESETS) & set(PUBLISHED_VARIANTS) and set(PRESETS) == {*PUBLISHED_VARIANTS, *TEST_PRESETS}
    tiny = EovSegConfig.from_variant("tiny")
    assert (tiny.hidden_dim, tiny.num_proposals, tiny.variant) == (64, 10, "tiny")
    # the constructor records a variant but never looks one up: a preset name alone points to from_variant
    with pytest.raises(ValueError, match=r"from_variant\('tiny'\)"):
        EovSegConfig(variant="tiny")
    # its defaults are the published R50 variant
    assert EovSegConfig().to_dict() == EovSegConfig.from_variant("r50").to_dict()
    for name in PRESETS:
        config = EovSegConfig.from_variant(name)
        for field, value in PRESETS[name].items():
            assert getattr(config, field) == value, (name, field)
        assert EovSegConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    custom = EovSegConfig(clip_model_config=tiny.clip_model_config, vit_model_config=tiny.vit_model_config)
    assert custom.variant == "custom"


def test_common_size_names_map_to_the_decoder():
    config = EovSegConfig.from_variant("tiny", decoder_num_heads=4)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 3, 4)
    config.hidden_size, config.num_hidden_layers, config.num_attention_heads = 32, 2, 2
    assert (config.hidden_dim, config.num_stages, config.decoder_num_heads) == (32, 2, 2)
    assert "hidden_size" not in config.to_dict() and config.to_dict()["hidden_dim"] == 32
    given = EovSegConfig.from_variant("tiny", hidden_size=48, num_hidden_layers=1, num_attention_heads=2)
    model = EovSegForPanopticSegmentation(given)
    assert len(model.decoder.layers) == 1 and model.decoder.object_kernels.embedding_dim == 48


# ------------------------------------------------------------------------------------------------ forward


def test_output_hidden_states_comes_from_the_config():
    model = perturbed_tiny().eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(pixel_values, **text_inputs(model.config)).vas_hidden_state is None
        model.config.output_hidden_states = True
        out = model(pixel_values, **text_inputs(model.config))
        assert out.vas_hidden_state is not None and len(out.backbone_hidden_states) == 4
        assert model(pixel_values, **text_inputs(model.config), output_hidden_states=False).vas_hidden_state is None


def test_gradient_checkpointing_trains_the_same():
    model = perturbed_tiny().train()
    batch = training_batch(model.config)
    results = []
    for enabled in (False, True):
        if enabled:
            model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.decoder.layers)
        model.zero_grad()
        torch.manual_seed(3)  # the loss samples points at random
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_off, grads_off), (loss_on, grads_on) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=0)
    assert grads_on.keys() == grads_off.keys() and any(n.startswith("decoder.layers.0.") for n in grads_on)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-4, atol=1e-6, msg=name)
    model.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in model.decoder.layers)


# ------------------------------------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    model = perturbed_tiny(seed=4).eval()
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def plain_loaded(saved_tiny):
    return EovSegForPanopticSegmentation.from_pretrained(saved_tiny[1]).eval()


@pytest.mark.parametrize("kwargs", [{"low_cpu_mem_usage": True}, {"device_map": "auto"}])
def test_meta_device_loading_on_cpu(saved_tiny, plain_loaded, kwargs):
    source, folder = saved_tiny
    plain = plain_loaded
    model = EovSegForPanopticSegmentation.from_pretrained(folder, **kwargs).eval()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    state = model.state_dict()
    assert state.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(state[key], value), key
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    # the non-persistent causal mask is in no checkpoint: initialised, not left as it was allocated
    for loaded in (model, plain):
        assert torch.equal(loaded.clip_backbone.clip_model.attn_mask, source.clip_backbone.clip_model.attn_mask)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, reference = model(pixel_values, **text_inputs(model.config)), plain(pixel_values, **text_inputs(model.config))
    torch.testing.assert_close(ours.class_queries_logits, reference.class_queries_logits, rtol=0, atol=0)
    torch.testing.assert_close(ours.masks_queries_logits, reference.masks_queries_logits, rtol=0, atol=0)


def test_loaded_model_keeps_its_towers_frozen(saved_tiny):
    _, folder = saved_tiny
    model = EovSegForPanopticSegmentation.from_pretrained(folder)
    for name, param in model.named_parameters():
        frozen = name.startswith(("clip_backbone.", "spatial_extractor."))
        assert param.requires_grad is not frozen, name


def test_init_weights_leaves_loaded_weights_alone(saved_tiny, tmp_path):
    source, folder = saved_tiny
    state = load_file(folder / "model.safetensors")
    # One key missing in the neck and one in a decoder stage: those modules are initialised again, and every
    # weight that was loaded (the bilinear upsampling kernels, the stage's logit scale) must keep its value.
    missing = ["aggregator.deform_layers.0.deform_norm.weight", "decoder.layers.0.ffn.fc1.bias", "void_embedding.weight"]
    for key in missing:
        state.pop(key)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    source.config.save_pretrained(tmp_path)
    model = EovSegForPanopticSegmentation.from_pretrained(tmp_path)
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert torch.equal(loaded["aggregator.deform_layers.0.deform_norm.weight"], torch.ones_like(state["aggregator.deform_layers.0.deform_norm.bias"]))
    # a tensor missing inside a decoder stage gets the stage's rule (zero biases), not torch's default
    assert torch.equal(loaded["decoder.layers.0.ffn.fc1.bias"], torch.zeros(model.config.decoder_ffn_dim))
    void = loaded["void_embedding.weight"]
    assert torch.isfinite(void).all() and 0.5 < void.std() < 2  # drawn from N(0, 1), not left empty


def _all_tensors(model):
    return [*model.named_parameters(), *model.named_buffers()]


@pytest.mark.parametrize("variant", ["tiny", "tiny_convnext"])
def test_meta_device_build_then_init_defines_every_tensor(variant):
    config = EovSegConfig.from_variant(variant)
    with torch.device("meta"):
        model = EovSegForPanopticSegmentation(config)
    model.to_empty(device="cpu")
    with torch.no_grad():  # what uninitialised memory may hold
        for _, tensor in _all_tensors(model):
            tensor.fill_(float("nan") if tensor.is_floating_point() else -7)
    model.init_weights()
    undefined = [name for name, t in _all_tensors(model) if (~torch.isfinite(t) if t.is_floating_point() else t == -7).any()
                 and not name.endswith("attn_mask")]
    assert undefined == []
    # buffers are the constructor's (the causal mask's -inf included), as transformers' buffer check asks
    built = dict(EovSegForPanopticSegmentation(config).named_buffers())
    assert [name for name, b in model.named_buffers() if not torch.equal(b, built[name])] == []
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64), **text_inputs(config))
    assert torch.isfinite(out.class_queries_logits).all() and torch.isfinite(out.masks_queries_logits).all()


def test_loading_nothing_is_a_build_from_the_config():
    config = EovSegConfig.from_variant("tiny")
    model = EovSegForPanopticSegmentation.from_pretrained(None, config=config, state_dict={})
    assert all(torch.isfinite(t).all() for name, t in _all_tensors(model) if not name.endswith("attn_mask"))
    assert not any(p.requires_grad for p in model.clip_backbone.parameters())


@pytest.mark.parametrize("key", ["clip_backbone.clip_model.visual.layer1.0.bn1.running_var",
                                 "clip_backbone.clip_model.text_projection",
                                 "spatial_extractor.positional_embedding"])
def test_checkpoint_missing_a_tower_weight_is_an_error(saved_tiny, tmp_path, key):
    source, folder = saved_tiny
    state = load_file(folder / "model.safetensors")
    state.pop(key)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    source.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\) of the frozen CLIP towers \(" + key.replace(".", r"\.")) as error:
        EovSegForPanopticSegmentation.from_pretrained(tmp_path)
    assert "\n" not in str(error.value)
    # nor may one of another shape be replaced by a random one
    state[key] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="frozen CLIP towers"):
        EovSegForPanopticSegmentation.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


def test_loading_info_is_returned_when_asked(saved_tiny):
    model, info = EovSegForPanopticSegmentation.from_pretrained(saved_tiny[1], output_loading_info=True)
    assert isinstance(model, EovSegForPanopticSegmentation) and not info["missing_keys"]
    assert isinstance(EovSegForPanopticSegmentation.from_pretrained(saved_tiny[1]), EovSegForPanopticSegmentation)


def test_direct_build_is_initialised_as_documented():
    torch.manual_seed(0)
    model = EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny"))
    for layer in model.aggregator.deform_layers:
        assert torch.equal(layer.deform_conv.offset_conv.weight, torch.zeros_like(layer.deform_conv.offset_conv.weight))
        kernel = layer.upsample.weight
        assert kernel[:, 1:].abs().sum() == 0 and torch.allclose(kernel[0, 0].sum(), torch.tensor(4.0))
    assert torch.equal(model.decoder.vas.scale, torch.ones_like(model.decoder.vas.scale))
    stage = model.decoder.layers[0]
    assert torch.allclose(stage.logit_scale, torch.log(torch.tensor(1 / 0.07)))
    assert stage.ffn.fc1.weight.std() < 0.03  # truncated normal, std 0.02
    assert model.default_text_embeddings.abs().sum() == 0


# ------------------------------------------------------------------------------------------------ import graph


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its code (function-level imports too), with the parent
    packages an import runs first (`from ..evaluation.panoptic import X` runs `eovseg/evaluation/__init__.py`)."""
    modules = {name: path for name, path in zip(_modules(), sorted(PACKAGE.rglob("*.py")))}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets.update([base] + [f"{base}.{alias.name}" for alias in node.names])
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                # a module's own enclosing packages are already being imported when it runs
                if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                    edges.add(prefix)
        graph[name] = edges
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 20 and "eovseg.loss_eovseg" in graph["eovseg.modeling_eovseg"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # the checker finds a cycle where there is one
    assert find_cycle({**graph, "eovseg.loss_eovseg": graph["eovseg.loss_eovseg"] | {"eovseg.modeling_eovseg"}})
    # training uses evaluation, never the other way round
    reach, todo = set(), ["eovseg.evaluation"]
    while todo:
        for nxt in graph[todo.pop()] - reach:
            reach.add(nxt)
            todo.append(nxt)
    assert not any(name.startswith("eovseg.training") for name in reach), sorted(reach)


def _modules():
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names

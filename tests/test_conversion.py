"""Conversion of original-format checkpoints, Auto classes, pipelines and remote code (tiny preset)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor, pipeline

import eovseg  # noqa: F401  (registers the Auto classes and pipelines)
from eovseg import EovSegConfig, EovSegForPanopticSegmentation, EovSegProcessor
from eovseg.conversion_scripts.convert_original_checkpoint import main as convert_main
from eovseg.conversion_scripts.key_mapping import ours_to_original_key
from eovseg.demo import BUNDLED_IMAGE
from eovseg.vocabulary import display_name, synonym_counts

VOCABULARY = ["cup, mug", "saucer, plate", "table", "spoon", "wall", "floor"]
IS_THING = [True, True, True, True, False, False]


def original_checkpoint(model, extra_vit_keys=True):
    """Our weights under the original's key names, plus what the original also stores and we drop."""
    state = {ours_to_original_key(k): v.clone() for k, v in model.state_dict().items() if k != "default_text_embeddings"}
    if extra_vit_keys:
        width = model.spatial_extractor.width
        state["vit_backbone.clip_model.visual.transformer.resblocks.1.ln_1.weight"] = torch.ones(width)
        state["vit_backbone.clip_model.visual.ln_post.weight"] = torch.ones(width)
        state["vit_backbone.clip_model.token_embedding.weight"] = torch.zeros(10, 4)
        state["light_weight_decoder.criterion.empty_weight"] = torch.ones(9)
    return {"model": state}


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(1)
    model = EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def checkpoint_files(source_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    ckpt = folder / "model_final.pth"
    torch.save(original_checkpoint(source_model), ckpt)
    vocab = folder / "vocab.json"
    vocab.write_text(json.dumps({"classes": VOCABULARY, "is_thing": IS_THING}))
    train_vocab = folder / "train.txt"
    train_vocab.write_text("1:cup,mug\n2:table\n3:person\n")
    return ckpt, vocab, train_vocab


@pytest.fixture(scope="module")
def converted_dir(checkpoint_files, tmp_path_factory):
    ckpt, vocab, train_vocab = checkpoint_files
    out = tmp_path_factory.mktemp("converted") / "eovseg-tiny"
    code = convert_main(["--checkpoint_path", str(ckpt), "--variant", "tiny", "--output_dir", str(out),
                         "--vocabulary", str(vocab), "--train_vocabulary", str(train_vocab)])
    assert code == 0
    return out


def test_converted_folder_contents(converted_dir):
    names = set(os.listdir(converted_dir))
    for required in ["config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
                     "tokenizer.json", "README.md", "modeling_eovseg.py", "configuration_eovseg.py", "vocabulary.py"]:
        assert required in names, required
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["model_type"] == "eovseg"
    assert config["auto_map"]["AutoModel"] == "modeling_eovseg.EovSegForPanopticSegmentation"
    assert config["vocabulary"] == VOCABULARY and config["is_thing"] == IS_THING
    assert config["train_vocabulary"] == ["cup,mug", "table", "person"]
    assert config["id2label"]["0"] == "cup"
    dropped = (converted_dir / "dropped_keys.txt").read_text().split()
    assert "vit_backbone.clip_model.visual.transformer.resblocks.1.ln_1.weight" in dropped
    assert "light_weight_decoder.criterion.empty_weight" in dropped
    card = (converted_dir / "README.md").read_text()
    assert "tiny" in card and "6 classes" in card


def test_converted_model_equals_source(converted_dir, source_model):
    model = EovSegForPanopticSegmentation.from_pretrained(converted_dir).eval()
    processor = EovSegProcessor.from_pretrained(converted_dir)
    source_state = source_model.state_dict()
    for key, value in model.state_dict().items():
        if key != "default_text_embeddings":
            assert torch.equal(value, source_state[key]), key
    image = Image.open(BUNDLED_IMAGE).convert("RGB").resize((96, 64))
    inputs = processor(images=image, text=VOCABULARY, return_tensors="pt")
    assert inputs["class_seen_mask"].tolist() == [True, False, True, False, False, False]
    with torch.no_grad():
        ours = model(**inputs)
        reference = source_model(**inputs)
        default = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    torch.testing.assert_close(ours.class_queries_logits, reference.class_queries_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.masks_queries_logits, reference.masks_queries_logits, atol=1e-5, rtol=0)
    # the stored default-vocabulary embeddings are those of the vocabulary
    torch.testing.assert_close(default.class_queries_logits, ours.class_queries_logits, atol=1e-5, rtol=0)


def _run_convert(args, capsys):
    code = convert_main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_corrupted_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage" * 100)
    out = tmp_path / "out"
    code, err = _run_convert(["--checkpoint_path", str(bad), "--variant", "tiny", "--output_dir", str(out)], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "cannot read" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_truncated_state_dict(source_model, tmp_path, capsys):
    checkpoint = original_checkpoint(source_model)
    del checkpoint["model"]["light_weight_decoder.mask_heads.2.fc_mask.weight"]
    path = tmp_path / "truncated.pth"
    torch.save(checkpoint, path)
    out = tmp_path / "out"
    code, err = _run_convert(["--checkpoint_path", str(path), "--variant", "tiny", "--output_dir", str(out)], capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert "missing" in err and "decoder.layers.2.mask_kernel_proj.weight" in err
    assert not out.exists()


def test_wrong_variant(checkpoint_files, tmp_path, capsys):
    ckpt = checkpoint_files[0]
    out = tmp_path / "out"
    code, err = _run_convert(["--checkpoint_path", str(ckpt), "--variant", "tiny_convnext", "--output_dir", str(out)], capsys)
    assert code == 1 and len(err.splitlines()) == 1
    assert "is the 'tiny' variant, not 'tiny_convnext'" in err
    assert not out.exists()


def test_wrong_shape(source_model, tmp_path, capsys):
    checkpoint = original_checkpoint(source_model)
    checkpoint["model"]["void_embedding.weight"] = torch.zeros(1, 7)
    path = tmp_path / "shape.pth"
    torch.save(checkpoint, path)
    code, err = _run_convert(["--checkpoint_path", str(path), "--variant", "tiny", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 1 and "void_embedding.weight" in err and "(1, 7)" in err


def test_unexpected_key(source_model, tmp_path, capsys):
    checkpoint = original_checkpoint(source_model)
    checkpoint["model"]["light_weight_decoder.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(checkpoint, path)
    code, err = _run_convert(["--checkpoint_path", str(path), "--variant", "tiny", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 1 and "unexpected" in err and "extra_head" in err


# --------------------------------------------------------------------------------------------- Auto classes, pipeline


def test_auto_classes(converted_dir):
    assert type(AutoConfig.from_pretrained(converted_dir)).__name__ == "EovSegConfig"
    assert isinstance(AutoModel.from_pretrained(converted_dir), EovSegForPanopticSegmentation)
    # a converted folder loads the PIL backend (the original's resize) unless the torchvision one is asked for
    assert type(AutoImageProcessor.from_pretrained(converted_dir)).__name__ == "EovSegImageProcessorPil"
    assert type(AutoImageProcessor.from_pretrained(converted_dir, backend="torchvision")).__name__ == "EovSegImageProcessor"
    processor = AutoProcessor.from_pretrained(converted_dir)
    assert isinstance(processor, EovSegProcessor)
    assert processor.train_vocabulary == ["cup,mug", "table", "person"]


@pytest.mark.parametrize("subtask", ["panoptic", "semantic", "instance"])
def test_image_segmentation_pipeline(converted_dir, subtask):
    segmenter = pipeline("image-segmentation", model=str(converted_dir))
    image = Image.open(BUNDLED_IMAGE).convert("RGB")
    results = segmenter(image, subtask=subtask, threshold=0.0, overlap_mask_area_threshold=0.8)
    names = {display_name(v) for v in VOCABULARY}
    assert results, "no segment at all"
    for segment in results:
        assert segment["label"] in names
        assert segment["mask"].size == image.size
        assert np.asarray(segment["mask"]).max() == 255
        if subtask == "semantic":
            assert segment["score"] is None
        else:
            assert 0.0 <= segment["score"] <= 1.0


def test_open_vocabulary_pipeline_caches_text(converted_dir):
    segmenter = pipeline("open-vocabulary-segmentation", model=str(converted_dir))
    image = Image.open(BUNDLED_IMAGE).convert("RGB").resize((300, 200))
    labels = ["cat", "keyboard, computer keyboard", "sky"]
    model = segmenter.model
    calls = model.num_text_encoder_calls
    first = segmenter(image, candidate_labels=labels, stuff_labels=["sky"], subtask="semantic")
    assert model.num_text_encoder_calls == calls + 1
    second = segmenter(image, candidate_labels=labels, stuff_labels=["sky"], subtask="semantic")
    assert model.num_text_encoder_calls == calls + 1
    assert [r["label"] for r in first] == [r["label"] for r in second]
    assert {r["label"] for r in first} <= {"cat", "keyboard", "sky"}
    panoptic = segmenter(image, candidate_labels=labels, stuff_labels=["sky"])
    assert all(r["label"] in {"cat", "keyboard", "sky"} for r in panoptic)
    with pytest.raises(ValueError, match="not among the candidate_labels"):
        segmenter(image, candidate_labels=labels, stuff_labels=["grass"])


def test_remote_code_without_the_package(converted_dir, tmp_path):
    """AutoModel.from_pretrained(trust_remote_code=True) in a process where `import eovseg` is impossible."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["eovseg"] = None  # any import of the package fails
        import torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(converted_dir)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(converted_dir)!r}, trust_remote_code=True)
        assert "eovseg" not in type(model).__module__.split(".")[0], type(model).__module__
        inputs = processor(images=torch.zeros(3, 64, 96, dtype=torch.uint8), return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs)
        print(type(model).__module__, tuple(out.class_queries_logits.shape))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout and "(1, 10, 7)" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["r50", "r50x4", "convnext_l"])
def test_full_variant_conversion(variant, tmp_path):
    """Original-format checkpoint of a full variant with random weights -> converted folder -> same outputs."""
    torch.manual_seed(0)
    source = EovSegForPanopticSegmentation(EovSegConfig.from_variant(variant)).eval()
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "logit_scale" not in name:
                p.add_(torch.randn_like(p) * 0.02)
    ckpt = tmp_path / "model_final.pth"
    torch.save(original_checkpoint(source, extra_vit_keys=False), ckpt)
    out = tmp_path / "converted"
    assert convert_main(["--checkpoint_path", str(ckpt), "--variant", variant, "--output_dir", str(out)]) == 0
    ckpt.unlink()
    converted = EovSegForPanopticSegmentation.from_pretrained(out).eval()
    source_state = source.state_dict()
    for key, value in converted.state_dict().items():
        if key == "default_text_embeddings":  # the conversion adds its default vocabulary's (COCO panoptic) text pass
            assert value.shape == (sum(synonym_counts(converted.config.vocabulary)), source.config.embed_dim)
            continue
        assert torch.equal(value, source_state[key]), key
    assert set(source_state) <= set(converted.state_dict())
    # Loaded tensors sit at other memory alignments, which lets BLAS round differently and the decoder's hard masks
    # amplify it; with the same weights in fresh memory the outputs must be identical.
    for p in converted.parameters():
        p.data = p.data.clone()
    counts = torch.tensor([1, 2, 1])
    text = torch.nn.functional.normalize(torch.randn(4, source.config.embed_dim), dim=-1)
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a = source(pixel_values, text_embeddings=text, synonym_counts=counts)
        b = converted(pixel_values, text_embeddings=text, synonym_counts=counts)
    assert torch.equal(a.class_queries_logits, b.class_queries_logits)
    assert torch.equal(a.masks_queries_logits, b.masks_queries_logits)


def test_push_to_hub_uploads_the_converted_folder(checkpoint_files, tmp_path, monkeypatch):
    # The Hub is never reached: HfApi is replaced by a recorder of what would be uploaded.
    import huggingface_hub

    uploads = []

    class RecordingApi:
        def whoami(self):  # the login is checked before converting
            return {"name": "someone"}

        def create_repo(self, repo_id, exist_ok=False):
            assert exist_ok

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns=None):
            assert ignore_patterns is None
            uploads.append((repo_id, sorted(os.listdir(folder_path))))
            return "https://hub.example/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)  # the tests' HF_HUB_OFFLINE=1
    ckpt, vocab, _ = checkpoint_files
    out = tmp_path / "eovseg-tiny"
    assert convert_main(["--checkpoint_path", str(ckpt), "--variant", "tiny", "--output_dir", str(out),
                         "--vocabulary", str(vocab), "--push_to_hub", "someone/eovseg-tiny"]) == 0
    [(repo, files)] = uploads
    assert repo == "someone/eovseg-tiny"
    assert files == sorted(os.listdir(out))  # the whole folder: weights, processor, model card, remote code
    assert {"README.md", "model.safetensors", "modeling_eovseg.py", "processor_config.json"} <= set(files)


# --------------------------------------------------------------------------------------------- defaults

ORIGINAL_LISTS = os.path.join(os.path.dirname(__file__), "data", "original_vocabularies")


@pytest.fixture(scope="module")
def converted_with_defaults(checkpoint_files, tmp_path_factory):
    """Converted with no vocabulary flag at all."""
    out = tmp_path_factory.mktemp("defaults") / "eovseg-tiny"
    assert convert_main(["--checkpoint_path", str(checkpoint_files[0]), "--variant", "tiny", "--output_dir", str(out)]) == 0
    return out


def test_defaults_are_the_released_checkpoints_vocabularies(converted_with_defaults):
    from eovseg.vocabularies import get_vocabulary, read_vocabulary_file
    from eovseg.vocabulary import seen_class_mask

    coco = get_vocabulary("coco_panoptic")
    config = AutoConfig.from_pretrained(converted_with_defaults)
    assert config.train_vocabulary == coco.class_names
    assert config.vocabulary == coco.class_names and config.is_thing == coco.is_thing
    card = (converted_with_defaults / "README.md").read_text()
    assert "Default vocabulary: `coco_panoptic` (133 classes)" in card and "--vocabulary NAME|FILE" in card
    processor = AutoProcessor.from_pretrained(converted_with_defaults)
    seen = processor(text="ade20k_150")["class_seen_mask"]
    # The original's class lists (its text files, unchanged) give the seen mask; 64 of the 150 classes are seen, as in
    # the outputs of the original code (shared fixture original-r50).
    ade = read_vocabulary_file(os.path.join(ORIGINAL_LISTS, "ade20k_150_with_prompt_eng.txt")).class_names
    train = read_vocabulary_file(os.path.join(ORIGINAL_LISTS, "coco_panoptic_with_prompt_eng.txt")).class_names
    assert seen.tolist() == seen_class_mask(ade, train)
    assert int(seen.sum()) == 64


def test_pipeline_on_a_folder_converted_with_defaults(converted_with_defaults):
    from eovseg.vocabularies import get_vocabulary

    image = Image.open(BUNDLED_IMAGE).convert("RGB").resize((96, 64))
    model = AutoModel.from_pretrained(converted_with_defaults)
    segmenter = pipeline("image-segmentation", model=model, image_processor=AutoImageProcessor.from_pretrained(converted_with_defaults))
    calls = model.num_text_encoder_calls
    results = segmenter(image, subtask="panoptic", threshold=0.0, overlap_mask_area_threshold=0.8)
    assert results and model.num_text_encoder_calls == calls  # stored embeddings: no text pass
    names = set(get_vocabulary("coco_panoptic").display_names)
    assert all(r["label"] in names for r in results)
    ov = pipeline("open-vocabulary-segmentation", model=str(converted_with_defaults))
    labels = {r["label"] for r in ov(image, candidate_labels="cityscapes")}
    assert labels and labels <= set(get_vocabulary("cityscapes").display_names)


def test_image_segmentation_pipeline_with_remote_code_only(converted_with_defaults, tmp_path):
    """pipeline("image-segmentation", trust_remote_code=True) where `import eovseg` is impossible, offline."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["eovseg"] = None  # any import of the package fails
        from PIL import Image
        from transformers import pipeline
        segmenter = pipeline("image-segmentation", model={str(converted_with_defaults)!r}, trust_remote_code=True)
        image = Image.open({str(BUNDLED_IMAGE)!r}).convert("RGB").resize((96, 64))
        segments = segmenter(image, subtask="panoptic", threshold=0.0, overlap_mask_area_threshold=0.8)
        print(type(segmenter.model).__module__, type(segmenter.image_processor).__module__, len(segments))
        print("labels:", sorted({{s["label"] for s in segments}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    model_module, processor_module, count = result.stdout.splitlines()[0].split()
    assert model_module.startswith("transformers_modules") and processor_module.startswith("transformers_modules")
    assert int(count) > 0


# --------------------------------------------------------------------------------------------- damaged checkpoints


def _member_data_offset(path, name):
    """Where the bytes of the (stored, uncompressed) zip member `name` start in the file."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def test_checkpoint_with_flipped_bytes_in_a_tensor_is_refused(source_model, tmp_path, capsys):
    # Before the check, 500 flipped bytes inside a tensor converted with exit 0 (torch's reader ignores the CRCs).
    import zipfile

    state = original_checkpoint(source_model, extra_vit_keys=False)
    key = max(state["model"], key=lambda k: state["model"][k].numel())  # the largest tensor
    ckpt = tmp_path / "model_final.pth"
    torch.save(state, ckpt)
    with zipfile.ZipFile(ckpt) as archive:
        sizes = {i.filename: i.file_size for i in archive.infolist() if "/data/" in i.filename}
    member = max(sizes, key=sizes.get)
    assert sizes[member] == state["model"][key].untyped_storage().nbytes()
    start, size = _member_data_offset(ckpt, member)
    data = bytearray(ckpt.read_bytes())
    data[start + size // 2 : start + size // 2 + 500] = bytes(b ^ 0x5A for b in data[start + size // 2 : start + size // 2 + 500])
    ckpt.write_bytes(bytes(data))
    loaded = torch.load(ckpt, weights_only=True)["model"][key]  # torch reads it without a word ...
    assert torch.isfinite(loaded).all() and not torch.equal(loaded, state["model"][key])
    out = tmp_path / "out"
    code = convert_main(["--checkpoint_path", str(ckpt), "--variant", "tiny", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err  # ... the conversion refuses it, naming the file, the member and the tensor
    assert str(ckpt) in err[0] and f"{member!r} (tensor {key!r}) do not match their stored checksum" in err[0]
    assert not out.exists()


def test_checkpoint_with_a_non_finite_tensor_is_refused(source_model, tmp_path, capsys):
    state = original_checkpoint(source_model, extra_vit_keys=False)
    key = sorted(state["model"])[3]
    state["model"][key] = state["model"][key].clone()
    state["model"][key].view(-1)[0] = float("inf")
    ckpt = tmp_path / "model_final.pth"
    torch.save(state, ckpt)
    out = tmp_path / "out"
    code = convert_main(["--checkpoint_path", str(ckpt), "--variant", "tiny", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"eovseg convert: error: {str(ckpt)!r}: the tensor {key!r} holds 1 NaN or infinite "
                                 "value(s); the checkpoint is damaged"]
    assert not out.exists()


def test_push_to_hub_offline_is_refused_before_converting(checkpoint_files, tmp_path, capsys):
    # HF_HUB_OFFLINE=1 (set for every test): refused at once, nothing converted or written, no network reached.
    ckpt = checkpoint_files[0]
    out = tmp_path / "out"
    code = convert_main(["--checkpoint_path", str(ckpt), "--variant", "tiny", "--output_dir", str(out),
                         "--push_to_hub", "someone/eovseg-tiny"])
    captured = capsys.readouterr()
    assert code == 1 and captured.err.strip() == (
        "eovseg convert: error: --push_to_hub someone/eovseg-tiny: offline mode (HF_HUB_OFFLINE=1) forbids the "
        "upload; unset it or drop --push_to_hub."
    )
    assert "converted" not in captured.out and not out.exists()


def test_full_disk_while_writing_replaces_nothing_and_says_so(checkpoint_files, tmp_path, capsys, monkeypatch):
    import errno

    import eovseg.auto_registration as registration

    def disk_full(model, processor, folder):
        (folder / "model.safetensors").write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registration, "save_model_folder", disk_full)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier conversion")
    code = convert_main(["--checkpoint_path", str(checkpoint_files[0]), "--variant", "tiny", "--output_dir", str(out),
                         "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"eovseg convert: error: could not write the model into {str(out)!r} ([Errno 28] No "
                                 "space left on device); nothing there was replaced"]
    assert os.listdir(out) == ["model.safetensors"] and (out / "model.safetensors").read_bytes() == b"an earlier conversion"

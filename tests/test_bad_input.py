"""Users' files and bad input (issue 10): no command deletes or replaces a file it did not write, nothing crashes, and
every error is one line naming the problem. Tiny presets with random weights, files made by the tests."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from eovseg import EovSegConfig, EovSegForPanopticSegmentation
from eovseg.cli import main as cli_main
from eovseg.conversion_scripts.convert_original_checkpoint import main as convert_main
from eovseg.conversion_scripts.key_mapping import ours_to_original_key
from eovseg.modeling_eovseg import EovSegInputError
from eovseg.processing import EovSegProcessor

VOCABULARY = ["cup, mug", "table", "wall"]


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny")).eval()


@pytest.fixture(scope="module")
def processor(tiny):
    return EovSegProcessor.from_config(tiny.config)


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """An original-format checkpoint of the tiny model, in a folder also holding the user's notes."""
    folder = tmp_path_factory.mktemp("ckpt")
    state = {ours_to_original_key(k): v for k, v in tiny.state_dict().items() if k != "default_text_embeddings"}
    torch.save({"model": state}, folder / "model_final.pth")
    return folder / "model_final.pth"


def convert(args, capsys):
    code = convert_main([str(a) for a in args])
    # progress bars (saving shards) may precede the error on stderr: keep the lines that are not bars
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if "|" not in line)
    return code, err


def user_folder(path, files=("notes.txt", "config.json")):
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (path / name).write_text(f"the user's own {name}\n")
    return {name: (path / name).read_text() for name in files}


# ----------------------------------------------------------------------------------------------------------------------
# Conversion: never deletes or replaces a file it did not write
# ----------------------------------------------------------------------------------------------------------------------


def test_conversion_overwrite_replaces_only_its_own_files(checkpoint, tmp_path, capsys, monkeypatch):
    # The checkpoint's own folder, holding the user's notes, converted into with --overwrite (before the fix this
    # emptied the folder, checkpoint included), then again as "." from inside it (before: emptied, then OSError).
    folder = tmp_path / "dir"
    user_folder(folder, ("notes.txt", "results.csv"))
    ckpt = folder / "model_final.pth"
    ckpt.write_bytes(checkpoint.read_bytes())
    code, err = convert(["--checkpoint_path", ckpt, "--variant", "tiny", "--output_dir", folder, "--overwrite"], capsys)
    assert code == 0, err
    assert ckpt.read_bytes() == checkpoint.read_bytes()
    assert (folder / "notes.txt").read_text() == "the user's own notes.txt\n"
    assert (folder / "results.csv").read_text() == "the user's own results.csv\n"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    monkeypatch.chdir(folder)
    code, err = convert(["--checkpoint_path", "model_final.pth", "--variant", "tiny", "--output_dir", ".",
                         "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in folder.iterdir()) == sorted(written)
    assert ckpt.read_bytes() == checkpoint.read_bytes() and (folder / "notes.txt").is_file()
    untouched = {"model_final.pth", "notes.txt", "results.csv"}
    assert all((folder / n).stat().st_mtime_ns == written[n] for n in untouched)


def test_conversion_refuses_to_replace_its_checkpoint(checkpoint, tmp_path, capsys):
    # a checkpoint file that bears a name the conversion writes
    folder = tmp_path / "dir"
    folder.mkdir()
    ckpt = folder / "dropped_keys.txt"
    ckpt.write_bytes(checkpoint.read_bytes())
    code, err = convert(["--checkpoint_path", ckpt, "--variant", "tiny", "--output_dir", folder, "--overwrite"], capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "would replace the checkpoint" in err
    assert ckpt.read_bytes() == checkpoint.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["dropped_keys.txt"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_empty", "not empty"),
        ("is_a_file", "is a file"),
        ("text_checkpoint", "not a PyTorch checkpoint"),
        ("one_line_checkpoint", "not a PyTorch checkpoint"),
        ("names_vocabulary", 'no "classes"'),
        ("broken_json_vocabulary", "vocab.json"),
        ("yes_no_flags", "is_thing entry 0 is 'yes'"),
    ],
)
def test_conversion_user_errors_are_one_line(case, message, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--checkpoint_path", checkpoint, "--variant", "tiny", "--output_dir", out]
    vocab = tmp_path / "vocab.json"
    if case == "not_empty":
        user_folder(out)
    elif case == "is_a_file":
        out.write_text("a file\n")
    elif case in ("text_checkpoint", "one_line_checkpoint"):
        text = tmp_path / "model_final.pth"
        text.write_text("hello\nthis is text\n" if case == "text_checkpoint" else "one line\n")
        args[1] = text
    elif case == "names_vocabulary":
        vocab.write_text(json.dumps({"names": VOCABULARY}))
    elif case == "broken_json_vocabulary":
        vocab.write_text('{"classes": ["a", "b"')
    elif case == "yes_no_flags":
        vocab.write_text(json.dumps({"classes": ["a", "b"], "is_thing": ["yes", "no"]}))
    if vocab.exists():
        args += ["--vocabulary", vocab]
    before = sorted(os.listdir(tmp_path))
    code, err = convert(args, capsys)
    assert code == 1 and len(err.splitlines()) == 1 and message in err, err
    assert "weights_only" not in err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    if case == "not_empty":
        assert sorted(os.listdir(out)) == ["config.json", "notes.txt"]
        assert (out / "config.json").read_text() == "the user's own config.json\n"


def test_overwrite_has_help_text(capsys):
    assert convert_main(["--help"]) == 0  # every command's main returns its exit status
    help_text = capsys.readouterr().out
    overwrite = help_text[help_text.index("--overwrite"):]
    assert "leave every other file" in " ".join(overwrite.split())


# ----------------------------------------------------------------------------------------------------------------------
# The eovseg command: exit status and one-line errors
# ----------------------------------------------------------------------------------------------------------------------


def eovseg_command(*args, cwd=None):
    exe = os.path.join(os.path.dirname(sys.executable), "eovseg")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([exe, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_evaluate_exits_0_after_success_and_errors_are_one_line(tmp_path):
    # Before the fix the console script passed evaluate's result dict to sys.exit: exit 1, the dict on stderr.
    result = eovseg_command("evaluate", "--model", "random:tiny", "--dataset", "synthetic", "--num_synthetic", "2",
                            "--no_progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "{" not in result.stderr
    result = eovseg_command("convert", "--checkpoint_path", "missing.pth", "--variant", "tiny", "--output_dir", "o",
                            cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "eovseg convert: error: checkpoint 'missing.pth' does not exist"
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model", "tiny", "--dataset", "synthetic", "--output_dir", "o", "--config_overrides", "{bad"],
         "--config_overrides is not valid JSON"),
        (["train", "--model", "tiny", "--dataset", "synthetic", "--output_dir", "o", "--config_overrides",
          '{"num_proposalz": 3}'], "'num_proposalz' is not an EovSegConfig field (did you mean 'num_proposals'?)"),
        (["demo", "--image", "missing.jpg"], "image file 'missing.jpg' not found"),
        (["train", "--model", "tiny", "--dataset", "synthetic", "--output_dir", "o", "--categories", "cats.json"],
         "Vocabulary file 'cats.json' is not valid JSON"),
        (["train", "--model", "tiny", "--dataset", "synthetic", "--output_dir", "o", "--categories", "flags.json"],
         "flags.json: class 'sky' isthing is 'no'"),
        (["train", "--model", "tiny", "--dataset", "synthetic", "--output_dir", "o", "--config_overrides",
          '{"num_proposals": -3}'], 'overrides {"num_proposals": -3}: no tiny model can be built with these values'),
        (["train", "--model", "tiny", "--dataset", "synthetic", "--output_dir", "o", "--config_overrides",
          '{"num_proposals": "many"}'], "'num_proposals' must be a number like its default 10, got 'many'"),
        (["evaluate", "--model", "random:tiny", "--dataset", "missing_folder"], "missing_folder does not exist"),
        (["train", "--model", "tiny", "--dataset", "synthetic", "--output_dir", "o", "--dataset_type", "semantic"],
         "('label') is a 3-channel map"),  # was found at the first step, after the folder was written
        (["evaluate", "--model", "random:tiny", "--dataset", "synthetic", "--split", "nope"],
         "--split nope: the data set has no splits"),  # was ignored: exit 0
        (["evaluate", "--model", "random:tiny", "--dataset", "synthetic", "--panoptic_column", "zzz"],
         "--panoptic_column 'zzz': the data set has no such column"),  # was replaced by 'label' without a word
        (["evaluate", "--model", "random:tiny", "--dataset", "synthetic", "--device", "nosuchdevice"],
         "--device nosuchdevice: "),  # was a traceback
    ],
)
def test_command_user_errors_exit_1_with_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cats.json").write_text('[{"id": 0, "name": "circle", "isthing": 1},')
    (tmp_path / "flags.json").write_text(json.dumps([{"id": 0, "name": "circle", "isthing": "true"},
                                                     {"id": 1, "name": "sky", "isthing": "no"}]))
    assert cli_main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


TRAIN = ["train", "--model", "tiny", "--dataset", "synthetic", "--output_dir", "o"]
EVALUATE = ["evaluate", "--model", "random:tiny", "--dataset", "synthetic"]
CONVERT = ["convert", "--checkpoint_path", "model_final.pth", "--variant", "tiny", "--output_dir", "o"]


@pytest.mark.parametrize(
    "args, message",
    [
        (TRAIN + ["--max_steps", "0"], "argument --max_steps: must be a positive integer, got '0'"),
        (TRAIN + ["--max_steps", "-5"], "argument --max_steps: must be a positive integer, got '-5'"),
        (TRAIN + ["--flip_probability", "2"], "argument --flip_probability: must be a probability between 0 and 1"),
        (TRAIN + ["--gradient_accumulation_steps", "0"], "argument --gradient_accumulation_steps: must be a positive"),
        (TRAIN + ["--warmup_iters", "-3"], "argument --warmup_iters: must be 0 or a positive integer, got '-3'"),
        (TRAIN + ["--learning_rate", "nan"], "argument --learning_rate: expected a finite number within float32's range, got 'nan'"),
        (TRAIN + ["--per_device_batch_size", "two"], "argument --per_device_batch_size: expected an integer, got 'two'"),
        (TRAIN + ["--min_scale", "2", "--max_scale", "1"], "--min_scale 2.0 is above --max_scale 1.0"),
        (TRAIN + ["--eval_steps", "5"], "--eval_steps and --eval_max_samples need --eval_dataset"),
        (TRAIN + ["--save_steps", "0", "--save_total_limit", "1"], "--save_total_limit needs --save_steps"),
        (TRAIN + ["--test_longest_edge", "800"], "--test_longest_edge needs --test_shortest_edge"),
        (TRAIN + ["--dataset_split", "nope"], "--dataset_split chooses a split of a local data set; synthetic has none"),
        (TRAIN + ["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "pass one of them"),
        (EVALUATE + ["--shortest_edge", "0"], "argument --shortest_edge: must be a positive integer, got '0'"),
        (EVALUATE + ["--shortest_edge", "-64"], "argument --shortest_edge: must be a positive integer, got '-64'"),
        (EVALUATE + ["--max_samples", "0"], "argument --max_samples: must be a positive integer, got '0'"),
        (EVALUATE + ["--overlap_threshold", "-0.1"], "argument --overlap_threshold: must be a probability"),
        (CONVERT + ["--stuff_ids", "-1"], "argument --stuff_ids: must be 0 or a positive integer, got '-1'"),
        (["nonsense"], "unknown command 'nonsense'"),
    ],
)
def test_out_of_range_options_are_usage_errors_refused_at_parse_time(args, message, tmp_path, monkeypatch, capsys):
    # Before: --max_steps 0 saved an untrained model, --flip_probability 2 always flipped, --warmup_iters -3 and
    # --gradient_accumulation_steps 0 were taken silently, evaluate --shortest_edge 0 reported PQ 0.0 (exit 0).
    monkeypatch.chdir(tmp_path)
    assert cli_main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"eovseg{' ' + args[0] if args[0] != 'nonsense' else ''}: error: ") and message in error
    assert os.listdir(tmp_path) == []  # nothing written


def test_module_entry_points_follow_the_same_convention(tmp_path):
    # `python -m eovseg.X` and the console script: the same line and status for the same error.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for module, args in [("eovseg.evaluation.evaluate", EVALUATE[1:] + ["--output", "r.json"]),
                         ("eovseg.conversion_scripts.convert_original_checkpoint", CONVERT[1:])]:
        (tmp_path / "r.json").write_text("mine")
        run = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("eovseg "), run.stderr[-2000:]


def test_cli_returns_int_status_for_any_main_result():
    from eovseg.command_line import run_command as run_main

    assert run_main(lambda argv: {"PQ": 1.0}) == 0
    assert run_main(lambda argv: None) == 0
    assert run_main(lambda argv: 3) == 3

    def fails(argv):
        raise ValueError("the file x.json is broken\nsecond line")

    assert run_main(fails) == 1

    def usage(argv):
        raise SystemExit(2)  # argparse's way

    assert run_main(usage) == 2


# ----------------------------------------------------------------------------------------------------------------------
# Model inputs: EovSegInputError before any op
# ----------------------------------------------------------------------------------------------------------------------


def test_non_finite_pixel_does_not_crash_the_process(tmp_path):
    # Before the check, one NaN reached torchvision's deform_conv2d and killed the process (exit 139).
    script = textwrap.dedent(
        """
        import torch
        from eovseg import EovSegConfig, EovSegForPanopticSegmentation
        from eovseg.modeling_eovseg import EovSegInputError
        torch.manual_seed(0)
        model = EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny")).eval()
        pixel_values = torch.randn(1, 3, 64, 64)
        pixel_values[0, 1, 5, 7] = float("nan")
        try:
            model(pixel_values, text_embeddings=torch.nn.functional.normalize(torch.randn(2, model.config.embed_dim), dim=-1),
                  synonym_counts=torch.tensor([1, 1]))
        except EovSegInputError as err:
            print("refused:", err)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "refused:" in result.stdout and "NaN or infinite" in result.stdout


def _text(model, n=2):
    torch.manual_seed(1)
    return torch.nn.functional.normalize(torch.randn(n, model.config.embed_dim), dim=-1)


@pytest.mark.parametrize(
    "case, message",
    [
        ("inf_pixel", "NaN or infinite"),
        ("uint8_pixels", "dtype torch.uint8"),
        ("ids_too_large", "knows ids 0 to"),
        ("negative_ids", "knows ids 0 to"),
        ("float_ids", "integer token ids"),
        ("narrow_text_embeddings", "wide"),
        ("text_embeddings_1d", "(num_synonyms, embed_dim)"),
    ],
)
def test_model_input_errors(case, message, tiny, processor):
    pixel_values = torch.randn(1, 3, 64, 64)
    kwargs = {"text_embeddings": _text(tiny), "synonym_counts": torch.tensor([1, 1])}
    if case == "inf_pixel":
        pixel_values[0, 0, 0, 0] = float("inf")
    elif case == "uint8_pixels":
        pixel_values = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    elif case in ("ids_too_large", "negative_ids", "float_ids"):
        ids = processor.encode_vocabulary(["cup", "table"], return_tensors="pt")["input_ids"]
        if case == "ids_too_large":
            ids[0, 1] = tiny.clip_backbone.clip_model.token_embedding.num_embeddings
        elif case == "negative_ids":
            ids[3, 2] = -1
        else:
            ids = ids.float()
        kwargs = {"input_ids": ids, "synonym_counts": torch.tensor([1, 1])}
    elif case == "narrow_text_embeddings":
        kwargs["text_embeddings"] = torch.randn(2, tiny.config.embed_dim + 3)
    elif case == "text_embeddings_1d":
        kwargs["text_embeddings"] = torch.randn(tiny.config.embed_dim)
        kwargs["synonym_counts"] = torch.tensor([1])
    with pytest.raises(EovSegInputError, match=None) as info, torch.no_grad():
        tiny(pixel_values, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_float64_pixels_are_cast_to_the_model_dtype(tiny):
    pixel_values = torch.randn(1, 3, 64, 64)
    kwargs = {"text_embeddings": _text(tiny), "synonym_counts": torch.tensor([1, 1])}
    with torch.no_grad():
        expected = tiny(pixel_values, **kwargs).class_queries_logits
        got = tiny(pixel_values.double(), **kwargs).class_queries_logits
    assert got.dtype == torch.float32 and torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------------------------------
# Training: a non-empty --output_dir is someone's
# ----------------------------------------------------------------------------------------------------------------------

TRAIN = ["--model", "tiny", "--dataset", "synthetic", "--synthetic_image_size", "64", "--synthetic_train_images", "2",
         "--per_device_batch_size", "2", "--no_augmentation", "--max_steps", "1", "--save_steps", "0", "--no_progress",
         "--logging_steps", "1"]


def test_training_refuses_a_non_empty_output_dir_then_overwrites_only_its_files(tmp_path, capsys):
    from eovseg.training.train import main as train_main

    out = tmp_path / "user"
    user_folder(out, ("config.json", "notes.txt"))
    (out / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    assert cli_main(["train", *TRAIN, "--output_dir", str(out)]) == 1
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "the user's own config.json\n"
    assert (out / "metrics.jsonl").read_text() == '{"step": 99, "loss": 1.0}\n'

    assert train_main([*TRAIN, "--output_dir", str(out), "--overwrite_output_dir"]) == 0
    assert (out / "notes.txt").read_text() == "the user's own notes.txt\n"
    assert json.loads((out / "config.json").read_text())["model_type"] == "eovseg"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]  # a fresh log, not appended to the old one


# ----------------------------------------------------------------------------------------------------------------------
# Flags read as booleans
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [(True, True), (0, False), ("true", True), ("False", False), ("1", True)])
def test_flags_accept_booleans_and_0_1(value, expected):
    from eovseg.vocabulary import parse_flag

    assert parse_flag(value, "x") is expected


@pytest.mark.parametrize("value", ["yes", "no", 2, None, 0.5, ""])
def test_flags_refuse_anything_else(value):
    from eovseg.vocabulary import VocabularyError, parse_flag

    with pytest.raises(VocabularyError, match=r"cats.json: isthing of entry 3 is"):
        parse_flag(value, "cats.json: isthing of entry 3")


def test_config_refuses_string_is_thing():
    with pytest.raises(ValueError, match="is_thing entry 1 is 'no'"):
        EovSegConfig.from_variant("tiny", vocabulary=["a", "b"], is_thing=["true", "no"])


# ----------------------------------------------------------------------------------------------------------------------
# Default-vocabulary embeddings tied to the vocabulary; the text-embedding cache
# ----------------------------------------------------------------------------------------------------------------------


def _default_vocabulary_text(model):
    with torch.no_grad():
        return model(torch.zeros(1, 3, 32, 32), output_hidden_states=True).text_embeddings[0]


def test_edited_default_vocabulary_is_re_encoded(tiny, processor, tmp_path):
    model = EovSegForPanopticSegmentation(tiny.config).eval()
    model.load_state_dict(tiny.state_dict(), strict=False)
    model.set_default_vocabulary_embeddings(processor.encode_vocabulary(model.config.vocabulary)["input_ids"])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # new names with the same synonym counts (the stored embeddings still fit the buffer)
    renamed = [f"zebra{i}" if "," not in name else f"zebra{i}, " + ", ".join(f"z{i}x{j}" for j in range(name.count(",")))
               for i, name in enumerate(config["vocabulary"])]
    config["vocabulary"] = renamed
    (tmp_path / "config.json").write_text(json.dumps(config))

    edited = EovSegForPanopticSegmentation.from_pretrained(tmp_path).eval()
    expected = edited.get_text_embeddings(processor.encode_vocabulary(renamed)["input_ids"])
    assert torch.allclose(_default_vocabulary_text(edited), expected, atol=1e-6)
    # unedited: the stored embeddings are used as they are, with no text pass
    reloaded = EovSegForPanopticSegmentation(model.config).eval()
    reloaded.load_state_dict(model.state_dict())
    calls = reloaded.num_text_encoder_calls
    assert torch.equal(_default_vocabulary_text(reloaded), model.default_text_embeddings)
    assert reloaded.num_text_encoder_calls == calls

    del edited.clip_backbone.clip_model.transformer  # a model without its text tower cannot re-encode: it refuses
    edited._verified_vocabulary = None
    edited.config.vocabulary = ["yak" + name[len(name.split(",")[0]):] for name in renamed]
    with pytest.raises(EovSegInputError, match="another vocabulary than config.vocabulary"):
        _default_vocabulary_text(edited)


def test_text_cache_hands_out_copies_and_follows_weight_changes(processor):
    torch.manual_seed(3)
    model = EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny")).eval()
    ids = processor.encode_vocabulary(["cup", "table"])["input_ids"]
    first = model.get_text_embeddings(ids)
    reference = first.clone()
    first.mul_(0)  # the caller edits what it got
    assert torch.equal(model.get_text_embeddings(ids), reference)
    counts = torch.tensor([1, 1])
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32), input_ids=ids, synonym_counts=counts, output_hidden_states=True
              ).text_embeddings.mul_(0)
        assert torch.equal(model(torch.zeros(1, 3, 32, 32), input_ids=ids, synonym_counts=counts,
                                 output_hidden_states=True).text_embeddings[0], reference)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["clip_backbone.clip_model.text_projection"] = state["clip_backbone.clip_model.text_projection"] * -1
    model.load_state_dict(state)
    assert torch.allclose(model.get_text_embeddings(ids), -reference, atol=1e-6)

    with torch.no_grad():
        model.clip_backbone.clip_model.ln_final.weight.mul_(2.0)  # e.g. an optimizer step on the text tower
        model.clip_backbone.clip_model.ln_final.bias.add_(0.5)
    calls = model.num_text_encoder_calls
    changed = model.get_text_embeddings(ids)
    assert model.num_text_encoder_calls == calls + 1 and not torch.allclose(changed, -reference, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# Geometric ensemble, thin images, post-processing arguments
# ----------------------------------------------------------------------------------------------------------------------


def test_geometric_ensemble_never_gives_nan():
    from eovseg.modeling_eovseg import EovSegGeometricEnsemble

    torch.manual_seed(0)
    in_logits, out_logits = torch.randn(2, 5, 7) * 3, torch.randn(2, 5, 7) * 3
    in_logits[0, 0, 2] = -1e4  # a probability that underflows to exactly 0
    out_logits[1, 3, :6] = -1e4
    seen = torch.tensor([True, False, True, False, False, True])
    ensemble = EovSegGeometricEnsemble(0.4, 0.8, on_valid_mask=False)
    got = ensemble(in_logits, out_logits, seen)
    assert torch.isfinite(got).all()
    # the original's formula, where it is finite
    p_in, p_out = in_logits[..., :-1].softmax(-1), out_logits[..., :-1].softmax(-1)
    s = seen.float()
    alpha, beta = torch.full_like(p_in, 0.4), torch.full_like(p_in, 0.8)
    combined = (p_in ** (1 - alpha) * p_out**alpha).log() * s + (p_in ** (1 - beta) * p_out**beta).log() * (1 - s)
    void = in_logits.softmax(-1)[..., -1:]
    original = torch.log(torch.cat([combined.softmax(-1) * (1 - void), void], -1) + 1e-8)
    assert torch.isnan(original).any()  # the case the fix is about
    finite = torch.isfinite(original).all(-1)
    assert torch.equal(got[finite], original[finite])


def test_very_thin_image_is_processed(processor):
    import numpy as np

    image = np.full((20000, 2, 3), 128, dtype=np.uint8)
    inputs = processor.image_processor(image, return_tensors="pt")
    h, w = inputs["pixel_values"].shape[-2:]
    assert h >= 2560 and w >= 1 and inputs["pixel_mask"].sum() == 2560 * 1


@pytest.mark.parametrize(
    "method, kwargs, message",
    [
        ("panoptic", {"threshold": 1.5}, "threshold must be a probability in [0, 1]"),
        ("panoptic", {"threshold": float("nan")}, "threshold must be a probability in [0, 1]"),
        ("panoptic", {"overlap_mask_area_threshold": 5}, "overlap_mask_area_threshold must be"),
        ("panoptic", {"mask_threshold": 2}, "mask_threshold must be"),
        ("panoptic", {"label_ids_to_fuse": {"sky"}}, "give ids, not class names"),
        ("instance", {"top_k": -5}, "top_k must be a positive int"),
        ("instance", {"mask_threshold": -0.1}, "mask_threshold must be"),
        ("instance", {"thing_ids": "0"}, "thing_ids must be a collection of class ids"),
    ],
)
def test_post_processing_arguments_are_checked(method, kwargs, message, tiny, processor):
    from transformers.utils import ModelOutput

    outputs = ModelOutput(class_queries_logits=torch.randn(1, 4, 3), masks_queries_logits=torch.randn(1, 4, 8, 8),
                          image_sizes=torch.tensor([[32, 32]]))
    post = getattr(processor, f"post_process_{method}_segmentation")
    with pytest.raises(ValueError) as info:
        post(outputs, **kwargs)
    assert message in str(info.value)


# ----------------------------------------------------------------------------------------------------------------------
# Open-vocabulary pipeline and vocabularies
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter(tiny, processor):
    from transformers import pipeline

    return pipeline("open-vocabulary-segmentation", model=tiny, image_processor=processor.image_processor,
                    tokenizer=processor.tokenizer)


def _photo():
    from PIL import Image

    from eovseg.demo import BUNDLED_IMAGE

    return Image.open(BUNDLED_IMAGE).convert("RGB").resize((64, 48))


def test_pipeline_stuff_labels_as_one_string(segmenter):
    # before: "sky" was read as the characters s, k, y and refused as not among the candidate labels
    result = segmenter(_photo(), candidate_labels=["cup", "sky"], stuff_labels="sky")
    expected = segmenter(_photo(), candidate_labels=["cup", "sky"], stuff_labels=["sky"])
    assert [(r["label"], r["score"]) for r in result] == [(r["label"], r["score"]) for r in expected]
    assert sum(r["label"] == "sky" for r in result) <= 1  # stuff is merged


@pytest.mark.parametrize("text, example", [("red circle, blue sky", '["red circle", "blue sky"]'), ("cup", '["cup"]')])
def test_pipeline_candidate_labels_string_that_is_no_vocabulary_name(segmenter, text, example):
    # commas separate synonyms: the string is neither split nor taken as one class, the error shows the list to pass
    with pytest.raises(ValueError) as error:
        segmenter(_photo(), candidate_labels=text)
    message = str(error.value)
    assert "\n" not in message and "is not a built-in vocabulary name" in message
    assert f"candidate_labels={example}" in message
    from eovseg.vocabularies import get_vocabulary
    from eovseg.vocabulary import display_name

    names = {display_name(name) for name in get_vocabulary("pascal_voc_20").class_names}
    assert {r["label"] for r in segmenter(_photo(), candidate_labels="pascal_voc_20")} <= names  # a name still works


def test_pipeline_stuff_labels_need_candidate_labels(segmenter):
    with pytest.raises(ValueError, match="stuff_labels needs candidate_labels"):
        segmenter(_photo(), stuff_labels=["wall"])


def test_pipeline_passes_mask_threshold_for_instances(segmenter):
    import numpy as np

    def area(mask_threshold):
        result = segmenter(_photo(), candidate_labels=["cup", "table"], subtask="instance",
                           mask_threshold=mask_threshold)
        return sum(int(np.asarray(r["mask"]).astype(bool).sum()) for r in result)

    assert area(0.01) > area(0.99)


def test_truncated_prompts_warn_and_identical_prompts_are_refused(processor, caplog):
    from transformers.utils import logging as hf_logging

    from eovseg.vocabulary import VocabularyError

    long = "very " * 80
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            processor.encode_vocabulary([long + "cat", "dog"])
    finally:
        hf_logging.disable_propagation()
    assert "were cut" in caplog.text
    with pytest.raises(VocabularyError, match="identical prompts"):
        processor.encode_vocabulary([long + "cat", long + "dog"])
    with pytest.raises(VocabularyError, match=r"Classes 0 \('car'\) and 1 \('Car'\)"):
        processor.encode_vocabulary(["car", "Car"])


def test_demo_replaces_only_its_own_outputs(tmp_path, capsys):
    from PIL import Image

    from eovseg.demo import BUNDLED_IMAGE

    image = tmp_path / "photo.png"
    Image.open(BUNDLED_IMAGE).convert("RGB").resize((64, 48)).save(image)
    out = tmp_path / "out"
    user_folder(out, ("photo_segments.json",))
    args = ["demo", "--image", str(image), "--output_dir", str(out)]
    assert cli_main(args) == 1
    assert "was not written by the demo" in capsys.readouterr().err
    assert (out / "photo_segments.json").read_text() == "the user's own photo_segments.json\n"
    assert not (out / "photo_panoptic.png").exists()

    (out / "photo_segments.json").unlink()
    assert cli_main(args) == 0 and cli_main(args) == 0  # its own earlier outputs are replaced
    assert json.loads((out / "photo_segments.json").read_text())["written_by"] == "eovseg demo"


# ----------------------------------------------------------------------------------------------------------------------
# The Python API: missing folders and files, pickles, saving into a file
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("load", [EovSegForPanopticSegmentation.from_pretrained, EovSegConfig.from_pretrained,
                                  EovSegProcessor.from_pretrained])
def test_a_missing_local_folder_is_not_found(load, tmp_path):
    # before: "Repo id must be in the form 'repo_name' or 'namespace/repo_name'", which names no folder
    for missing in (tmp_path / "model", str(tmp_path / "model"), "./my-model/", "../x/y/z"):
        with pytest.raises(FileNotFoundError, match="model folder .* not found"):
            load(missing)


def test_a_missing_image_path_is_file_not_found(segmenter, tmp_path):
    from eovseg.inputs import decode_image, load_image

    missing = str(tmp_path / "photo.jpg")
    # before: transformers' "Incorrect image source ... Failed with Incorrect padding" (read as base64)
    for call in (lambda: load_image(missing), lambda: load_image("photo.jpg"), lambda: decode_image(missing),
                 lambda: segmenter(missing, candidate_labels=["cup", "table"])):
        with pytest.raises(FileNotFoundError, match=r"image file '.*photo.jpg' not found"):
            call()
    with pytest.raises(IsADirectoryError, match="is a folder, not an image file"):
        load_image(str(tmp_path))


def test_a_refused_pickle_gives_no_advice_to_unpickle(tiny, tmp_path):
    import argparse

    tiny.save_pretrained(tmp_path, safe_serialization=True)
    from safetensors.torch import load_file

    state = dict(load_file(tmp_path / "model.safetensors"), extra=argparse.Namespace(code=1))
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError) as error:
        EovSegForPanopticSegmentation.from_pretrained(tmp_path)
    assert "unpickling them could run code" in str(error.value) and str(tmp_path) in str(error.value)
    assert "weights_only" not in str(error.value)


def test_save_pretrained_into_a_file_raises(tiny, processor, tmp_path):
    # before: the model logged an error and saved nothing, the others raised an assertion or errno message
    target = tmp_path / "model"
    target.write_text("the user's file\n")
    for obj in (tiny, tiny.config, processor):
        with pytest.raises(NotADirectoryError, match="it is a file; give a folder"):
            obj.save_pretrained(target)
    assert target.read_text() == "the user's file\n"

"""Progress bars, one rule for every command: `--no_progress` silences all of them (the package's, transformers',
huggingface_hub's, datasets'); without it the long steps show theirs; the environment switches hold."""

import io
import os
import re
import subprocess
import sys
import textwrap

import pytest
from transformers.utils import logging as hf_logging

from eovseg import command_line, modeling_eovseg
from eovseg.cli import COMMANDS, command_parser
from eovseg.loading import default_model_path

BAR = re.compile(r"\d+%\|")  # tqdm's bar: "  0%|", " 40%|###", "100%|#####"


def bar_names(text: str) -> set[str]:
    """The descriptions of the progress bars drawn in `text` ("Loading weights", ...)."""
    return {line.split(":")[0].strip() for line in re.split(r"[\r\n]", text) if BAR.search(line)}


@pytest.fixture
def bars_at_once(monkeypatch):
    """Every bar drawn as soon as it starts (tqdm's TQDM_DELAY, which the commands read), as a long step draws it, with
    transformers' (and so huggingface_hub's) bars on as a user's session has them; restored afterwards."""
    monkeypatch.setenv("TQDM_DELAY", "0")
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()


def run_demo(tmp_path, *options):
    from eovseg.demo import main

    # --classes: a vocabulary not stored with the model, so the demo runs a text pass
    return main(["--output_dir", str(tmp_path), "--classes", "red circle", "blue sky", "--stuff", "blue sky", *options])


def run_evaluate(*options):
    from eovseg.evaluation.evaluate import main

    return main(["--model", str(default_model_path()), "--dataset", "synthetic", "--num_synthetic", "2", *options])


def test_demo_shows_loading_and_text_pass_bars_and_no_progress_silences_all(tmp_path, bars_at_once, capfd):
    assert run_demo(tmp_path) == 0
    out, err = capfd.readouterr()
    assert {"Loading weights", "Encoding the vocabulary"} <= bar_names(err)
    assert not BAR.search(out)  # bars go to stderr, the report to stdout

    assert run_demo(tmp_path, "--no_progress") == 0
    out, err = capfd.readouterr()
    assert "segments on" in out
    assert not BAR.search(out + err) and "\r" not in out + err and "it/s" not in err
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is back


def test_only_the_first_process_of_a_machine_draws_bars(tmp_path, bars_at_once, capfd, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # as torchrun / accelerate launch set it in a machine's second process
    assert run_demo(tmp_path) == 0
    out, err = capfd.readouterr()
    assert "segments on" in out and not BAR.search(out + err)


def test_evaluate_shows_loading_and_per_image_bars_and_no_progress_silences_all(bars_at_once, capfd):
    assert run_evaluate() == 0
    out, err = capfd.readouterr()
    assert {"Loading weights", "Evaluating (panoptic)"} <= bar_names(err)
    assert re.search(r"Evaluating \(panoptic\): 100%\|[^\r\n]*\| 2/2 ", err)  # one step per image

    assert run_evaluate("--no_progress") == 0
    out, err = capfd.readouterr()
    assert "PQ" in out
    assert not BAR.search(out + err) and "\r" not in out + err and "it/s" not in err


def test_train_and_predict_show_their_bars_and_no_progress_silences_all(tmp_path, bars_at_once, capfd):
    from eovseg.loading import default_image_path
    from eovseg.predict import main as predict
    from eovseg.training.train import main as train

    def runs(*option):
        out = tmp_path / f"run{len(option)}"
        assert train(["--model", "tiny", "--dataset", "synthetic", "--synthetic_train_images", "2", "--max_steps", "1",
                      "--image_size", "64", "--cpu", "--save_steps", "0", "--output_dir", str(out / "model"),
                      *option]) == 0
        assert predict([str(default_image_path()), "--output_dir", str(out / "predict"), "--cpu", *option]) == 0
        return capfd.readouterr()

    out, err = runs()
    # "Writing model shards": transformers' bar as train saves the model; "eovseg predict": one step per input
    assert {"Training", "Writing model shards", "Loading weights", "eovseg predict"} <= bar_names(err)
    out, err = runs("--no_progress")
    assert not BAR.search(out + err) and "\r" not in out + err and "it/s" not in err


def test_convert_shows_its_bars_and_no_progress_silences_all(tmp_path, bars_at_once, capfd):
    import torch

    from eovseg import EovSegConfig, EovSegForPanopticSegmentation
    from eovseg.conversion_scripts.convert_original_checkpoint import main as convert
    from eovseg.conversion_scripts.key_mapping import ours_to_original_key

    model = EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny"))
    state = {ours_to_original_key(k): v for k, v in model.state_dict().items() if k != "default_text_embeddings"}
    torch.save({"model": state}, tmp_path / "model_final.pth")
    (tmp_path / "vocabulary.json").write_text('{"classes": ["cup", "table", "wall"], "is_thing": [true, true, false]}')

    def runs(*option):
        assert convert(["--checkpoint_path", str(tmp_path / "model_final.pth"), "--variant", "tiny", "--output_dir",
                        str(tmp_path / f"out{len(option)}"), "--vocabulary", str(tmp_path / "vocabulary.json"),
                        *option]) == 0
        return capfd.readouterr()

    out, err = runs()
    assert {"Encoding the vocabulary", "Writing model shards"} <= bar_names(err)
    out, err = runs("--no_progress")
    assert "sanity run" in out
    assert not BAR.search(out + err) and "\r" not in out + err and "it/s" not in err


def test_the_switch_turns_every_library_off_and_restores_each():
    import datasets
    from huggingface_hub import utils as hub_utils

    def states():
        return (hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled(),
                datasets.utils.are_progress_bars_disabled())

    before = states()
    with command_line.progress_switch(enabled=False):
        assert states() == (False, True, True)
        assert isinstance(command_line.progress_bar(range(3), desc="ours"), hf_logging.EmptyTqdm)
    assert states() == before


def test_every_bar_waits_the_same_delay_within_a_command(bars_at_once, monkeypatch):
    monkeypatch.delenv("TQDM_DELAY")
    assert modeling_eovseg.TEXT_PROGRESS_DELAY == command_line.PROGRESS_DELAY  # the model file's copy of the rule
    assert command_line.progress_delay() == command_line.PROGRESS_DELAY
    with command_line.progress_switch():
        with hf_logging.tqdm(range(2), desc="transformers' own", file=io.StringIO()) as theirs, \
                command_line.progress_bar(range(2), desc="ours", file=io.StringIO()) as ours:
            assert theirs.delay == ours.delay == command_line.PROGRESS_DELAY
    monkeypatch.setenv("TQDM_DELAY", "0.25")
    assert command_line.progress_delay() == 0.25


@pytest.mark.parametrize("name", ["demo", "predict", "app", "train", "evaluate", "convert"])
def test_every_long_command_has_the_one_switch(name):
    (option,) = [a for a in command_parser(name)._actions if "--no_progress" in a.option_strings]
    assert option.help == command_line.NO_PROGRESS_HELP and option.default is False
    assert name in COMMANDS


BARS_SCRIPT = textwrap.dedent("""
    import importlib.util, sys
    from transformers.utils import logging
    # eovseg.command_line alone, from its file: the package's __init__ would import torch (seconds) for nothing here
    spec = importlib.util.spec_from_file_location("command_line", sys.argv[1])
    command_line = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(command_line)
    with command_line.progress_switch():
        for _ in command_line.progress_bar(range(3), desc="ours"):
            pass
        for _ in logging.tqdm(range(3), desc="transformers'"):
            pass
""")


@pytest.mark.parametrize("switch", [None, "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"])
def test_environment_switches_silence_ours_and_transformers(switch):
    # read when tqdm and huggingface_hub are imported: a fresh process
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "HF_HUB_DISABLE_PROGRESS"))}
    env["TQDM_DELAY"] = "0"
    if switch:
        env[switch] = "1"
    err = subprocess.run([sys.executable, "-c", BARS_SCRIPT, command_line.__file__], env=env, capture_output=True, text=True,
                         check=True).stderr
    assert bar_names(err) == (set() if switch else {"ours", "transformers'"})

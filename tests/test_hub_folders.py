"""Folders ready for the Hub: every folder eovseg or the Trainer saves runs in both pipelines with no class list (also
where `eovseg` cannot be imported, through the folder's own code), and has a model card with the Hub's metadata."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import Trainer, TrainingArguments, pipeline

import eovseg  # noqa: F401  (registers the Auto classes and the pipeline)
from eovseg import EovSegConfig, EovSegForPanopticSegmentation, EovSegProcessor
from eovseg.auto_registration import COPIED_CODE_MARKER
from eovseg.conversion_scripts.convert_original_checkpoint import main as convert_main
from eovseg.conversion_scripts.key_mapping import ours_to_original_key
from eovseg.configuration_eovseg import TINY_TRAIN_VOCABULARY, TINY_VOCABULARY
from eovseg.model_card import CARD_MARKER
from eovseg.training.train import main as train_main
from eovseg.vocabulary import display_name


_THREADS = torch.get_num_threads()


def setup_module():
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, much faster on a busy machine


def teardown_module():
    torch.set_num_threads(_THREADS)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.RandomState(0).randint(0, 255, (48, 64, 3), dtype=np.uint8))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def trainer_save_model(model, processor, folder):
    args = TrainingArguments(output_dir=str(folder.parent / "trainer-run"), report_to=[], use_cpu=True)
    Trainer(model=model, args=args, processing_class=processor).save_model(str(folder))


def run_both_pipelines(folder, image) -> dict[str, list[str]]:
    """Labels of each pipeline's semantic segmentation (every pixel gets a class) with no class list, and the
    transformers log lines written while the pipelines were built."""
    records = _Records()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(records)
    try:
        segmenters = {task: pipeline(task, model=str(folder))
                      for task in ("image-segmentation", "open-vocabulary-segmentation")}
    finally:
        transformers_logger.removeHandler(records)
    assert not [m for m in records.messages if "not supported" in m], records.messages
    return {task: [s["label"] for s in segmenter(image, subtask="semantic")] for task, segmenter in segmenters.items()}


def check_default_vocabulary(folder, vocabulary):
    """The folder's default vocabulary is `vocabulary`, with a matching id2label and the text embeddings the text
    tower gives it."""
    model = EovSegForPanopticSegmentation.from_pretrained(folder)
    processor = EovSegProcessor.from_pretrained(folder)
    assert model.config.vocabulary == vocabulary
    assert model.config.id2label == {i: display_name(name) for i, name in enumerate(vocabulary)}
    expected = model.get_text_embeddings(processor.encode_vocabulary(vocabulary)["input_ids"])
    assert expected.abs().sum() > 0
    torch.testing.assert_close(model.default_text_embeddings, expected, atol=1e-6, rtol=0)


def check_card(folder, **expected):
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-segmentation" and "eovseg" in data["tags"]
    assert CARD_MARKER in card.content
    for name, value in expected.items():
        assert f"| {name} | {value} |" in card.content, name
    return card


def test_trainer_save_model_folder_works_in_both_pipelines(tmp_path, image):
    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny")
    model = EovSegForPanopticSegmentation(config)  # a fresh model: no default-vocabulary embeddings computed yet
    folder = tmp_path / "saved"
    trainer_save_model(model, EovSegProcessor.from_config(config), folder)
    check_default_vocabulary(folder, TINY_VOCABULARY)
    names = {display_name(name) for name in TINY_VOCABULARY}
    labels = run_both_pipelines(folder, image)
    for task, found in labels.items():
        assert found and set(found) <= names, (task, found)
    # the two pipelines run the same model on the same vocabulary
    assert labels["image-segmentation"] == labels["open-vocabulary-segmentation"]
    check_card(folder)
    with open(folder / "config.json") as f:
        saved = json.load(f)
    assert saved["custom_pipelines"]["open-vocabulary-segmentation"]["impl"] == (
        "pipeline_eovseg.OpenVocabularySegmentationPipeline"
    )
    with open(folder / "processor_config.json") as f:
        assert json.load(f)["auto_map"]["AutoProcessor"] == "processing_eovseg.EovSegProcessor"


def test_model_without_a_vocabulary_saves_its_training_vocabulary(tmp_path, image):
    # A preset config without a default vocabulary has transformers' placeholder id2label (LABEL_0, LABEL_1).
    config = EovSegConfig.from_variant("tiny", vocabulary=None, is_thing=None)
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    model = EovSegForPanopticSegmentation(config)
    folder = tmp_path / "saved"
    trainer_save_model(model, EovSegProcessor.from_config(config), folder)
    check_default_vocabulary(folder, TINY_TRAIN_VOCABULARY)
    names = {display_name(name) for name in TINY_TRAIN_VOCABULARY}
    for task, found in run_both_pipelines(folder, image).items():
        assert found and set(found) <= names, (task, found)


def test_training_folder_works_in_both_pipelines_and_its_card_has_the_run(tmp_path, image):
    out = tmp_path / "run"
    train_main(["--model", "tiny", "--dataset", "synthetic", "--synthetic_image_size", "64",
                "--per_device_batch_size", "2", "--logging_steps", "1", "--no_progress", "--synthetic_train_images",
                "2", "--no_augmentation", "--max_steps", "1", "--save_steps", "0", "--eval_dataset", "synthetic",
                "--synthetic_eval_images", "1", "--output_dir", str(out)])
    with open(out / "config.json") as f:
        vocabulary = json.load(f)["vocabulary"]
    names = {display_name(name) for name in vocabulary}
    for task, found in run_both_pipelines(out, image).items():
        assert found and set(found) <= names, (task, found)
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    loss = next(r["loss"] for r in records if "loss" in r)
    pq = next(r["eval/PQ"] for r in records if "eval/PQ" in r)
    check_card(out, **{"training steps": 1, "final training loss (last logged interval)": f"{loss:.4g}",
                       "evaluation PQ": f"{pq:.4g}"})


def test_files_of_the_user_are_never_replaced(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "README.md").write_text("my notes\n")
    (folder / "inputs.py").write_text("MINE = 1\n")  # the name of a code file copied for trust_remote_code
    config = EovSegConfig.from_variant("tiny")
    with pytest.warns(UserWarning, match="left the files inputs.py alone"):
        trainer_save_model(EovSegForPanopticSegmentation(config), EovSegProcessor.from_config(config), folder)
    assert (folder / "README.md").read_text() == "my notes\n" and (folder / "inputs.py").read_text() == "MINE = 1\n"
    assert (folder / "modeling_eovseg.py").is_file()
    # a file eovseg copied (its first line says so) is written again by the next save
    (folder / "inputs.py").write_text(f"{COPIED_CODE_MARKER}\nSTALE = 1\n")
    EovSegForPanopticSegmentation(config).save_pretrained(folder)
    copied = (folder / "inputs.py").read_text()
    assert copied.startswith(COPIED_CODE_MARKER + "\n") and "def load_image" in copied and "STALE" not in copied
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("my run\n")
    train_main(["--model", "tiny", "--dataset", "synthetic", "--synthetic_image_size", "64",
                "--per_device_batch_size", "2", "--no_progress", "--synthetic_train_images", "2", "--no_augmentation",
                "--max_steps", "1", "--save_steps", "0", "--output_dir", str(out), "--overwrite_output_dir"])
    assert (out / "README.md").read_text() == "my run\n"


REMOTE_SCRIPT = textwrap.dedent("""
    import json, sys

    class BlockEovseg:  # eovseg cannot be imported in this process
        def find_spec(self, name, path=None, target=None):
            if name == "eovseg" or name.startswith("eovseg."):
                raise ImportError("eovseg is not installed here")

    sys.meta_path.insert(0, BlockEovseg())
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (48, 64, 3), dtype=np.uint8))
    segmenter = pipeline("open-vocabulary-segmentation", model=sys.argv[1], trust_remote_code=True)
    result = {
        "class": type(segmenter).__module__ + "." + type(segmenter).__name__,
        "default": sorted(s["label"] for s in segmenter(image, subtask="semantic")),
        "given": sorted(s["label"] for s in segmenter(image, candidate_labels=["car", "sky"], subtask="semantic")),
        "eovseg_imported": any(name.split(".")[0] == "eovseg" for name in sys.modules),
    }
    print(json.dumps(result))
""")


def test_open_vocabulary_pipeline_runs_from_the_folder_code_where_eovseg_cannot_be_imported(tmp_path, image):
    torch.manual_seed(0)
    config = EovSegConfig.from_variant("tiny")
    folder = tmp_path / "saved"
    trainer_save_model(EovSegForPanopticSegmentation(config), EovSegProcessor.from_config(config), folder)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ""}  # neither this worktree nor anything else on the path gives eovseg
    run = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(folder)], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["class"].startswith("transformers_modules.") and not result["eovseg_imported"]
    assert result["class"].endswith("pipeline_eovseg.OpenVocabularySegmentationPipeline")
    # the same labels as the installed package gives
    segmenter = pipeline("open-vocabulary-segmentation", model=str(folder))
    assert result["default"] == sorted(s["label"] for s in segmenter(image, subtask="semantic"))
    given = sorted(s["label"] for s in segmenter(image, candidate_labels=["car", "sky"], subtask="semantic"))
    assert result["given"] == given and set(given) <= {"car", "sky"}


def test_converted_folder_works_in_both_pipelines_and_keeps_the_users_readme(tmp_path, image):
    torch.manual_seed(0)
    source = EovSegForPanopticSegmentation(EovSegConfig.from_variant("tiny"))
    checkpoint = tmp_path / "model_final.pth"
    state = {ours_to_original_key(k): v for k, v in source.state_dict().items() if k != "default_text_embeddings"}
    torch.save({"model": state}, checkpoint)
    (tmp_path / "vocab.json").write_text(json.dumps({"classes": ["cup, mug", "table", "wall"],
                                                     "is_thing": [True, True, False]}))
    convert = ["--checkpoint_path", str(checkpoint), "--variant", "tiny", "--vocabulary", str(tmp_path / "vocab.json")]
    out = tmp_path / "converted"
    assert convert_main([*convert, "--output_dir", str(out)]) == 0
    for task, found in run_both_pipelines(out, image).items():
        assert found and set(found) <= {"cup", "table", "wall"}, (task, found)
    card = check_card(out)
    assert "Converted from the authors' checkpoint `model_final.pth`" in card.content
    # converting again into the folder replaces eovseg's card but never a README.md of the user's
    assert convert_main([*convert, "--output_dir", str(out), "--overwrite"]) == 0
    check_card(out)
    (out / "README.md").write_text("my notes\n")
    assert convert_main([*convert, "--output_dir", str(out), "--overwrite"]) == 0
    assert (out / "README.md").read_text() == "my notes\n"

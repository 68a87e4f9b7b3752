"""The text pass of a new vocabulary shows a progress bar in prompts (per second), silenced by transformers' switch;
a vocabulary already encoded (cached) runs no text pass and shows none."""

import pytest
import torch
from transformers.utils import logging as hf_logging

from eovseg import EovSegConfig, EovSegForPanopticSegmentation, EovSegProcessor, modeling_eovseg


@pytest.fixture
def tiny():
    config = EovSegConfig.from_variant("tiny")
    return EovSegForPanopticSegmentation(config).eval(), EovSegProcessor.from_config(config)


@pytest.fixture
def progress_bars(monkeypatch):
    monkeypatch.setattr(modeling_eovseg, "TEXT_PROGRESS_DELAY", 0)  # the tiny tower is done within the delay
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])  # float32 chunks, and distinct prompts in bfloat16
def test_a_new_vocabulary_shows_its_text_pass_in_prompts(tiny, progress_bars, capsys, dtype):
    model, processor = tiny
    ids = processor.encode_vocabulary(["car", "road, street", "sky"], return_tensors="pt")["input_ids"]
    prompts = ids.shape[0] if dtype is None else torch.unique(ids, dim=0).shape[0]
    model.get_text_embeddings(ids, dtype=dtype)
    err = capsys.readouterr().err
    assert "Encoding the vocabulary: 100%" in err and f"{prompts}/{prompts}" in err and "prompt/s" in err
    model.get_text_embeddings(ids, dtype=dtype)  # cached: no text pass
    assert "Encoding the vocabulary" not in capsys.readouterr().err


def test_transformers_switch_silences_it(tiny, progress_bars, capsys):
    model, processor = tiny
    hf_logging.disable_progress_bar()
    model.get_text_embeddings(processor.encode_vocabulary(["cup", "table"], return_tensors="pt")["input_ids"])
    assert "Encoding the vocabulary" not in capsys.readouterr().err

"""EovSegConfig refuses numeric fields out of their range with one line naming the field and the value."""

import json

import pytest

from eovseg import EovSegConfig
from eovseg.configuration_eovseg import PRESETS


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_queries", -1, "num_queries must be an integer of at least 1, got -1."),  # Mask2Former's name
        ("num_hidden_layers", 0, "num_hidden_layers must be an integer of at least 1, got 0."),
        ("geometric_ensemble_alpha", 3.0, "geometric_ensemble_alpha must be a number between 0 and 1, got 3.0."),
        ("geometric_ensemble_beta", -0.2, "geometric_ensemble_beta must be a number between 0 and 1, got -0.2."),
        ("overlap_threshold", 1.5, "overlap_threshold must be a number between 0 and 1, got 1.5."),
        ("hard_mask_threshold", "0.5", "hard_mask_threshold must be a number between 0 and 1, got '0.5'."),
        ("importance_sample_ratio", float("nan"), "importance_sample_ratio must be a number between 0 and 1"),
        ("dice_weight", -5.0, "dice_weight must be a number of at least 0, got -5.0."),
        ("oversample_ratio", 0.5, "oversample_ratio must be a number of at least 1, got 0.5."),
        ("ensemble_on_valid_mask", True, None),  # not a number: untouched
    ],
)
def test_out_of_range_numbers_are_refused(field, value, message):
    if message is None:
        assert getattr(EovSegConfig(**{field: value}), field) is value
        return
    with pytest.raises(ValueError) as caught:
        EovSegConfig(**{field: value})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_common_name_sets_the_field_and_config_json_is_checked(tmp_path):
    assert EovSegConfig(num_queries=7).num_proposals == 7
    assert EovSegConfig(geometric_ensemble_alpha=0, geometric_ensemble_beta=1).geometric_ensemble_beta == 1
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "eovseg", "num_queries": "many"}))
    with pytest.raises(ValueError, match=r"config\.json: num_queries must be an integer of at least 1, got 'many'"):
        EovSegConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("variant", sorted(PRESETS))
def test_every_preset_passes_the_checks(variant):
    assert EovSegConfig.from_variant(variant).num_proposals >= 1

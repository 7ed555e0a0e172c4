"""UniterConfig: presets, the original JSON files, validation."""

from __future__ import annotations

import json

import pytest

from uniter_fast import UniterConfig

# The original config/uniter-base.json, field for field.
ORIGINAL_BASE_JSON = {
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "type_vocab_size": 2,
    "vocab_size": 28996,
}


def test_reads_original_base_json_as_is(tmp_path) -> None:
    path = tmp_path / "uniter-base.json"
    path.write_text(json.dumps(ORIGINAL_BASE_JSON))
    assert UniterConfig.from_json_file(path) == UniterConfig.base()


def test_json_round_trip_and_presets(tmp_path) -> None:
    large = UniterConfig.large(hidden_dropout_prob=0.0)
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads, large.intermediate_size) == (
        1024,
        24,
        16,
        4096,
    )
    large.to_json_file(tmp_path / "c.json")
    assert UniterConfig.from_json_file(tmp_path / "c.json") == large
    assert UniterConfig.preset("tiny").num_hidden_layers == 2


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(hidden_size=100, num_attention_heads=12), "multiple of num_attention_heads"),
        (dict(hidden_act="relu"), "hidden_act"),
        (dict(attention_backend="flash9"), "attention_backend"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    ],
)
def test_bad_fields_raise(fields, match) -> None:
    with pytest.raises(ValueError, match=match):
        UniterConfig(**fields)


def test_unknown_preset_raises() -> None:
    with pytest.raises(ValueError, match=r"model config 'huge': expected a preset \['base', 'large', 'tiny'\] or a"):
        UniterConfig.preset("huge")

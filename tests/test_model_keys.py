"""State-dict keys, shapes and parameter counts against the original ``model/model.py`` for UNITER-base and -large."""

from __future__ import annotations

import pytest
import torch

from uniter_fast import Model, UniterConfig


def spec_keys(hidden: int, inter: int, layers: int, vocab: int = 28996) -> list[tuple[str, tuple[int, ...]]]:
    """The original's key list in state_dict order, written out independently of the model code."""
    h, i = hidden, inter
    keys = [
        ("embeddings.word_embeddings.weight", (vocab, h)),
        ("embeddings.position_embeddings.weight", (512, h)),
        ("embeddings.token_type_embeddings.weight", (2, h)),
        ("embeddings.LayerNorm.weight", (h,)),
        ("embeddings.LayerNorm.bias", (h,)),
        ("img_embeddings.img_linear.weight", (h, 2048)),
        ("img_embeddings.img_linear.bias", (h,)),
        ("img_embeddings.img_layer_norm.weight", (h,)),
        ("img_embeddings.img_layer_norm.bias", (h,)),
        ("img_embeddings.pos_layer_norm.weight", (h,)),
        ("img_embeddings.pos_layer_norm.bias", (h,)),
        ("img_embeddings.pos_linear.weight", (h, 7)),
        ("img_embeddings.pos_linear.bias", (h,)),
        ("img_embeddings.mask_embedding.weight", (2, 2048)),
        ("img_embeddings.LayerNorm.weight", (h,)),
        ("img_embeddings.LayerNorm.bias", (h,)),
    ]
    for k in range(layers):
        p = f"encoder.layer.{k}."
        for name in ("query", "key", "value"):
            keys += [(f"{p}attention.self.{name}.weight", (h, h)), (f"{p}attention.self.{name}.bias", (h,))]
        keys += [
            (f"{p}attention.output.dense.weight", (h, h)),
            (f"{p}attention.output.dense.bias", (h,)),
            (f"{p}attention.output.LayerNorm.weight", (h,)),
            (f"{p}attention.output.LayerNorm.bias", (h,)),
            (f"{p}intermediate.dense.weight", (i, h)),
            (f"{p}intermediate.dense.bias", (i,)),
            (f"{p}output.dense.weight", (h, i)),
            (f"{p}output.dense.bias", (h,)),
            (f"{p}output.LayerNorm.weight", (h,)),
            (f"{p}output.LayerNorm.bias", (h,)),
        ]
    keys += [("pooler.dense.weight", (h, h)), ("pooler.dense.bias", (h,))]
    return keys


PRESETS = {"base": (UniterConfig.base, 768, 3072, 12, 210), "large": (UniterConfig.large, 1024, 4096, 24, 402)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_state_dict_keys_and_shapes_match_spec(name: str) -> None:
    make, hidden, inter, layers, count = PRESETS[name]
    with torch.device("meta"):
        model = Model(make())
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == spec_keys(hidden, inter, layers)
    assert len(got) == count


def expected_params_without_word_embeddings(h: int, i: int, layers: int) -> int:
    """Parameter count from the architecture formulas, independently of the module code."""
    embeddings = 512 * h + 2 * h + 2 * h  # position, type, LayerNorm
    image = (2048 * h + h) + 2 * h + 2 * h + (7 * h + h) + 2 * 2048 + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    pooler = h * h + h
    return embeddings + image + layers * layer + pooler


@pytest.mark.parametrize("name,paper_millions", [("base", 86), ("large", 303)])
def test_parameter_count_against_paper(name: str, paper_millions: int) -> None:
    """Base: 87,629,824 and large: 306,003,968 parameters without word embeddings (paper: 86M / 303M; the paper's
    figures are rounded and leave out position embeddings and the image embedder's small parts, within 2%)."""
    make, hidden, inter, layers, _ = PRESETS[name]
    with torch.device("meta"):
        model = Model(make())
    count = sum(p.numel() for k, p in model.named_parameters() if k != "embeddings.word_embeddings.weight")
    assert count == expected_params_without_word_embeddings(hidden, inter, layers)
    assert abs(count / 1e6 - paper_millions) / paper_millions < 0.02


def test_init_follows_original_init_weights() -> None:
    model = Model(UniterConfig.tiny())
    linear = model.encoder.layer[0].intermediate.dense
    assert torch.all(linear.bias == 0)
    assert abs(float(linear.weight.std()) - 0.02) < 0.004
    assert torch.all(model.encoder.layer[0].output.LayerNorm.weight == 1)
    assert model.encoder.layer[0].output.LayerNorm.eps == 1e-12

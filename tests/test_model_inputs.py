"""Bad inputs to UniterModel.forward raise ValueError naming the argument and the expected vs given shape."""

from __future__ import annotations

import pytest
import torch
from model_batches import random_batch

from uniter_fast import Model, UniterConfig

TXT_LENS, NUM_BBS = [5, 8], [6, 3]


@pytest.fixture()
def model_and_batch():
    model = Model(UniterConfig.tiny()).eval()
    return model, random_batch(TXT_LENS, NUM_BBS, model.config.vocab_size)


def test_mismatched_batch_sizes(model_and_batch) -> None:
    model, batch = model_and_batch
    batch["img_feat"] = batch["img_feat"][:1]
    with pytest.raises(ValueError, match=r"batch sizes differ.*input_ids: 2.*img_feat: 1"):
        model(**batch)


def test_wrong_feature_dim(model_and_batch) -> None:
    model, batch = model_and_batch
    batch["img_feat"] = batch["img_feat"][..., :1024]
    with pytest.raises(ValueError, match=r"img_feat must have shape \[B, Nb, 2048\], got \(2, 6, 1024\)"):
        model(**batch)


def test_wrong_box_dim(model_and_batch) -> None:
    model, batch = model_and_batch
    batch["img_pos_feat"] = batch["img_pos_feat"][..., :6]  # the stored 6-d norm_bb without the w*h column
    with pytest.raises(ValueError, match=r"img_pos_feat must have shape \[B, Nb, 7\], got \(2, 6, 6\)"):
        model(**batch)


def test_gather_index_out_of_range(model_and_batch) -> None:
    model, batch = model_and_batch
    batch["gather_index"] = batch["gather_index"].clone()
    batch["gather_index"][1, 3] = 8 + 6  # Lt + Nb is one past the end
    with pytest.raises(ValueError, match=r"gather_index values must lie in \[0, Lt \+ Nb\) = \[0, 14\)"):
        model(**batch)


def test_nan_features(model_and_batch) -> None:
    model, batch = model_and_batch
    batch["img_feat"] = batch["img_feat"].clone()
    batch["img_feat"][1, 2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"img_feat holds NaN or inf values \(first at index \[1, 2, 7\]\)"):
        model(**batch)


def test_missing_gather_index_and_bad_ranks(model_and_batch) -> None:
    model, batch = model_and_batch
    with pytest.raises(ValueError, match="gather_index is required"):
        model(**{**batch, "gather_index": None})
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, Lt\], got \(16,\)"):
        model(**{**batch, "input_ids": batch["input_ids"].flatten()})
    with pytest.raises(ValueError, match="input_ids and img_feat are both None"):
        model(None, None, None, None, batch["attention_mask"])


def test_value_checks_can_be_switched_off_for_speed(model_and_batch) -> None:
    model, batch = model_and_batch
    batch["img_feat"] = batch["img_feat"].clone()
    batch["img_feat"][0, 0, 0] = float("nan")
    model.check_values = False
    out = model(**batch, output_all_encoded_layers=False)  # shape checks still run; value checks do not
    assert torch.isnan(out).any()

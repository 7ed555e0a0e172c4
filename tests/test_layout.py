"""The two batch layouts (uniter_fast.layout): the padded contract against the original collates' loops, the packed
contract against a per-example rebuild, pack_batch between them, and bad input."""

from __future__ import annotations

import pytest
import torch
from model_batches import LENGTHS, padded_batch

from uniter_fast.layout import (
    joint_layout,
    ot_split,
    pack_batch,
    packed_positions,
    padded_index,
    padded_slots,
    segment_arange,
    unpack_tokens,
)

RAGGED = [([3], [1]), ([7, 3, 12, 5], [4, 11, 2, 9]), ([2, 2], [1, 30]), ([40, 3, 9], [10, 36, 36])]


def _original_gather_index(txt_lens: list[int], num_bbs: list[int], max_len: int, out_size: int) -> torch.Tensor:
    """The original ``get_gather_index``: arange rows, then t_i .. t_i+n_i-1 -> Lt .. Lt+n_i-1, row by row."""
    index = torch.arange(out_size).unsqueeze(0).repeat(len(txt_lens), 1)
    for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
        index[i, t : t + n] = torch.arange(max_len, max_len + n)
    return index


def _original_ot_scatter(txt_lens: list[int], max_txt_len: int, joint_len: int) -> torch.Tensor:
    """The original ``_compute_ot_scatter``: text j -> j, the rest -> Lt + (j - t_i), row by row."""
    scatter = torch.arange(joint_len).unsqueeze(0).repeat(len(txt_lens), 1)
    for i, t in enumerate(txt_lens):
        scatter[i, t:] = torch.arange(max_txt_len, max_txt_len + joint_len - t)
    return scatter


def test_joint_layout_matches_spec_example() -> None:
    attn, gather = joint_layout(torch.tensor([3, 5]), torch.tensor([2, 1]))
    assert attn.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # Lt = 5: row 0's regions sit at positions 3, 4 and come from Lt + 0, Lt + 1; position 5 is junk (arange).
    assert gather.tolist() == [[0, 1, 2, 5, 6, 5], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("txt_lens,num_bbs", RAGGED)
def test_joint_layout_and_ot_split_match_original_loops(txt_lens: list[int], num_bbs: list[int]) -> None:
    lt, nb = max(txt_lens) + 2, max(num_bbs) + 1  # wider than needed, as a padded batch may be
    attn, gather = joint_layout(txt_lens, num_bbs, lt, nb)
    joint = max(t + n for t, n in zip(txt_lens, num_bbs))
    assert attn.dtype == gather.dtype == torch.int64 and attn.shape == (len(txt_lens), joint)
    assert attn.sum(1).tolist() == [t + n for t, n in zip(txt_lens, num_bbs)]
    assert torch.equal(gather, _original_gather_index(txt_lens, num_bbs, lt, joint))
    ot = ot_split(torch.tensor(txt_lens), torch.tensor(num_bbs), lt, nb, joint)
    expect = _original_ot_scatter(txt_lens, lt, joint)
    assert torch.equal(ot["ot_scatter"], expect) and ot["scatter_max"] == int(expect.max())
    assert isinstance(ot["scatter_max"], int)
    assert ot["txt_pad"].dtype == torch.bool and ot["txt_pad"].shape == (len(txt_lens), lt)
    assert ot["txt_pad"].sum(1).tolist() == [lt - t for t in txt_lens]
    assert ot["img_pad"].sum(1).tolist() == [nb - n for n in num_bbs]
    assert ot["txt_lens"].tolist() == txt_lens and ot["img_lens"].tolist() == num_bbs
    assert ot["txt_lens"].dtype == ot["img_lens"].dtype == torch.int64


def test_joint_layout_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="smaller than the longest row"):
        joint_layout([3, 5], [2, 1], max_txt_len=4)
    with pytest.raises(ValueError, match=r"num_bbs must be an integer tensor of shape \[2\]"):
        joint_layout([3, 5], [2, 1, 4])
    with pytest.raises(ValueError, match="txt_lens must be an integer tensor"):
        joint_layout(torch.tensor([3.0, 5.0]), [2, 1])


@pytest.mark.parametrize("txt_lens,num_bbs", LENGTHS + RAGGED)
def test_packed_positions_per_example(txt_lens: list[int], num_bbs: list[int]) -> None:
    pos = packed_positions(txt_lens, num_bbs)
    starts, txt_index, img_index = [0], [], []
    for t, n in zip(txt_lens, num_bbs):
        txt_index += range(starts[-1], starts[-1] + t)
        img_index += range(starts[-1] + t, starts[-1] + t + n)
        starts.append(starts[-1] + t + n)
    assert pos["cu_seqlens"].dtype == torch.int32 and pos["cu_seqlens"].tolist() == starts
    assert pos["max_seqlen"] == max(t + n for t, n in zip(txt_lens, num_bbs)) and isinstance(pos["max_seqlen"], int)
    assert pos["cls_index"].tolist() == starts[:-1]
    assert pos["txt_index"].tolist() == txt_index and pos["img_index"].tolist() == img_index
    assert sorted(txt_index + img_index) == list(range(starts[-1]))  # every packed slot exactly once


def test_segment_arange_and_padded_slots() -> None:
    lengths = torch.tensor([2, 0, 3, 1])
    assert segment_arange(lengths, torch.tensor([10, 99, 20, 5])).tolist() == [10, 11, 20, 21, 22, 5]
    assert padded_slots(lengths, 4).tolist() == [0, 1, 8, 9, 10, 12]
    assert segment_arange(torch.tensor([0, 0]), torch.tensor([3, 4])).tolist() == []


@pytest.mark.parametrize("txt_lens,num_bbs", RAGGED)
def test_padded_index_views_the_packed_rows_as_the_padded_sequence(txt_lens: list[int], num_bbs: list[int]) -> None:
    """A packed output gathered by padded_index(cu_seqlens) is the padded joint sequence at every valid position,
    and its pad mask is attn_masks == 0."""
    attn_masks, _ = joint_layout(txt_lens, num_bbs)
    positions = packed_positions(txt_lens, num_bbs)
    bounds = positions["cu_seqlens"].long()
    index, pad = padded_index(bounds[:-1], bounds[1:] - bounds[:-1])
    assert torch.equal(pad, attn_masks == 0) and index.dtype == torch.int64
    packed = torch.randn(int(bounds[-1]), 3)
    padded = packed.new_zeros(*attn_masks.shape, 3).index_put(attn_masks.bool().nonzero(as_tuple=True), packed)
    assert torch.equal(packed[index][~pad], padded[~pad]) and not index[pad].any()
    wide_index, wide_pad = padded_index(bounds[:-1], bounds[1:] - bounds[:-1], attn_masks.size(1) + 4)
    assert torch.equal(wide_index[:, : index.size(1)], index) and wide_pad[:, index.size(1) :].all()


# --------------------------------------------------------------------------------------------------- pack_batch
@pytest.mark.parametrize("txt_lens,num_bbs", LENGTHS)
def test_pack_batch_layout(txt_lens: list[int], num_bbs: list[int]) -> None:
    batch = padded_batch(txt_lens, num_bbs, vocab=1000)
    packed = pack_batch(batch)
    starts = [0]
    for t, n in zip(txt_lens, num_bbs):
        starts.append(starts[-1] + t + n)
    assert packed["cu_seqlens"].dtype == torch.int32 and packed["cu_seqlens"].tolist() == starts
    assert packed["max_seqlen"] == max(t + n for t, n in zip(txt_lens, num_bbs))
    assert packed["cls_index"].tolist() == starts[:-1]
    # Scatter text and regions into a [T] slot table and compare with the padded rows, example by example.
    total = starts[-1]
    token_of = torch.full((total,), -1)
    token_of[packed["txt_index"]] = packed["txt_ids"]
    region_of = torch.full((total, 2048), float("nan"))
    region_of[packed["img_index"]] = packed["img_feat"]
    box_of = torch.full((total, 7), float("nan"))
    box_of[packed["img_index"]] = packed["img_pos_feat"]
    for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
        s = starts[i]
        assert token_of[s : s + t].tolist() == batch["input_ids"][i, :t].tolist()
        torch.testing.assert_close(region_of[s + t : s + t + n], batch["img_feat"][i, :n], rtol=0, atol=0)
        torch.testing.assert_close(box_of[s + t : s + t + n], batch["img_pos_feat"][i, :n], rtol=0, atol=0)
    assert packed["txt_position_ids"].tolist() == [j for t in txt_lens for j in range(t)]
    # MLM: packed positions of masked tokens, labels in txt_labels != -1 row-major order.
    labels = batch["txt_labels"]
    assert packed["mlm_labels"].tolist() == labels[labels != -1].tolist()
    assert token_of[packed["mlm_index"]].tolist() == batch["input_ids"][labels != -1].tolist()
    # MRM: packed positions in the order of img_mask_tgt flattened row-major (the order of feat_targets).
    rows, cols = batch["img_mask_tgt"].nonzero(as_tuple=True)
    assert packed["mrm_index"].tolist() == [starts[r] + c for r, c in zip(rows.tolist(), cols.tolist())]
    expected_masks = [bool(batch["img_masks"][i, j]) for i, n in enumerate(num_bbs) for j in range(n)]
    assert packed["img_masks"].tolist() == expected_masks
    # unpack_tokens splits a packed tensor back into the examples
    pieces = unpack_tokens(packed, token_of)
    assert [p.numel() for p in pieces] == [t + n for t, n in zip(txt_lens, num_bbs)]


def test_pack_batch_type_ids() -> None:
    """NLVR2 / VCR type ids follow their tokens / regions into the packed layout; padding is dropped."""
    batch = padded_batch([3, 5], [4, 2], vocab=100)
    gen = torch.Generator().manual_seed(3)
    batch["txt_type_ids"] = torch.randint(0, 4, batch["input_ids"].shape, generator=gen)
    batch["img_type_ids"] = torch.randint(1, 3, batch["img_feat"].shape[:2], generator=gen)
    packed = pack_batch(batch)
    assert packed["txt_type_ids"].tolist() == batch["txt_type_ids"][0, :3].tolist() + batch["txt_type_ids"][1].tolist()
    assert packed["img_type_ids"].tolist() == batch["img_type_ids"][0].tolist() + batch["img_type_ids"][1, :2].tolist()
    assert "txt_type_ids" not in pack_batch({k: v for k, v in batch.items() if not k.endswith("type_ids")})


def test_pack_batch_ignores_padding_labels_and_masks() -> None:
    """Labels / masks set on padded slots (a sloppy batch) are not packed: only valid slots are read."""
    batch = padded_batch([4, 2], [3, 1], vocab=50)
    batch["txt_labels"][1, 3] = 7  # padded text slot of row 1
    batch["img_masks"][1, 2] = True  # padded region slot of row 1
    packed = pack_batch(batch)
    assert packed["mlm_labels"].numel() == int((batch["txt_labels"][:, :4] != -1).sum()) - 1
    assert packed["img_masks"].numel() == 4 and packed["mrm_index"].numel() == int(batch["img_masks"].sum()) - 1


def test_pack_batch_rejects_bad_input() -> None:
    batch = padded_batch([4, 6], [3, 5], vocab=50)
    with pytest.raises(ValueError, match="missing 'txt_lens'"):
        pack_batch({k: v for k, v in batch.items() if k != "txt_lens"})
    with pytest.raises(ValueError, match="num_bbs must be an integer tensor of shape \\[2\\]"):
        pack_batch({**batch, "num_bbs": torch.tensor([3, 5, 1])})
    with pytest.raises(ValueError, match="txt_lens must lie in"):
        pack_batch({**batch, "txt_lens": torch.tensor([4, 7])})
    with pytest.raises(ValueError, match="input_ids must be"):
        pack_batch({**batch, "img_feat": batch["img_feat"][:1]})

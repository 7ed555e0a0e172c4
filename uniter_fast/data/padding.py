"""The original padded batch layout (uniter.md §1.4, §3.3): pad_sequence, gather_index, attn_masks."""

from __future__ import annotations

import torch


def pad_1d(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad 1-d tensors to [B, max len] with ``value`` (same dtype)."""
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


def pad_2d(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Zero-pad [n_i, D] tensors to [B, max n_i, D]."""
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=0.0)


def joint_masks(txt_lens: torch.Tensor, num_bbs: torch.Tensor) -> torch.Tensor:
    """attn_masks int64 [B, L], L = max(t_i + n_i): 1 on the first t_i + n_i positions of row i."""
    total = txt_lens + num_bbs
    return (torch.arange(int(total.max()))[None, :] < total[:, None]).long()


def gather_index(txt_lens: torch.Tensor, num_bbs: torch.Tensor, max_txt: int, joint_len: int) -> torch.Tensor:
    """int64 [B, L]: arange(L) per row, with positions t_i..t_i+n_i-1 set to Lt..Lt+n_i-1 (regions after text)."""
    batch = txt_lens.size(0)
    index = torch.arange(joint_len).repeat(batch, 1)
    valid = torch.arange(int(num_bbs.max()))[None, :] < num_bbs[:, None]
    rows, cols = valid.nonzero(as_tuple=True)
    index[rows, txt_lens[rows] + cols] = max_txt + cols
    return index


def ot_inputs(txt_lens: torch.Tensor, num_bbs: torch.Tensor, max_txt: int, max_bb: int, joint_len: int) -> dict:
    """The OT split of the joint output (``itm_ot_collate``): ot_scatter int64 [B, L] (j if j < t_i else
    Lt + j - t_i), scatter_max (int), txt_pad bool [B, Lt], img_pad bool [B, Nb]."""
    pos = torch.arange(joint_len)[None, :]
    scatter = torch.where(pos < txt_lens[:, None], pos, max_txt + pos - txt_lens[:, None])
    return {
        "ot_scatter": scatter,
        "scatter_max": int(scatter.max()),
        "txt_pad": torch.arange(max_txt)[None, :] >= txt_lens[:, None],
        "img_pad": torch.arange(max_bb)[None, :] >= num_bbs[:, None],
    }

"""The original padded joint layout (spec §1.4): ``attn_masks`` and ``gather_index`` from per-row lengths."""

from __future__ import annotations

from typing import Optional

import torch


def joint_layout(
    txt_lens: torch.Tensor,
    num_bbs: torch.Tensor,
    max_txt_len: Optional[int] = None,
    max_bbs: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and gather index of the original collates.

    Args:
        txt_lens: [B] int, text length t_i of each row including [CLS] and [SEP].
        num_bbs: [B] int, number of regions n_i of each row.
        max_txt_len: Lt, the padded text length (default max t_i).
        max_bbs: Nb, the padded region count (default max n_i).

    Returns:
        attn_masks [B, L] int64 (1 for the first t_i + n_i positions) and gather_index [B, L] int64 (arange, with
        positions t_i .. t_i+n_i-1 pointing at Lt .. Lt+n_i-1), where L = max(t_i + n_i).
    """
    txt_lens = torch.as_tensor(txt_lens, dtype=torch.long)
    num_bbs = torch.as_tensor(num_bbs, dtype=torch.long)
    if txt_lens.shape != num_bbs.shape or txt_lens.dim() != 1:
        raise ValueError(
            f"txt_lens and num_bbs must both have shape [B], got {tuple(txt_lens.shape)} and {tuple(num_bbs.shape)}"
        )
    lt = int(txt_lens.max()) if max_txt_len is None else max_txt_len
    nb = int(num_bbs.max()) if max_bbs is None else max_bbs
    if nb < int(num_bbs.max()) or lt < int(txt_lens.max()):
        raise ValueError(
            f"max_txt_len={lt} / max_bbs={nb} are smaller than the longest row "
            f"(t={int(txt_lens.max())}, n={int(num_bbs.max())})"
        )
    total = txt_lens + num_bbs
    length = int(total.max())
    positions = torch.arange(length).expand(len(txt_lens), length)
    attn_masks = (positions < total[:, None]).long()
    is_img = (positions >= txt_lens[:, None]) & (positions < total[:, None])
    gather_index = torch.where(is_img, positions - txt_lens[:, None] + lt, positions)
    return attn_masks, gather_index

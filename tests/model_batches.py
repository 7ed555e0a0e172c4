"""Random UNITER inputs in the original padded layout, for the model tests."""

from __future__ import annotations

import torch

from uniter_fast.model.layout import joint_layout


def random_batch(
    txt_lens: list[int], num_bbs: list[int], vocab_size: int, img_dim: int = 2048, generator_seed: int = 0
) -> dict[str, torch.Tensor]:
    """A padded batch with random ids ([CLS]=101-free, pads 0), features, boxes, and the joint layout tensors."""
    gen = torch.Generator().manual_seed(generator_seed)
    batch, lt, nb = len(txt_lens), max(txt_lens), max(num_bbs)
    input_ids = torch.zeros(batch, lt, dtype=torch.long)
    img_feat = torch.zeros(batch, nb, img_dim)
    img_pos_feat = torch.zeros(batch, nb, 7)
    for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
        input_ids[i, :t] = torch.randint(1, vocab_size, (t,), generator=gen)
        img_feat[i, :n] = torch.randn(n, img_dim, generator=gen).relu()
        corners = torch.rand(n, 4, generator=gen).sort(dim=1).values[:, [0, 2, 1, 3]]
        wh = corners[:, 2:] - corners[:, :2]
        img_pos_feat[i, :n] = torch.cat([corners, wh, wh[:, :1] * wh[:, 1:]], dim=1)
    attn_masks, gather_index = joint_layout(torch.tensor(txt_lens), torch.tensor(num_bbs))
    return dict(
        input_ids=input_ids,
        position_ids=torch.arange(lt)[None],
        img_feat=img_feat,
        img_pos_feat=img_pos_feat,
        attention_mask=attn_masks,
        gather_index=gather_index,
    )


def select_row(batch: dict[str, torch.Tensor], i: int, txt_len: int, num_bb: int) -> dict[str, torch.Tensor]:
    """Example i of ``batch`` alone, cut to its own lengths (no padding)."""
    attn_masks, gather_index = joint_layout(torch.tensor([txt_len]), torch.tensor([num_bb]))
    return dict(
        input_ids=batch["input_ids"][i : i + 1, :txt_len],
        position_ids=torch.arange(txt_len)[None],
        img_feat=batch["img_feat"][i : i + 1, :num_bb],
        img_pos_feat=batch["img_pos_feat"][i : i + 1, :num_bb],
        attention_mask=attn_masks,
        gather_index=gather_index,
    )

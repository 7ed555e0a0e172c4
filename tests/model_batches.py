"""Random UNITER inputs in the original padded layout, for the model and layout tests."""

from __future__ import annotations

from typing import Any

import torch

from uniter_fast.layout import joint_layout


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


LENGTHS = [  # (txt_lens, num_bbs) of the layout and packed-encoder tests
    ([12], [37]),  # single example
    ([10, 60, 23, 41], [100, 10, 57, 12]),  # ragged, with a maximal-length row (60 text + 100 regions)
    ([60, 60, 60], [100, 100, 100]),  # every row maximal: no padding at all
    ([5, 3], [0, 4]),  # a text-only row inside an image-text batch
]


def padded_batch(txt_lens: list[int], num_bbs: list[int], vocab: int, img_dim: int = 2048) -> dict[str, Any]:
    """A contract-1 padded batch with random ids/features, MLM labels and MRM masks (features of masked regions
    zeroed as the collates do)."""
    t, n = torch.tensor(txt_lens), torch.tensor(num_bbs)
    size, max_txt, max_img = len(txt_lens), int(t.max()), int(n.max())
    txt_valid = torch.arange(max_txt)[None] < t[:, None]
    img_valid = torch.arange(max_img)[None] < n[:, None]
    input_ids = torch.randint(1, vocab, (size, max_txt)) * txt_valid
    chosen = txt_valid & (torch.rand(size, max_txt) < 0.3)
    txt_labels = torch.where(chosen, torch.randint(1, vocab, (size, max_txt)), -1)
    img_masks = img_valid & (torch.rand(size, max_img) < 0.3)
    img_feat = torch.randn(size, max_img, img_dim) * (img_valid & ~img_masks)[..., None]
    img_pos_feat = torch.rand(size, max_img, 7) * img_valid[..., None]
    attn_masks, gather_index = joint_layout(t, n)
    img_mask_tgt = torch.zeros_like(attn_masks, dtype=torch.bool)
    for i in range(size):
        img_mask_tgt[i, txt_lens[i] : txt_lens[i] + num_bbs[i]] = img_masks[i, : num_bbs[i]]
    return dict(
        input_ids=input_ids,
        position_ids=torch.arange(max_txt)[None],
        img_feat=img_feat,
        img_pos_feat=img_pos_feat,
        attn_masks=attn_masks,
        gather_index=gather_index,
        txt_lens=t,
        num_bbs=n,
        txt_labels=txt_labels,
        img_masks=img_masks,
        img_mask_tgt=img_mask_tgt,
    )

"""Hand-made pretraining batches in the shared layout (padded keys + ``packed``), for the pretraining tests.

Built from the contract of the data package, independently of its collates, so the model is tested on its own.
"""

from __future__ import annotations

import torch

from uniter_fast.layout import joint_layout

MASK_ID = 3


def _ot_scatter(txt_lens: torch.Tensor, max_txt_len: int, joint_len: int) -> torch.Tensor:
    """The original ``_compute_ot_scatter``: text j -> j, the rest -> Lt + (j - t_i)."""
    scatter = torch.arange(joint_len).repeat(len(txt_lens), 1)
    for i, t in enumerate(txt_lens.tolist()):
        scatter[i, t:] = torch.arange(max_txt_len, max_txt_len + joint_len - t)
    return scatter


def _packed(batch: dict, task: str) -> dict:
    """The packed layout (contract 2) of a padded batch."""
    txt_lens, num_bbs = batch["txt_lens"], batch["num_bbs"]
    lt, nb = batch["input_ids"].size(1), batch["img_feat"].size(1)
    txt_valid = torch.arange(lt)[None] < txt_lens[:, None]
    img_valid = torch.arange(nb)[None] < num_bbs[:, None]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (txt_lens + num_bbs).cumsum(0)])
    txt_index = (starts[:-1, None] + torch.arange(lt)[None])[txt_valid]
    img_index = (starts[:-1, None] + txt_lens[:, None] + torch.arange(nb)[None])[img_valid]
    packed = {
        "txt_ids": batch["input_ids"][txt_valid],
        "txt_position_ids": torch.arange(lt).expand(len(txt_lens), lt)[txt_valid],
        "img_feat": batch["img_feat"][img_valid],
        "img_pos_feat": batch["img_pos_feat"][img_valid],
        "txt_index": txt_index,
        "img_index": img_index,
        "cu_seqlens": starts.to(torch.int32),
        "max_seqlen": int((txt_lens + num_bbs).max()),
        "cls_index": starts[:-1],
    }
    if task == "mlm":
        labels = batch["txt_labels"]
        masked = (labels != -1) & txt_valid
        packed["mlm_index"] = (starts[:-1, None] + torch.arange(lt)[None])[masked]
        packed["mlm_labels"] = labels[masked]
    if task in ("mrfr", "mrc", "mrckl"):
        packed["img_masks"] = batch["img_masks"][img_valid]
        packed["mrm_index"] = (starts[:-1, None] + txt_lens[:, None] + torch.arange(nb)[None])[batch["img_masks"]]
    if task == "itm":  # the padded [B, Lt] / [B, Nb] slot of every packed text token / region
        packed["txt_slot"] = (torch.arange(len(txt_lens))[:, None] * lt + torch.arange(lt)[None])[txt_valid]
        packed["img_slot"] = (torch.arange(len(txt_lens))[:, None] * nb + torch.arange(nb)[None])[img_valid]
    return packed


def task_batch(
    task: str,
    txt_lens: list[int],
    num_bbs: list[int],
    vocab_size: int,
    img_dim: int = 2048,
    label_dim: int = 1601,
    seed: int = 0,
) -> dict:
    """A collated batch for ``task`` with random ids/features, ragged lengths and the task's targets."""
    gen = torch.Generator().manual_seed(seed)
    txt = torch.tensor(txt_lens)
    nbb = torch.tensor(num_bbs)
    b, lt, nb = len(txt_lens), max(txt_lens), max(num_bbs)
    input_ids = torch.zeros(b, lt, dtype=torch.long)
    img_feat = torch.zeros(b, nb, img_dim)
    img_pos_feat = torch.zeros(b, nb, 7)
    soft = torch.zeros(b, nb, label_dim)
    for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
        input_ids[i, :t] = torch.randint(5, vocab_size, (t,), generator=gen)
        img_feat[i, :n] = torch.randn(n, img_dim, generator=gen).relu()
        corners = torch.rand(n, 4, generator=gen).sort(dim=1).values[:, [0, 2, 1, 3]]
        wh = corners[:, 2:] - corners[:, :2]
        img_pos_feat[i, :n] = torch.cat([corners, wh, wh[:, :1] * wh[:, 1:]], dim=1)
        soft[i, :n] = torch.softmax(3 * torch.randn(n, label_dim, generator=gen), dim=-1)
    attn_masks, gather_index = joint_layout(txt, nbb)
    batch = {
        "task": task,
        "input_ids": input_ids,
        "position_ids": torch.arange(lt)[None],
        "img_feat": img_feat,
        "img_pos_feat": img_pos_feat,
        "attn_masks": attn_masks,
        "gather_index": gather_index,
        "txt_lens": txt,
        "num_bbs": nbb,
    }
    if task == "mlm":
        labels = torch.full((b, lt), -1, dtype=torch.long)
        for i, t in enumerate(txt_lens):
            chosen = torch.rand(t - 2, generator=gen) < 0.4
            chosen[0] = chosen[0] | ~chosen.any()
            pos = torch.nonzero(chosen).squeeze(1) + 1
            labels[i, pos] = input_ids[i, pos]
            input_ids[i, pos] = MASK_ID
        batch["txt_labels"] = labels
    elif task in ("mrfr", "mrc", "mrckl"):
        img_masks = torch.zeros(b, nb, dtype=torch.bool)
        img_mask_tgt = torch.zeros_like(attn_masks, dtype=torch.bool)
        for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
            chosen = torch.rand(n, generator=gen) < 0.3
            chosen[int(torch.randint(n, (1,), generator=gen))] = True
            img_masks[i, :n] = chosen
            img_mask_tgt[i, t : t + n] = chosen
        batch["feat_targets"] = img_feat[img_masks].clone()
        batch["label_targets"] = soft[img_masks]
        img_feat[img_masks] = 0
        batch["img_masks"] = img_masks
        batch["img_mask_tgt"] = img_mask_tgt
    elif task == "itm":
        targets = torch.arange(b) % 2
        batch["targets"] = targets[torch.randperm(b, generator=gen)]
        scatter = _ot_scatter(txt, lt, attn_masks.size(1))
        batch["ot_inputs"] = {
            "ot_scatter": scatter,
            "scatter_max": int(scatter.max()),
            "txt_pad": torch.arange(lt)[None] >= txt[:, None],
            "img_pad": torch.arange(nb)[None] >= nbb[:, None],
            "txt_lens": txt.clone(),
            "img_lens": nbb.clone(),
        }
    batch["packed"] = _packed(batch, task)
    return batch

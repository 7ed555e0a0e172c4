"""The original UNITER loader's read -> mask -> collate, reproduced for the reference column of bench/data_bench.py.

Reproduces what the original ``data/data.py``, ``mlm.py``, ``mrm.py`` and ``itm.py`` (ChenRocks/UNITER)
do per pair and per batch, on this project's databases (same format): LMDB read with ``buffers=True``; the text
record lz4-decompressed and msgpack-decoded; the image record msgpack(-numpy)-decoded in full; features and boxes
turned into tensors with ``torch.tensor(...).float()`` (MLM, MRFR, ITM), or, for MRC, every field converted with
numpy ``astype(float32)`` first (``get_dump``); masks drawn token by token / region by region with Python's
``random``; the collates built with ``pad_sequence``, a zero tensor filled row by row (``pad_tensors``) and
per-row loops for ``gather_index`` and the OT inputs. Written from that description, not copied.
"""

from __future__ import annotations

import random
from typing import Any

import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence


class OriginalLoader:
    """Builds one batch of ``task`` ("mlm", "mrfr", "mrckl", "itm") from dataset indices the way the original does.

    ``dataset`` is this project's task dataset (for ids, image names, nbb and ITM negatives of the epoch).
    """

    def __init__(self, task: str, dataset: Any, mask_prob: float = 0.15) -> None:
        self.task, self.dataset, self.mask_prob = task, dataset, mask_prob
        txt, img = dataset.txt_db, dataset.img_db
        self.txt_get, self.img_get = txt.db.view, img.db.view  # LMDB get on a buffers=True transaction, as the original
        self.cls_, self.sep, self.mask, self.v_range = txt.cls_, txt.sep, txt.mask, txt.v_range
        self.name2nbb = img.name2nbb

    # ------------------------------------------------------------------ reading (data/data.py)
    def _text(self, index: int) -> dict:
        return msgpack.loads(lz4.frame.decompress(self.txt_get(self.dataset.ids[index])), raw=False)

    def _image_record(self, fname: str) -> dict:
        return msgpack.loads(self.img_get(fname), object_hook=msgpack_numpy.decode, raw=False)

    def _img_feat(self, fname: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        dump, nbb = self._image_record(fname), self.name2nbb[fname]
        feat = torch.tensor(dump["features"][:nbb, :]).float()
        box = torch.tensor(dump["norm_bb"][:nbb, :]).float()
        return feat, torch.cat([box, box[:, 4:5] * box[:, 5:]], dim=-1), feat.size(0)

    def _img_feat_with_soft_labels(self, fname: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        dump = self._image_record(fname)
        dump = {k: a.astype(np.float32) if a.dtype == np.float16 else a for k, a in dump.items()}  # _fp16_to_fp32
        nbb = self.name2nbb[fname]
        dump = {k: a[:nbb, ...] for k, a in dump.items()}
        box = torch.tensor(dump["norm_bb"])
        box = torch.cat([box, box[:, 4:5] * box[:, 5:]], dim=-1)
        return torch.tensor(dump["features"]), box, torch.tensor(dump["soft_labels"]), nbb

    def _combine(self, wordpieces: list[int]) -> torch.Tensor:
        return torch.tensor([self.cls_, *wordpieces, self.sep])

    # ------------------------------------------------------------------ masking (data/mlm.py, data/mrm.py)
    def _random_word(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        labels = []
        for i, token in enumerate(tokens):
            prob = random.random()
            if prob < 0.15:
                prob /= 0.15
                if prob < 0.8:
                    tokens[i] = self.mask
                elif prob < 0.9:
                    tokens[i] = random.choice(list(range(*self.v_range)))
                labels.append(token)
            else:
                labels.append(-1)
        if all(label == -1 for label in labels):
            labels[0] = tokens[0]
            tokens[0] = self.mask
        return tokens, labels

    def _img_mask(self, num_bb: int) -> torch.Tensor:
        mask = [random.random() < self.mask_prob for _ in range(num_bb)]
        if not any(mask):
            mask[random.choice(range(num_bb))] = True
        return torch.tensor(mask)

    # ------------------------------------------------------------------ items
    def item(self, index: int) -> tuple:
        """One example as the original ``__getitem__`` returns it."""
        example = self._text(index)
        if self.task == "mlm":
            tokens, labels = self._random_word(list(example["input_ids"]))
            input_ids, txt_labels = self._combine(tokens), torch.tensor([-1, *labels, -1])
            feat, box, num_bb = self._img_feat(example["img_fname"])
            return input_ids, feat, box, torch.ones(len(input_ids) + num_bb, dtype=torch.long), txt_labels
        input_ids = self._combine(example["input_ids"])
        if self.task == "itm":
            fname = self.dataset.image_of(index)  # this epoch's (possibly negative) image
            feat, box, num_bb = self._img_feat(fname)
            target = torch.Tensor(1).long().fill_(self.dataset.target_of(index))
            return input_ids, feat, box, torch.ones(len(input_ids) + num_bb, dtype=torch.long), target
        if self.task == "mrfr":
            feat, box, num_bb = self._img_feat(example["img_fname"])
            soft = None
        else:
            feat, box, soft, num_bb = self._img_feat_with_soft_labels(example["img_fname"])
        img_mask = self._img_mask(num_bb)
        img_mask_tgt = torch.cat([torch.zeros(len(input_ids), dtype=torch.uint8), img_mask], dim=0)
        attn = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
        return input_ids, feat, box, soft, attn, img_mask, img_mask_tgt

    # ------------------------------------------------------------------ collates
    @staticmethod
    def _pad_tensors(tensors: list[torch.Tensor], lens: list[int]) -> torch.Tensor:
        out = torch.zeros(len(tensors), max(lens), tensors[0].size(-1), dtype=tensors[0].dtype)
        for i, (t, n) in enumerate(zip(tensors, lens)):
            out.data[i, :n, ...] = t.data
        return out

    @staticmethod
    def _gather_index(txt_lens: list[int], num_bbs: list[int], max_len: int, out_size: int) -> torch.Tensor:
        index = torch.arange(0, out_size, dtype=torch.long).unsqueeze(0).repeat(len(txt_lens), 1)
        for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
            index.data[i, t : t + n] = torch.arange(max_len, max_len + n, dtype=torch.long).data
        return index

    def _common(self, input_ids: list, feats: list, boxes: list, attn: list) -> dict[str, Any]:
        txt_lens, num_bbs = [i.size(0) for i in input_ids], [f.size(0) for f in feats]
        padded_ids = pad_sequence(input_ids, batch_first=True, padding_value=0)
        attn_masks = pad_sequence(attn, batch_first=True, padding_value=0)
        return {
            "input_ids": padded_ids,
            "position_ids": torch.arange(0, padded_ids.size(1), dtype=torch.long).unsqueeze(0),
            "img_feat": self._pad_tensors(feats, num_bbs),
            "img_pos_feat": self._pad_tensors(boxes, num_bbs),
            "attn_masks": attn_masks,
            "gather_index": self._gather_index(txt_lens, num_bbs, padded_ids.size(1), attn_masks.size(1)),
            "_lens": (txt_lens, num_bbs),
        }

    def collate(self, items: list[tuple]) -> dict[str, Any]:
        """The original collate of the task (``itm_ot_collate`` for ITM)."""
        if self.task == "mlm":
            ids, feats, boxes, attn, labels = map(list, zip(*items))
            batch = self._common(ids, feats, boxes, attn)
            batch["txt_labels"] = pad_sequence(labels, batch_first=True, padding_value=-1)
        elif self.task == "itm":
            ids, feats, boxes, attn, targets = map(list, zip(*items))
            batch = self._common(ids, feats, boxes, attn)
            batch["targets"] = torch.cat(targets, dim=0)
            txt_lens, num_bbs = batch["_lens"]
            max_tl, max_nbb, joint = max(txt_lens), max(num_bbs), batch["attn_masks"].size(1)
            scatter = torch.arange(0, joint, dtype=torch.long).unsqueeze(0).repeat(len(txt_lens), 1)
            for i, t in enumerate(txt_lens):
                scatter.data[i, t:] = torch.arange(max_tl, max_tl + joint - t, dtype=torch.long).data
            txt_pad = torch.zeros(len(txt_lens), max_tl, dtype=torch.uint8)
            for i, t in enumerate(txt_lens):
                txt_pad.data[i, t:].fill_(1)
            img_pad = torch.zeros(len(num_bbs), max_nbb, dtype=torch.uint8)
            for i, n in enumerate(num_bbs):
                img_pad.data[i, n:].fill_(1)
            batch["ot_inputs"] = {
                "ot_scatter": scatter,
                "scatter_max": scatter.max().item(),
                "txt_pad": txt_pad,
                "img_pad": img_pad,
            }
        else:
            ids, feats, boxes, soft, attn, masks, mask_tgts = map(list, zip(*items))
            batch = self._common(ids, feats, boxes, attn)
            img_masks = pad_sequence(masks, batch_first=True, padding_value=0)
            feat = batch["img_feat"]
            expanded = img_masks.unsqueeze(-1).expand_as(feat)
            if self.task == "mrfr":
                batch["feat_targets"] = feat[expanded].contiguous().view(-1, feat.size(-1))
            else:
                soft_labels = self._pad_tensors(soft, batch["_lens"][1])
                expanded_soft = img_masks.unsqueeze(-1).expand_as(soft_labels)
                batch["label_targets"] = soft_labels[expanded_soft].contiguous().view(-1, soft_labels.size(-1))
            batch["img_feat"] = feat.data.masked_fill(expanded, 0)
            batch["img_masks"] = img_masks
            batch["img_mask_tgt"] = pad_sequence(mask_tgts, batch_first=True, padding_value=0)
        del batch["_lens"]
        return batch

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """read -> mask -> collate of ``indices``."""
        return self.collate([self.item(i) for i in indices])

"""Fixed-shape packed batches: a fast-path batch padded up to a few bucket sizes, so a captured step (a CUDA graph,
``uniter_fast.training.capture``) sees the same shapes again and again.

A packed batch (contract 2 of :mod:`uniter_fast.layout`) has shapes that change with every batch: St text tokens,
Sn regions, B examples (``cu_seqlens`` [B+1]), ``max_seqlen``, M masked rows. :func:`pad_batch` rounds each of them
up (:class:`Buckets`) and places the padding where it cannot change a real row:

- **tokens**: St and Sn are rounded up to a multiple of ``token_multiple``; the extra text tokens ([PAD], position
  0) and zero regions sit after the last example, in trailing dummy sequences of at most ``max_seqlen`` tokens
  each (``cu_seqlens`` gets their bounds), so attention never mixes them with a real example; every other layer is
  row-wise. ``max_seqlen`` becomes the bound ``max_txt_len + max_bb``, fixed.
- **examples and sequences**: per-sequence tensors (``cls_index``, the OT inputs) get
  ``round_coarse(B, min_examples)`` rows (:func:`round_coarse`: four sizes per octave), rounded up to whole groups
  when an example spans several sequences (:func:`group_size`: NLVR2's pairs, ITM's groups of ``sample_size``);
  per-example tensors (``targets``) get one row per group, weighted 0 by ``example_weights``; ``cu_seqlens`` gets
  that many sequences plus room for every dummy sequence a batch can need, the unused ones empty (repeated T).
- **per-sequence grids** (:data:`SEQUENCE_GRIDS`: ``seq_index`` / ``seq_pad`` of NLVR2 paired-attn, ``region_index``
  and the top-level ``obj_masks`` of RE): [rows, width] indices into the packed sequence and their pad masks, padded
  to [sequences, fixed width]; padded cells point at token 0 and are masked, and a padded sequence keeps one unmasked
  cell (a softmax over nothing but masked keys would be NaN, and NaN times a zero weight is NaN).
- **masked rows**: ``mlm_index`` / ``mlm_labels``, ``mrm_index`` and ``feat_targets`` / ``label_targets`` are padded
  to ``round_coarse(M, min_rows)`` rows (index 0, label 0, zero targets), weighted 0 by ``mlm_weights`` /
  ``mrm_weights``; every loss reads the weights (``uniter_fast.losses`` ``weights=``) and averages over the real rows.
- **ITM's first stage** (``first_stage``: text-only and image-only packed layouts of each group's positive,
  ``uniter_fast.tasks.itm.add_first_stage``): each padded as a packed batch (token multiples, dummy sequences) with
  one sequence per padded group; padding regions go to a spare row of the per-group region mean, padded groups
  count 1 region (a zero mean, finite) and weigh 0 in the contrastive loss.
- **ITM's distillation grid** (``cross_pairs``: every text x image of the G positives, G² pairs row-major, regions
  gathered on the device from the first stage's image layout): its packed layout padded as a batch of G'² sequences
  (G' the padded groups; a token multiple G' / ``sample_size`` times the batch's, as the grid holds about that many
  times its tokens; padding regions read row 0), and ``grid_index`` [G'²] placing the real pairs' scores in a G' x G'
  grid (padded cells read pair 0); the distillation loss masks the padded groups as the contrastive one does.
- **OT (ITM + WRA)**: the text and image grids are [B', max_txt_len] and [B', max_bb]; padded examples have one
  text token and one region (zero embeddings, finite distances, weight 0); the padding tokens' rows go to one spare
  grid row that the model drops.

The arithmetic of every real row is the unpadded batch's; only sums over rows (a weight gradient, a mean) take
zeros in, so losses and gradients agree to float rounding (tests/test_capture.py). Everything is built on the host.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Optional

import numpy as np
import torch

from uniter_fast.errors import ConfigError
from uniter_fast.layout import pad_masks, padded_slots

PER_EXAMPLE_TARGETS = ("targets", "pair_images")
"""Top-level per-example tensors ([B, ...]) that :func:`pad_batch` pads with zero rows."""
SEQUENCE_GRIDS = {"seq_index": ("max_seqlen", 0), "seq_pad": ("max_seqlen", True)}
"""Packed per-sequence grids [S, width] (NLVR2 paired-attn, ``uniter_fast.layout.padded_index``): their fixed width
(a :class:`Buckets` attribute) and their fill."""
SEQUENCE_GRIDS |= {"region_index": ("max_bb", 0), "obj_masks": ("max_bb", True)}  # RE: packed / top level
CONSTANTS = ("task", "sample_size")
"""Top-level non-tensor values kept as they are (ITM's group size; its ``sides`` of ``itm-hn`` has no padding)."""
MASKED_ROW_TARGETS = ("feat_targets", "label_targets")
"""Top-level per-masked-region tensors ([M, ...]) padded with zero rows."""
DROPPED = {"txt_lens", "num_bbs", "qids", "input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks"}
"""Keys of the padded layout (contract 1) and host-only keys, which a fixed-shape batch leaves out: the models
that can be captured read only the packed layout (``UniterPreTrainedModel.captures``)."""
DROPPED |= {"gather_index", "txt_labels", "img_masks", "img_mask_tgt", "txt_type_ids", "img_type_ids"}
DROPPED |= {"pair_rows", "sent_ids"}  # ITM's padded first-stage rows (the packed ``first_stage`` is padded), RE ids


class NotCapturable(ValueError):
    """A batch that cannot be given fixed shapes (no packed layout, a key whose padding is not defined)."""


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def round_coarse(value: int, least: int) -> int:
    """``value`` rounded up on a ladder of four steps per octave (..., 128, 160, 192, 224, 256, 320, ...: at most 25%
    more), and at least ``least``: few distinct sizes for counts that vary a lot from batch to batch."""
    if value <= least:
        return least
    return round_up(value, 1 << max(0, value.bit_length() - 3))


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The rounding of every size of a fixed-shape batch (module doc).

    token_multiple: St and Sn round up to a multiple of it. min_rows / min_examples: the fewest masked rows (MLM,
    MRM) / examples a batch is given (above, :func:`round_coarse`). max_txt_len: the longest text, [CLS]/[SEP]
    included; max_bb: the most regions; their sum is the fixed ``max_seqlen``.
    """

    token_multiple: int = 512
    min_rows: int = 64
    min_examples: int = 16
    max_txt_len: int = 62
    max_bb: int = 100

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"capture buckets: {field.name} must be an integer >= 1, got {value!r}")

    @property
    def max_seqlen(self) -> int:
        """The fixed ``max_seqlen`` of every padded batch: the longest possible example."""
        return self.max_txt_len + self.max_bb

    @classmethod
    def for_run(cls, max_txt_len: int, max_bb: int, num_bb: int, budget: int) -> Buckets:
        """The buckets of a run config: its text and box settings (``max_txt_len`` wordpieces without [CLS]/[SEP];
        ``max_bb``, or ``num_bb`` when larger: the GT-box and fixed-count dbs) and its token ``budget`` per batch,
        of which ``token_multiple`` is about 5% (a multiple of 64, at least 64: 512 for the original's 10240 tokens,
        64 for 1024; bench/capture_padding.py measures the padding it costs). A task whose ``train_batch_size``
        counts examples passes the tokens its batches hold instead (:func:`mean_example_tokens`)."""
        multiple = max(64, budget // 20 // 64 * 64)
        return cls(token_multiple=multiple, max_txt_len=max_txt_len + 2, max_bb=max(max_bb, num_bb))


def mean_example_tokens(dataset: Any, batch_size: int, seed: int, count: int = 256) -> float:
    """The mean packed tokens of one training example of ``dataset`` (a task dataset: ``len``, items, ``collate``):
    the text tokens ([CLS]/[SEP] included) and regions of its top-level packed layout, over every sequence the
    example spans (an ITM group's pairs, an NLVR2 pair), measured on ``count`` examples drawn without replacement by
    a generator seeded with ``seed`` (every example of a smaller dataset), collated ``batch_size`` at a time."""
    size = len(dataset)
    if size == 0:
        raise ValueError("mean_example_tokens: the dataset has no example")
    indices = np.random.default_rng(seed).permutation(size)[:count].tolist()
    tokens = 0
    for start in range(0, len(indices), batch_size):
        packed = dataset.collate([dataset[i] for i in indices[start : start + batch_size]])["packed"]
        tokens += packed["txt_ids"].numel() + packed["img_feat"].size(0)
    return tokens / len(indices)


def _cat(tensor: torch.Tensor, rows: int, fill: float = 0) -> torch.Tensor:
    """``tensor`` [N, ...] followed by ``rows`` rows of ``fill`` (same dtype)."""
    pad = torch.full((rows, *tensor.shape[1:]), fill, dtype=tensor.dtype)
    return torch.cat([tensor, pad])


def _weights(real: int, total: int) -> torch.Tensor:
    """float32 [total]: 1 for the first ``real`` rows, 0 after."""
    weights = torch.zeros(total, dtype=torch.float32)
    weights[:real] = 1.0
    return weights


def padded_sizes(
    num_txt: int, num_img: int, num_examples: int, buckets: Buckets, group: int = 1, examples: Optional[int] = None
) -> dict[str, int]:
    """The fixed sizes of a batch of ``num_txt`` text tokens, ``num_img`` regions and ``num_examples`` sequences
    read by a head (``cls_index`` rows) in examples of ``group`` sequences each: ``txt``, ``img`` (rounded token
    counts), ``tokens`` (their sum), ``dummies`` (trailing sequences holding the padding), ``sequences``
    (``cu_seqlens`` has one more entry) and ``examples`` (head sequences, a multiple of ``group``; given as
    ``examples`` for a layout nested in a batch that fixes it)."""
    txt, img = round_up(num_txt, buckets.token_multiple), round_up(num_img, buckets.token_multiple)
    dummies = math.ceil((txt - num_txt + img - num_img) / buckets.max_seqlen)
    if examples is None:
        examples = round_up(round_coarse(num_examples, buckets.min_examples), group)
    sequences = examples + math.ceil(2 * (buckets.token_multiple - 1) / buckets.max_seqlen)  # room for any dummies
    sizes = {"txt": txt, "img": img, "tokens": txt + img, "dummies": dummies}
    return {**sizes, "sequences": sequences, "examples": examples}


def group_size(batch: dict[str, Any]) -> int:
    """How many sequences (``cls_index`` rows) one example spans: ITM's ``sample_size`` (a positive and its
    negatives), else ``cls_index`` rows / ``targets`` rows (NLVR2 paired: 2), else 1."""
    sequences = batch["packed"]["cls_index"].numel()
    if "sample_size" in batch:
        group = int(batch["sample_size"])
    elif "targets" in batch and batch["targets"].size(0) != sequences:
        group = sequences // max(1, batch["targets"].size(0))
    else:
        group = 1
    if group < 1 or sequences % group:
        raise NotCapturable(f"{sequences} sequences do not form examples of {group} sequences")
    return group


def _grid(grid: torch.Tensor, rows: int, width: int, fill: Any) -> torch.Tensor:
    """A per-sequence grid [R, W] (W <= ``width``) padded to [rows, width] with ``fill``; a bool mask's padded rows
    keep cell 0 unmasked (module doc)."""
    if grid.size(1) > width:
        raise NotCapturable(f"a grid of width {grid.size(1)} is wider than the buckets' {width}")
    out = torch.full((rows, width), fill, dtype=grid.dtype)
    out[: grid.size(0), : grid.size(1)] = grid
    if grid.dtype == torch.bool:
        out[grid.size(0) :, 0] = False
    return out


def _padded_cu_seqlens(cu_seqlens: torch.Tensor, total: int, sequences: int, bound: int) -> torch.Tensor:
    """``cu_seqlens`` [B+1] extended to [sequences+1]: dummy sequences of at most ``bound`` tokens up to ``total``,
    then empty ones."""
    bounds = cu_seqlens.tolist()
    end = bounds[-1]
    while end < total:
        end = min(end + bound, total)
        bounds.append(end)
    bounds += [total] * (sequences + 1 - len(bounds))
    return torch.tensor(bounds, dtype=torch.int32)


def _packed(packed: dict[str, Any], sizes: dict[str, int], buckets: Buckets) -> dict[str, Any]:
    """The packed dict padded to ``sizes`` (module doc); ITM's ``txt_slot`` / ``img_slot`` are rebuilt by
    :func:`_ot`."""
    num_txt, num_img = packed["txt_ids"].numel(), packed["img_index"].numel()
    total = num_txt + num_img
    pad_txt, pad_img = sizes["txt"] - num_txt, sizes["img"] - num_img
    num_examples = packed["cls_index"].numel()
    if int(packed["max_seqlen"]) > buckets.max_seqlen:
        raise NotCapturable(
            f"an example of {packed['max_seqlen']} tokens is longer than the buckets' max_seqlen "
            f"{buckets.max_seqlen} (max_txt_len {buckets.max_txt_len} + max_bb {buckets.max_bb})"
        )
    out: dict[str, Any] = {
        "txt_ids": _cat(packed["txt_ids"], pad_txt),
        "txt_position_ids": _cat(packed["txt_position_ids"], pad_txt),
        "txt_index": torch.cat([packed["txt_index"], total + torch.arange(pad_txt)]),
        "img_index": torch.cat([packed["img_index"], total + pad_txt + torch.arange(pad_img)]),
        "cu_seqlens": _padded_cu_seqlens(packed["cu_seqlens"], sizes["tokens"], sizes["sequences"], buckets.max_seqlen),
        "max_seqlen": buckets.max_seqlen,
        "cls_index": _cat(packed["cls_index"], sizes["examples"] - num_examples),
    }
    for key in ("img_feat", "img_pos_feat"):  # absent from a layout whose regions are gathered on the device
        if key in packed:
            out[key] = _cat(packed[key], pad_img)
    if "img_masks" in packed:
        out["img_masks"] = _cat(packed["img_masks"], pad_img, False)
    for key in SEQUENCE_GRIDS.keys() & packed.keys():
        width, fill = SEQUENCE_GRIDS[key]
        out[key] = _grid(packed[key], sizes["examples"], getattr(buckets, width), fill)
    for key, pad in (("txt_type_ids", pad_txt), ("img_type_ids", pad_img)):
        if key in packed:
            out[key] = _cat(packed[key], pad)
    for index, extra, weights in (("mlm_index", "mlm_labels", "mlm_weights"), ("mrm_index", None, "mrm_weights")):
        if index in packed:
            rows = packed[index].numel()
            padded_rows = round_coarse(rows, buckets.min_rows)
            out[index] = _cat(packed[index], padded_rows - rows)
            out[weights] = _weights(rows, padded_rows)
            if extra is not None:
                out[extra] = _cat(packed[extra], padded_rows - rows)
    unknown = sorted(set(packed) - set(out) - {"txt_slot", "img_slot"})
    if unknown:
        raise NotCapturable(f"packed keys {unknown} have no fixed-shape padding")
    return out


def _first_stage(stage: dict[str, Any], groups: int, buckets: Buckets) -> dict[str, Any]:
    """ITM's ``first_stage`` layouts padded to ``groups`` groups (module doc)."""
    out: dict[str, Any] = {}
    for key in ("txt", "img"):
        packed = stage[key]
        num_txt, num_img = packed["txt_ids"].numel(), packed["img_feat"].size(0)
        sizes = padded_sizes(num_txt, num_img, packed["cls_index"].numel(), buckets, examples=groups)
        out[key] = _packed(packed, sizes, buckets)
    real = stage["img_counts"].numel()
    pad_img = out["img"]["img_feat"].size(0) - stage["img_rows"].numel()
    out["img_rows"] = _cat(stage["img_rows"], pad_img, groups)
    out["img_counts"] = _cat(stage["img_counts"], groups - real, 1)
    return out


def _cross_pairs(
    cross: dict[str, Any], groups: int, padded_groups: int, sample_size: int, buckets: Buckets
) -> dict[str, Any]:
    """ITM's distillation teacher grid (``cross_pairs`` of ``groups`` G groups: G² pairs row-major,
    ``uniter_fast.tasks.itm.add_cross_pairs``) for ``padded_groups`` G' groups (module doc)."""
    packed = cross["packed"]
    # the grid holds about G / sample_size times the batch's tokens: a multiple as many times larger keeps its
    # padding share, and its number of shapes, the batch's
    grid = dataclasses.replace(buckets, token_multiple=buckets.token_multiple * max(1, padded_groups // sample_size))
    num_txt, num_img = packed["txt_ids"].numel(), packed["img_index"].numel()
    sizes = padded_sizes(num_txt, num_img, groups * groups, grid, examples=padded_groups * padded_groups)
    index = torch.zeros(padded_groups, padded_groups, dtype=torch.int64)
    index[:groups, :groups] = torch.arange(groups * groups).view(groups, groups)
    return {
        "packed": _packed(packed, sizes, grid),
        "regions": _cat(cross["regions"], sizes["img"] - num_img),
        "grid_index": index.flatten(),
    }


def _ot(batch: dict[str, Any], packed: dict[str, Any], sizes: dict[str, int], buckets: Buckets) -> dict[str, Any]:
    """ITM's OT inputs on the fixed grids [examples, max_txt_len] / [examples, max_bb]; sets ``txt_slot`` /
    ``img_slot`` of ``packed`` (padding tokens -> the spare row examples * width)."""
    ot = batch["ot_inputs"]
    examples, width_txt, width_img = sizes["examples"], buckets.max_txt_len, buckets.max_bb
    txt_lens = _cat(ot["txt_lens"], examples - ot["txt_lens"].numel(), 1)
    img_lens = _cat(ot["img_lens"], examples - ot["img_lens"].numel(), 1)
    real_txt, real_img = ot["txt_lens"].numpy(), ot["img_lens"].numpy()
    pad_txt = packed["txt_ids"].numel() - int(real_txt.sum())
    pad_img = packed["img_feat"].size(0) - int(real_img.sum())
    packed["txt_slot"] = _cat(padded_slots(real_txt, width_txt), pad_txt, examples * width_txt)
    packed["img_slot"] = _cat(padded_slots(real_img, width_img), pad_img, examples * width_img)
    txt_pad, img_pad = pad_masks(txt_lens, img_lens, width_txt, width_img)
    return {"txt_pad": txt_pad, "img_pad": img_pad, "txt_lens": txt_lens, "img_lens": img_lens}


def pad_batch(batch: dict[str, Any], buckets: Buckets) -> dict[str, Any]:
    """A fast-path batch (host tensors, with ``packed``) at the fixed shapes of ``buckets`` (module doc).

    Returns a new dict: ``task``, ``packed`` (padded, with ``mlm_weights`` / ``mrm_weights`` [M'] float32 where it
    has masked rows), ``example_weights`` float32 [E'] (1 for the E real examples; an example spans
    :func:`group_size` sequences), ``feat_targets`` / ``label_targets`` [M', ...], ``targets`` [E', ...], the
    :data:`SEQUENCE_GRIDS` and ``ot_inputs`` when the batch has them, and the :data:`CONSTANTS`. The padded layout's
    keys are left out. ``NotCapturable`` for a batch without ``packed``, with a key whose padding is not defined, or
    with an example longer than ``buckets.max_seqlen``.
    """
    if "packed" not in batch:
        raise NotCapturable("the batch has no packed layout (fixed shapes need the fast path, fast: true)")
    packed = batch["packed"]
    num_sequences, group = packed["cls_index"].numel(), group_size(batch)
    sizes = padded_sizes(packed["txt_ids"].numel(), packed["img_feat"].size(0), num_sequences, buckets, group)
    out: dict[str, Any] = {"packed": _packed(packed, sizes, buckets)}
    examples = sizes["examples"] // group
    out["example_weights"] = _weights(num_sequences // group, examples)
    for key, value in batch.items():
        if key in ("packed", "example_weights") or key in DROPPED:
            continue
        if key in CONSTANTS:
            out[key] = value
        elif key in PER_EXAMPLE_TARGETS:
            out[key] = _cat(value, examples - value.size(0))
        elif key in SEQUENCE_GRIDS:
            width, fill = SEQUENCE_GRIDS[key]
            out[key] = _grid(value, sizes["examples"], getattr(buckets, width), fill)
        elif key in MASKED_ROW_TARGETS:
            rows = out["packed"]["mrm_weights"].numel() if "mrm_weights" in out["packed"] else value.size(0)
            out[key] = _cat(value, rows - value.size(0))
        elif key == "first_stage":
            out[key] = _first_stage(value, examples, buckets)
        elif key == "cross_pairs":
            out[key] = _cross_pairs(value, num_sequences // group, examples, group, buckets)
        elif key == "ot_inputs":
            out[key] = _ot(batch, out["packed"], sizes, buckets)
        else:
            raise NotCapturable(f"batch key {key!r} has no fixed-shape padding")
    return out


def shape_key(batch: dict[str, Any]) -> tuple[Any, ...]:
    """What a captured graph is specialised on: every tensor's path, shape and dtype and every other value."""
    items: list[Any] = []
    for key in sorted(batch):
        value = batch[key]
        if isinstance(value, dict):
            items.append((key, shape_key(value)))
        elif isinstance(value, torch.Tensor):
            items.append((key, tuple(value.shape), value.dtype))
        else:
            items.append((key, value))
    return tuple(items)


def _layouts(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The packed layouts of a batch: its ``packed``, ITM's first-stage ``txt`` / ``img`` layouts and its
    distillation grid."""
    stage = batch.get("first_stage", {})
    layouts = [batch["packed"]] + [stage[key] for key in ("txt", "img") if key in stage]
    if "cross_pairs" in batch:
        layouts.append(batch["cross_pairs"]["packed"])
    return layouts


def padding_cost(batches: Iterable[dict[str, Any]], buckets: Buckets) -> dict[str, float]:
    """What padding ``batches`` (fast-path host batches) to ``buckets`` costs: ``valid_tokens`` and
    ``padded_tokens`` (sums over every packed layout: ITM's first stage and distillation grid included), their
    ``ratio``, the same ``row_ratio`` for masked rows, ``shapes``: how many distinct fixed shapes (graphs to capture)
    the batches need, and ``batches``: how many there were."""
    valid = padded = rows = padded_rows = count = 0
    keys = set()
    for batch in batches:
        count += 1
        fixed = pad_batch(batch, buckets)
        packed, out = batch["packed"], fixed["packed"]
        valid += sum(p["txt_ids"].numel() + p["img_index"].numel() for p in _layouts(batch))
        padded += sum(p["txt_ids"].numel() + p["img_index"].numel() for p in _layouts(fixed))
        for index in ("mlm_index", "mrm_index"):
            if index in packed:
                rows, padded_rows = rows + packed[index].numel(), padded_rows + out[index].numel()
        keys.add(shape_key(fixed))
    return {
        "valid_tokens": float(valid),
        "padded_tokens": float(padded),
        "ratio": padded / valid,
        "row_ratio": padded_rows / rows if rows else float("nan"),
        "shapes": float(len(keys)),
        "batches": float(count),
    }

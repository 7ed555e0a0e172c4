"""``UniterPreTrainedModel``: the base of every model that puts heads on a UNITER encoder (pretraining and tasks).

As the original ``model/model.py`` base of the same name, it holds the encoder under ``uniter`` (so ``state_dict``
keys are ``uniter.*`` plus the heads' original names) and the weight init of the heads. It also chooses, in one
place for every head, between the packed encoder (``fast``: valid tokens only, ``Model.forward_packed``) and the
padded one (the reference), and reads rows back out of either layout: the pooled [CLS] and
each example's regions. ``init_type_embedding`` / ``init_word_embedding`` grow the embedding tables as NLVR2 and
VCR do (written once here; the original repeats them in five classes).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from uniter_fast.config import UniterConfig
from uniter_fast.model.uniter import Model, init_uniter_weights


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[nn.Module]:
    """Put ``model`` (a module, or a DeepSpeed engine around one: its ``module``) in eval mode (no dropout) for the
    ``with`` block and back to the mode it had, also when the block raises; yields the module."""
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class UniterPreTrainedModel(nn.Module):
    """A UNITER encoder (``self.uniter``) with heads added by subclasses; ``fast`` selects the packed encoder."""

    captures = False
    """Whether the fast forward reads only what a fixed-shape batch holds (``uniter_fast.data.buckets``: the packed
    layout, per-example targets and ``example_weights``, the host-built grids of ``SEQUENCE_GRIDS``), so that its
    training step can be captured as a CUDA graph (``uniter_fast.training.capture``). A head that reads the padded
    layout, syncs with the host or draws per-row randoms in its loss leaves it False (RE's rank loss, ITM's hard
    negatives and distillation: a property there)."""

    def __init__(self, config: UniterConfig, fast: bool = False, check_values: Optional[bool] = None) -> None:
        super().__init__()
        self.uniter = Model(config)
        self.config = self.uniter.config  # the encoder's own copy: growing the tables updates it, not the caller's
        self.fast = fast
        self.check_values = check_values

    def init_head_weights(self, *heads: nn.Module) -> None:
        """The original ``init_weights`` on the head modules (Linear/Embedding N(0, 0.02), biases 0, LN 1/0)."""
        for head in heads:
            head.apply(lambda m: init_uniter_weights(m, self.config.initializer_range))

    @property
    def check_values(self) -> bool:
        """Whether the fast path checks values that live on the device (set it to True/False; None, the default:
        not ``fast``). The padded path uses the encoder's own flag, ``self.uniter.check_values``."""
        return (not self.fast) if self._check_values is None else self._check_values

    @check_values.setter
    def check_values(self, value: Optional[bool]) -> None:
        self._check_values = value

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where ``module``'s forward reads ``parameter`` outside its owning module's
        forward (a tied weight, a head's projection handed to a loss function): the encoder's
        (:meth:`Model.external_parameters`) plus the heads' (subclasses extend it). DeepSpeed ZeRO-3 gathers a
        parameter only inside its owner's forward and backward unless told, so the training engine registers these
        under ZeRO-3 (``uniter_fast.training.zero.register_external_parameters``); nothing else reads them."""
        return self.uniter.external_parameters()

    # ------------------------------------------------------------------ encoder and readouts
    def has_logits(self, task: str) -> bool:
        """Whether ``forward(batch, task, with_logits=True)`` gives ``logits`` (a softmax's scores for the KL of
        adversarial training) rather than None; every head but pretraining's MRFR regression has them."""
        return True

    def objective(self, task: str) -> str:
        """The objective that a step of ``task`` (a training stream's name) trains, as an adversarial block's
        ``adv_kl_weights`` names it: the task's name (pretraining: its objective, ``"mlm_coco"`` -> ``"mlm"``)."""
        return task

    def _uses_packed(self, batch: dict) -> bool:
        return self.fast and "packed" in batch

    def _encode(self, batch: dict, img_masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Last-layer output: [T, H] (packed, when ``fast`` and the batch has ``packed``) or [B, L, H] (padded)."""
        if self._uses_packed(batch):
            return self.uniter.forward_packed(batch["packed"], check_values=self.check_values)
        return self.uniter.forward_batch(batch, img_masks=img_masks)

    def _pooled(self, batch: dict, sequence_output: torch.Tensor) -> torch.Tensor:
        """Pooled [CLS] output [B, H] of either layout."""
        if sequence_output.dim() == 2:
            return self.uniter.pooler(sequence_output[batch["packed"]["cls_index"]].unsqueeze(1))
        return self.uniter.pooler(sequence_output)

    def _region_hidden(self, batch: dict, sequence_output: torch.Tensor) -> torch.Tensor:
        """Each example's region outputs [B, Nb, H] (row i at positions t_i .. t_i+n_i-1 of its joint sequence).

        Padded layout: zero-padded to Nb = max n_i as the original ``_get_image_hidden``. Packed: gathered by the
        collate's ``packed["region_index"]`` [B, Nb] (:func:`uniter_fast.layout.padded_index`), whose pad cells
        hold token 0's output: a head masks them (RE's ``obj_masks``)."""
        if sequence_output.dim() == 2:
            if "region_index" not in batch["packed"]:
                raise ValueError("the packed layout lacks 'region_index' (its collate adds it: tasks.re.add_regions)")
            return sequence_output[batch["packed"]["region_index"]]
        txt_lens, num_bbs = batch["txt_lens"], batch["num_bbs"]
        max_bb = batch["img_feat"].size(1)
        valid = torch.arange(max_bb, device=num_bbs.device)[None, :] < num_bbs[:, None]
        out = sequence_output.new_zeros(valid.size(0), max_bb, sequence_output.size(-1))
        rows, cols = valid.nonzero(as_tuple=True)
        return out.index_put((rows, cols), sequence_output[rows, txt_lens[rows] + cols])

    # ------------------------------------------------------------------ growing the embedding tables
    def init_type_embedding(self, sources: Sequence[int]) -> None:
        """Replace the token-type table by one of ``len(sources)`` rows, row r a copy of old row ``sources[r]``.

        NLVR2: ``(0, 1, 1)`` (the second image's type starts as the image type); VCR: ``(0, 1, 0, 0)`` (answer and
        rationale types start as the text type). ``config.type_vocab_size`` follows the new size."""
        old = self.uniter.embeddings.token_type_embeddings
        if any(not 0 <= s < old.num_embeddings for s in sources):
            raise ValueError(f"sources must index the {old.num_embeddings} existing type rows, got {list(sources)}")
        new = nn.Embedding(len(sources), old.embedding_dim).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight[list(sources)])
        self.uniter.embeddings.token_type_embeddings = new
        self.uniter.config.type_vocab_size = len(sources)

    def init_word_embedding(self, num_special_tokens: int) -> None:
        """Append ``num_special_tokens`` rows (N(0, 0.02)) to the word table, as VCR's person tags; old rows kept.

        ``config.vocab_size`` follows. Unlike the original (which loses it), the new table keeps padding_idx 0."""
        if num_special_tokens < 1:
            raise ValueError(f"num_special_tokens must be >= 1, got {num_special_tokens}")
        old = self.uniter.embeddings.word_embeddings
        new = nn.Embedding(old.num_embeddings + num_special_tokens, old.embedding_dim, padding_idx=0)
        new = new.to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight.normal_(0.0, self.config.initializer_range)
            new.weight[: old.num_embeddings].copy_(old.weight)
        self.uniter.embeddings.word_embeddings = new
        self.uniter.config.vocab_size = new.num_embeddings

"""The fp32 master weights of a DeepSpeed checkpoint, copied into a live model (the export at the end of a run).

Every other checkpoint read and write (initialisation from original or BERT-style files, the consolidated export) is
:mod:`uniter_fast.checkpoint`.
"""

from __future__ import annotations

import torch

from uniter_fast.pretraining.model import UniterForPretraining


def load_consolidated_zero(model: UniterForPretraining, checkpoint_dir: str, tag: str) -> None:
    """Fill ``model`` with the fp32 master weights of a DeepSpeed checkpoint (any ZeRO stage), via
    ``deepspeed.utils.zero_to_fp32``; every parameter must be found."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"{checkpoint_dir}/{tag}: the consolidated state lacks {missing}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.dtype))

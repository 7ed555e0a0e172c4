"""The training floor under both recipes (``pretrain.py`` and ``finetune.py``): the run config's shared fields, the
DeepSpeed set-up and ``ds.json`` checks, the original's optimizer groups and LR schedule, the loop (steps,
accumulation, validation, logging, checkpoints, exact resume), ZeRO consolidation, rank lockstep, and the one run
set-up. A recipe hands the loop its model, data stream and two callables (validate, export); nothing here knows
which objectives or tasks it trains (see ``docs/architecture.md``).
"""

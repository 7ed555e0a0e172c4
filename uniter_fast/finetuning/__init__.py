"""Downstream fine-tuning: the config of ``finetune.py``, its data, trainer and run (see ``docs/finetune.md``)."""

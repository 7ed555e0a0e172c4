"""Generators of the bundled synthetic task sets: the image pool drawn from the pretraining corpus's world
(``pool.py``), the task vocabulary (``text.py``) and each task's annotations (``vqa_ve.py``, ``nlvr2.py``, ``re.py``,
``vcr.py``, ``itm.py``), in the formats ``python -m uniter_fast.build --task ...`` reads. Each task module names its
generator (``Task.bundled_split``); ``uniter_fast.tasks.bundled`` builds the sets."""

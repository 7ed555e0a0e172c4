"""``--from karpathy-coco``: Karpathy's COCO splits (``dataset_coco.json``; ``uniter_fast.importers.karpathy``).
Image key: ``coco_{subset}_{id:012}`` (the original img_dbs' ``coco_train2014_000000581857.npz``, as ``vqa2`` and
``coco-captions``)."""

from uniter_fast.importers.common import COCO_KEY
from uniter_fast.importers.karpathy import karpathy_importer

IMPORTER = karpathy_importer("coco", COCO_KEY, "id (cocoid), subset (filepath), stem, imgid")

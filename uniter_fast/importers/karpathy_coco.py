"""``--from karpathy-coco``: Karpathy's COCO splits (``dataset_coco.json``; ``uniter_fast.importers.karpathy``).
Image key: ``coco_{subset}_{id:012}`` (the original img_dbs' ``coco_train2014_000000581857.npz``)."""

from uniter_fast.importers.karpathy import karpathy_importer

IMPORTER = karpathy_importer("coco", "coco_{subset}_{id:012}", "id (cocoid), subset (filepath), stem, imgid")

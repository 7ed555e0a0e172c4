"""``--from karpathy-flickr30k``: Karpathy's Flickr30k splits (``dataset_flickr30k.json``;
``uniter_fast.importers.karpathy``). Image key: ``flickr30k_{id:012}`` (the photo id of the file name, 12 digits, as
the COCO keys)."""

from uniter_fast.importers.karpathy import karpathy_importer

IMPORTER = karpathy_importer("flickr30k", "flickr30k_{id:012}", "id (the photo id), stem, imgid")

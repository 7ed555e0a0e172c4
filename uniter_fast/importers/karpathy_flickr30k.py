"""``--from karpathy-flickr30k``: Karpathy's Flickr30k splits (``dataset_flickr30k.json``;
``uniter_fast.importers.karpathy``). Image key: ``flickr30k_{id:012}`` (the photo id of the file name, 12 digits, as
the COCO keys; the same as ``snli-ve``'s)."""

from uniter_fast.importers.common import FLICKR30K_KEY
from uniter_fast.importers.karpathy import karpathy_importer

IMPORTER = karpathy_importer("flickr30k", FLICKR30K_KEY, "id (the photo id), stem, imgid")

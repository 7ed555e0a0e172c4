"""Data pipeline: txt_db / img_db readers and writers, the bundled synthetic corpus, token-bucket batching,
per-task datasets and collates (padded + packed layouts) and the task mixer."""

from uniter_fast.data.collate import itm_collate, mlm_collate, mrc_collate, mrfr_collate, mrm_collate
from uniter_fast.data.corpus import CorpusPaths, build_corpus, default_corpus
from uniter_fast.data.datasets import DetectFeatTxtTokDataset, ItmDataset, MlmDataset, MrcDataset, MrfrDataset
from uniter_fast.data.img_db import DetectFeatLmdb, ImgDbWriter
from uniter_fast.data.lmdb_env import DataError
from uniter_fast.data.loader import TaskLoader, move_to_device
from uniter_fast.data.mixer import MetaLoader
from uniter_fast.data.packed import pack_batch
from uniter_fast.data.sampler import TokenBucketSampler
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.data.txt_db import TxtDbWriter, TxtTokLmdb

__all__ = [
    "CorpusPaths",
    "DataError",
    "DetectFeatLmdb",
    "DetectFeatTxtTokDataset",
    "ImgDbWriter",
    "ItmDataset",
    "MetaLoader",
    "MlmDataset",
    "MrcDataset",
    "MrfrDataset",
    "TaskLoader",
    "TokenBucketSampler",
    "TxtDbWriter",
    "TxtTokLmdb",
    "WordPiece",
    "build_corpus",
    "default_corpus",
    "itm_collate",
    "mlm_collate",
    "mrc_collate",
    "mrfr_collate",
    "mrm_collate",
    "move_to_device",
    "pack_batch",
]

"""Data pipeline: txt_db / img_db readers and writers, the bundled synthetic corpus, token-bucket batching,
per-task datasets, the one fast collate (packed and/or padded layout; plus the reference path) and the task mixer."""

from uniter_fast.data.corpus import CorpusPaths, build_corpus, default_corpus
from uniter_fast.data.datasets import DetectFeatTxtTokDataset, ItmDataset, MlmDataset, MrcDataset, MrfrDataset
from uniter_fast.data.img_db import DetectFeatLmdb, ImgDbWriter
from uniter_fast.data.loader import TaskLoader, batch_loader, move_to_device
from uniter_fast.data.mixer import MetaLoader
from uniter_fast.data.records import Draws, PairRecord, draw
from uniter_fast.data.sampler import TokenBucketSampler
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.data.txt_db import TokenIds, TxtDbWriter, TxtTokLmdb
from uniter_fast.errors import DataError

__all__ = [
    "CorpusPaths",
    "DataError",
    "DetectFeatLmdb",
    "DetectFeatTxtTokDataset",
    "Draws",
    "ImgDbWriter",
    "ItmDataset",
    "MetaLoader",
    "MlmDataset",
    "MrcDataset",
    "MrfrDataset",
    "PairRecord",
    "TaskLoader",
    "TokenBucketSampler",
    "TokenIds",
    "TxtDbWriter",
    "TxtTokLmdb",
    "WordPiece",
    "batch_loader",
    "build_corpus",
    "default_corpus",
    "draw",
    "move_to_device",
]

"""A gallery index on disk: per image the regions an img_db stores (features [n, 2048] and norm_bb [n, 6], fp16, cut
to the image's box count by the img_db writer) and its first-stage embedding, for ``python -m uniter_fast.search``.

Layout of the index folder:

* ``manifest.json``: ``format``, ``images_dir`` (absolute), ``made_with`` (checkpoint and detector paths and
  sha256 digests, the detector's test-time settings, the img_db box settings, ``first_stage_dim``, the vocab) and
  ``shards``, each ``{"file", "images": [paths relative to images_dir]}``, in the order they were written.
* ``shard-NNNNN.safetensors``: ``features`` float16 [R, 2048], ``norm_bb`` float16 [R, 6] (the shard's regions,
  image after image), ``offsets`` int64 [k + 1] (image i's regions are rows offsets[i]:offsets[i + 1]) and
  ``embeddings`` float32 [k, D] (L2-normalised).

A shard is written atomically, then the manifest that lists it (``uniter_fast.files``), so a killed run leaves the
index it had before plus at most an unlisted shard, which the next run overwrites: resuming skips the listed images.
"""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from uniter_fast.errors import ConfigError, DataError
from uniter_fast.files import TMP_PREFIX, atomic_write, read_json, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = 1
IDENTITY = {
    "checkpoint": "--checkpoint",
    "detector": "--detector",
    "detector_config": "the detector settings (--test-scale, --max-size, --pre-nms, --proposals)",
    "box_settings": "the img_db box settings",
    "vocab": "--vocab",
}
"""The ``made_with`` entries an index and its use must agree on (paths are compared by their digests), and what
names them in a message."""
DIGESTED = ("checkpoint", "detector", "vocab")
"""The ``made_with`` paths compared by their files' sha256 (``<key>_sha256``)."""


def file_digest(path: str) -> str:
    """sha256 (hex) of a file, or of a folder's files (names and contents, sorted by name, not recursive)."""
    digest = hashlib.sha256()
    files = sorted(os.listdir(path)) if os.path.isdir(path) else [""]
    for name in files:
        full = os.path.join(path, name) if name else path
        if not os.path.isfile(full):
            continue
        digest.update(name.encode("utf-8") + b"\0")
        with open(full, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def describe(made_with: dict[str, Any], key: str) -> str:
    """``key`` of ``made_with`` for a message: a path with the start of its digest, or the value."""
    if key in DIGESTED:
        return f"{made_with[key]!r} (sha256 {made_with[key + '_sha256'][:12]})"
    return repr(made_with[key])


def check_made_with(index_path: str, saved: dict[str, Any], given: dict[str, Any], keys: Sequence[str]) -> None:
    """A ConfigError naming the first of ``keys`` on which the index's ``saved`` ``made_with`` and the ``given``
    one differ (the :data:`DIGESTED` paths by digest), with both values. The vocab of an index made before its
    digest was recorded is not checked."""
    for key in keys:
        if key in DIGESTED:
            if saved.get(key + "_sha256") is None or given.get(key + "_sha256") is None:
                continue
            same = saved[key + "_sha256"] == given[key + "_sha256"]
        else:
            same = saved[key] == given[key]
        if not same:
            raise ConfigError(
                f"{IDENTITY[key]}: the index {index_path!r} was made with {key} {describe(saved, key)}, "
                f"got {describe(given, key)}; use the same {key.replace('_', ' ')}, or make a new index (--out)"
            )


class GalleryIndex:
    """An index folder (see the module docstring): its manifest, the images it holds, their embeddings and
    regions. ``open`` reads one, ``create_or_resume`` starts or continues one, ``add_shard`` appends images."""

    def __init__(self, path: str, manifest: dict[str, Any]) -> None:
        self.path, self.manifest = path, manifest
        self._embeddings: Optional[torch.Tensor] = None

    @classmethod
    def open(cls, path: str) -> GalleryIndex:
        """The index at ``path``; a FileNotFoundError / DataError naming it when it is missing or not an index."""
        manifest = read_json(os.path.join(path, MANIFEST), "index manifest (--index)")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataError(f"--index: expected a gallery index of format {FORMAT} at {path!r}, got another manifest")
        return cls(path, manifest)

    @classmethod
    def create_or_resume(cls, path: str, images_dir: str, made_with: dict[str, Any]) -> GalleryIndex:
        """The index at ``path`` to fill: a new one (folder and empty manifest), or the one there (made with the
        same ``made_with`` identity and ``images_dir``, a ConfigError naming both otherwise), its leftovers of a
        killed run (temporary files, unlisted shards) removed."""
        images_dir = os.path.abspath(images_dir)
        if os.path.isfile(os.path.join(path, MANIFEST)):
            index = cls.open(path)
            check_made_with(path, index.manifest["made_with"], made_with, IDENTITY)
            if index.manifest["images_dir"] != images_dir:
                raise ConfigError(
                    f"--images: the index {path!r} holds images of {index.manifest['images_dir']!r}, got "
                    f"{images_dir!r}; make a new index (--out) for another folder"
                )
            listed = {shard["file"] for shard in index.manifest["shards"]}
            for leftover in glob.glob(os.path.join(path, TMP_PREFIX + "*")) + glob.glob(
                os.path.join(path, "shard-*.safetensors")
            ):
                if os.path.basename(leftover) not in listed:
                    os.remove(leftover)
            return index
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise FileExistsError(f"--out: expected a new folder or an index to resume, got {path!r} (not an index)")
        os.makedirs(path, exist_ok=True)
        manifest = {"format": FORMAT, "images_dir": images_dir, "made_with": made_with, "shards": []}
        write_json_atomic(os.path.join(path, MANIFEST), manifest, indent=1)
        return cls(path, manifest)

    @property
    def images(self) -> list[str]:
        """The indexed images (paths relative to ``images_dir``), in index order."""
        return [image for shard in self.manifest["shards"] for image in shard["images"]]

    def image_path(self, image: str) -> str:
        """The path of the indexed ``image`` (``images_dir`` joined with it)."""
        return os.path.join(self.manifest["images_dir"], image)

    def add_shard(
        self, images: Sequence[str], regions: Sequence[dict[str, np.ndarray]], embeddings: np.ndarray
    ) -> None:
        """Append ``images`` with their stored ``regions`` ({"features" float16 [n, 2048], "norm_bb" float16
        [n, 6]} each) and ``embeddings`` float32 [k, D]: the shard file, then the manifest, each atomically."""
        if not len(images) == len(regions) == len(embeddings):
            raise ValueError(f"{len(images)} images, {len(regions)} regions and {len(embeddings)} embeddings")
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        counts = [len(r["features"]) for r in regions]
        tensors = {
            "features": np.concatenate([r["features"] for r in regions]).astype(np.float16),
            "norm_bb": np.concatenate([r["norm_bb"] for r in regions]).astype(np.float16),
            "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "embeddings": np.ascontiguousarray(embeddings, dtype=np.float32),
        }
        atomic_write(os.path.join(self.path, name), lambda tmp: save_file(tensors, tmp))
        shards = [*self.manifest["shards"], {"file": name, "images": list(images)}]
        self.manifest = {**self.manifest, "shards": shards}
        write_json_atomic(os.path.join(self.path, MANIFEST), self.manifest, indent=1)
        self._embeddings = None

    def _shard(self, name: str) -> Any:
        """The shard file ``name`` opened for reading; a ``DataError`` naming the index when it is missing or
        damaged."""
        path = os.path.join(self.path, name)
        if not os.path.isfile(path):
            raise DataError(f"--index: {self.path!r} lists the shard {name!r}, which is missing; index again (--out)")
        try:
            return safe_open(path, framework="np")
        except Exception as exc:  # safetensors' SafetensorError: a truncated or overwritten shard
            raise DataError(f"--index: the shard {path!r} is damaged ({exc}); index the folder again (--out)") from exc

    def embeddings(self) -> torch.Tensor:
        """float32 [N, D]: every indexed image's first-stage embedding, in index order (read once)."""
        if self._embeddings is None:
            parts = []
            for shard in self.manifest["shards"]:
                with self._shard(shard["file"]) as f:
                    parts.append(torch.from_numpy(f.get_tensor("embeddings")))
            dim = int(self.manifest["made_with"]["first_stage_dim"])
            self._embeddings = torch.cat(parts) if parts else torch.zeros(0, dim)
        return self._embeddings

    def regions(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """The stored regions ({"features" float16 [n, 2048], "norm_bb" float16 [n, 6]}) of the images at
        ``indices`` (index order positions), in the order given; each shard is opened once, only its rows read."""
        where: list[tuple[int, int]] = []
        for s, shard in enumerate(self.manifest["shards"]):
            where += [(s, i) for i in range(len(shard["images"]))]
        wanted: dict[int, list[tuple[int, int]]] = {}
        for position, index in enumerate(indices):
            shard, row = where[int(index)]
            wanted.setdefault(shard, []).append((position, row))
        out: list[Any] = [None] * len(indices)
        for s, rows in wanted.items():
            with self._shard(self.manifest["shards"][s]["file"]) as f:
                offsets = f.get_tensor("offsets")
                features, norm_bb = f.get_slice("features"), f.get_slice("norm_bb")
                for position, row in rows:
                    start, end = int(offsets[row]), int(offsets[row + 1])
                    out[position] = {"features": features[start:end], "norm_bb": norm_bb[start:end]}
        return out

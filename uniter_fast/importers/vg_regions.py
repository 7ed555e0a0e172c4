"""``--from vg-regions``: Visual Genome's region descriptions (``region_descriptions.json`` of
https://visualgenome.org/api/v0/api_home.html, version 1.2; the file visual_genome_python_driver's
``get_all_region_descriptions`` reads) as pretraining caption records ("VG dense captions" in the UNITER paper).

The file: a list of images ``[{"id" (or "image_id"), "regions": [{"region_id", "image_id", "phrase", "x", "y",
"width", "height"}]}]``. A record per region: id = ``region_id``, caption = ``phrase`` as written, image = the
``--image_key`` pattern (fields ``id``, the VG image id, and ``stem``, the name of its file ``<id>.jpg``; default
``vg_{id:012}``).

The original UNITER removed from pretraining the images of the downstream val / test sets (and the Flickr30k
overlaps). ``--exclude`` drops the images it lists: ``vg:<id>`` lines directly, and ``coco:<id>`` /
``flickr30k:<id>`` lines through VG's ``image_data.json`` (``[{"image_id" (or "id"), "coco_id", "flickr_id",
...}]``, the second ``--annotations`` file), which maps each VG image to its COCO / Flickr photo.
"""

from __future__ import annotations

from typing import Any

from uniter_fast.data.task_records import field
from uniter_fast.errors import ConfigError, DataError
from uniter_fast.importers import PRETRAIN, Importer
from uniter_fast.importers.common import Caption, caption, image_key, json_list, read_exclusions

SOURCES = {"coco": "coco_id", "flickr30k": "flickr_id"}


def _image_id(image: Any, where: str) -> int:
    """The VG image id of an image entry (``id`` in version 1.2, ``image_id`` in others)."""
    if isinstance(image, dict) and "id" not in image and "image_id" in image:
        return field(image, "image_id", int, where)
    return field(image, "id", int, where)


def excluded_images(paths: list[str], exclude: dict[str, set[int]]) -> set[int]:
    """VG ids of the images ``exclude`` names: its ``vg`` ids, and those whose COCO / Flickr photo it names (through
    ``image_data.json``, ``paths[1]``)."""
    out = set(exclude["vg"])
    wanted = [source for source in SOURCES if exclude[source]]
    if not wanted:
        return out
    if len(paths) < 2:
        raise ConfigError(
            f"--exclude names {wanted} images: give VG's image_data.json as the second --annotations file (it maps "
            "VG images to COCO / Flickr photos)"
        )
    for i, image in enumerate(json_list(paths[1], "VG image data file", "images")):
        where = f"{paths[1]}[{i}]"
        vg_id = _image_id(image, where)
        for source, key in SOURCES.items():
            other = field(image, key, (int, type(None)), where) if key in image else None
            if other is not None and other in exclude[source]:
                out.add(vg_id)
    return out


def read(paths: list[str], options: dict[str, Any]) -> list[Caption]:
    """Caption records of every region of ``region_descriptions.json`` (``paths[0]``) whose image is not excluded."""
    if len(paths) > 2:
        raise ConfigError(f"--annotations: expected region_descriptions.json [image_data.json], got {len(paths)} files")
    excluded = excluded_images(paths, read_exclusions(options["exclude"]))
    records: list[Caption] = []
    for i, image in enumerate(json_list(paths[0], "VG region descriptions file", "images")):
        where = f"{paths[0]}[{i}]"
        image_id = _image_id(image, where)
        regions = field(image, "regions", list, where)
        if image_id in excluded:
            continue
        key = image_key(options["image_key"], {"id": image_id, "stem": str(image_id)}, where)
        for j, region in enumerate(regions):
            at = f"{where} regions[{j}]"
            if field(region, "image_id", int, at) != image_id:
                raise DataError(f"{at}: image_id {region['image_id']} differs from its image's id {image_id}")
            records.append(caption(at, field(region, "region_id", int, at), key, field(region, "phrase", str, at)))
    if not records:
        raise DataError(f"VG region descriptions {paths[0]!r}: no region of an image not excluded by --exclude")
    return records


IMPORTER = Importer(
    name="vg-regions",
    task=PRETRAIN,
    description="Visual Genome region descriptions (region_descriptions.json): pretraining caption records",
    files="region_descriptions.json [image_data.json]",
    options={
        "image_key": (
            str,
            "vg_{id:012}",
            "img_db key pattern; fields id (the VG image id), stem (its file name, <id>)",
        ),
        "exclude": (str, None, "file of images to leave out, one vg:<id> / coco:<id> / flickr30k:<id> a line"),
    },
    read=read,
)

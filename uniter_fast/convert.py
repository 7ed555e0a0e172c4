"""``python -m uniter_fast.convert``: a UNITER checkpoint of any surviving layout -> a ``save_pretrained`` folder,
and back.

    python -m uniter_fast.convert SRC --out DIR [--from original|mmf|villa|volta|lightningdot] [--tower image|text]
                                  [--encoder-only] [--task NAME] [--config CFG]
    python -m uniter_fast.convert DIR --to uniter|model|mmf|lightningdot --out FILE

Forward: the layout is detected from the keys (``--from`` checks it), the weights are renamed to the original names
(tensors and dtypes unchanged), checked by loading them into the model (the task model when the source holds a task
head), and written to the new folder ``DIR``: ``model.safetensors``, ``config.json``, ``conversion.json`` (source,
layout, sha256, renamed and dropped keys, what the way back needs), the model card ``README.md`` and, when the task
head is known, the ``task.json`` the fine-tuning loader reads. The report (the same JSON) is printed.

Back (``--to``): the weights of a folder (or any checkpoint) written in a layout as one ``torch.save`` file, with
the prefixes, head names and buffers its ``conversion.json`` recorded: a converted file goes back bit for bit.
An existing ``--out`` is never overwritten. See docs/checkpoints.md.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence, Union

import torch

from uniter_fast.checkpoint import (
    CONVERSION_NAME,
    ENCODER_PREFIX,
    EXPORT_LAYOUTS,
    WEIGHTS_NAME,
    Checkpoint,
    checkpoint_config,
    file_sha256,
    from_original,
    load_state,
    read_checkpoint,
    save_state,
)
from uniter_fast.config import UniterConfig
from uniter_fast.entry import CommandParser, run_command
from uniter_fast.errors import CheckpointError, ConfigError
from uniter_fast.files import atomic_directory, atomic_write, check_new_output
from uniter_fast.model.uniter import UniterModel
from uniter_fast.tasks import TASKS
from uniter_fast.tasks.checkpoint import TASK_FILE, checkpoint_task, load_task_model
from uniter_fast.tasks.spec import Task

SOURCES = {  # --from: the layouts each source's files come in
    "original": ("uniter", "model"),
    "mmf": ("mmf",),
    "villa": ("uniter", "mmf"),  # VILLA's own releases: original names; MMF's villa.pretrained: MMF's
    "volta": ("volta",),
    "lightningdot": ("lightningdot",),
}


def convert(
    src: str,
    out: str,
    source: Optional[str] = None,
    tower: str = "image",
    encoder_only: bool = False,
    task: Optional[str] = None,
    config: Union[UniterConfig, str, None] = None,
) -> dict[str, Any]:
    """Convert checkpoint ``src`` into the new ``save_pretrained`` folder ``out`` (see the module docstring);
    returns the report written to ``out/conversion.json``. ``source``: a :data:`SOURCES` name the detected layout
    must belong to; ``encoder_only``: heads are dropped (another project's heads that are not the original's are
    otherwise refused); ``task``: the task of the head when several tasks share its names; ``config``: the model
    config (a preset, a JSON path; default the one saved with ``src``, else read off the weights)."""
    if source is not None and source not in SOURCES:
        raise ConfigError(f"--from: expected one of {sorted(SOURCES)}, got {source!r}")
    check_new_output(out, "--out", "folder")
    ckpt = read_checkpoint(src, tower=tower, keep_heads=not encoder_only)
    if source is not None and ckpt.layout not in SOURCES[source]:
        raise CheckpointError(
            f"--from {source}: {src} has the {ckpt.layout!r} layout, expected {' or '.join(SOURCES[source])}"
        )
    conversion = ckpt.conversion
    state = dict(ckpt.state)
    if encoder_only:
        file_key = {original: key for key, original in conversion.renamed.items()}
        for key in [k for k in state if not k.startswith(ENCODER_PREFIX)]:
            del state[key]
            conversion.renamed.pop(file_key.get(key, key), None)
            conversion.dropped[file_key.get(key, key)] = "a head (--encoder-only)"
    model_config = checkpoint_config(ckpt, config)
    head_task = checkpoint_task(state, task)
    options = _check_loads(ckpt, state, model_config, head_task)
    report = {
        "source": os.path.abspath(ckpt.path),
        "sha256": _source_sha256(ckpt),
        "container": ckpt.container,
        "layout": ckpt.layout,
        "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in state.values()}),
        "keys": len(state),
        "task": head_task.name if head_task else None,
        "renamed": conversion.renamed,
        "dropped": conversion.dropped,
        "notes": conversion.notes,
        "source_layout": conversion.source,
    }
    side_files = {CONVERSION_NAME: report}
    if head_task is not None:
        side_files[TASK_FILE] = {"task": head_task.name, "options": options}
    card = {k: report[k] for k in ("source", "sha256", "layout", "task", "dtypes", "renamed", "dropped", "notes")}
    with atomic_directory(out) as tmp:
        save_state(state, model_config, tmp, side_files, card)
    return report


def _source_sha256(ckpt: Checkpoint) -> Optional[str]:
    """The sha256 of the file the weights were read from: the file, a folder's ``model.safetensors``; None for a
    DeepSpeed directory (many files)."""
    if os.path.isfile(ckpt.path):
        return file_sha256(ckpt.path)
    weights = os.path.join(ckpt.path, WEIGHTS_NAME)
    return file_sha256(weights) if ckpt.container == "directory" and os.path.isfile(weights) else None


def _check_loads(
    ckpt: Checkpoint, state: dict[str, torch.Tensor], config: UniterConfig, task: Optional[Task]
) -> dict[str, Any]:
    """Load ``state`` into the model it is for (``task``'s model, else a UniterModel) as the folder will be loaded:
    a mapping or size error surfaces here, before anything is written. The options the head fixes are returned."""
    if task is not None:
        view = Checkpoint(ckpt.path, ckpt.container, ckpt.layout, state, config, None, ckpt.conversion)
        _, options = load_task_model(task, view, {}, config=config)
        return {k: v for k, v in task.options_from_state(state).items() if k in options}
    load_state(UniterModel(config), state, ckpt.path, encoder_only=True, strict=not ckpt.text_only, log=False)
    return {}


def export(src: str, out: str, layout: str) -> dict[str, Any]:
    """Write the weights of checkpoint ``src`` (a converted folder, or any checkpoint) in ``layout`` (one of
    :data:`~uniter_fast.checkpoint.EXPORT_LAYOUTS`) to the new ``torch.save`` file ``out``, tensors and dtypes as
    stored (fp16 stays fp16), with what ``src``'s ``conversion.json`` recorded of that layout; returns a report."""
    if layout not in EXPORT_LAYOUTS:
        raise ConfigError(f"--to: expected one of {list(EXPORT_LAYOUTS)}, got {layout!r}")
    check_new_output(out, "--out")
    ckpt = read_checkpoint(src)
    saved = ckpt.side_file(CONVERSION_NAME) or {}
    if saved.get("layout") == layout:
        recorded = saved.get("source_layout", {})
    else:
        recorded = ckpt.conversion.source if ckpt.layout == layout else {}
    state = from_original(ckpt.state, layout, recorded)
    atomic_write(out, lambda tmp: torch.save(state, tmp))
    return {
        "source": os.path.abspath(ckpt.path),
        "to": layout,
        "out": os.path.abspath(out),
        "keys": len(state),
        "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in state.values()}),
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` and convert (or with ``--to``, export); print the report as JSON."""
    parser = CommandParser(prog="python -m uniter_fast.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="the checkpoint: a file, a folder, or a Hugging Face Hub id org/name")
    parser.add_argument("--out", required=True, help="the new folder (with --to: the new file) to write")
    parser.add_argument("--from", dest="source", choices=sorted(SOURCES), help="the project the file comes from")
    parser.add_argument("--to", choices=EXPORT_LAYOUTS, help="write SRC's weights back in this layout instead")
    parser.add_argument("--tower", choices=("image", "text"), default="image", help="LightningDOT: the tower")
    parser.add_argument("--encoder-only", action="store_true", help="drop every head (e.g. MMF's refused heads)")
    parser.add_argument("--task", choices=sorted(TASKS), help="the task of the head when several share its names")
    parser.add_argument("--config", help="model config: a preset or a JSON path (default: saved, else inferred)")
    args = parser.parse_args(argv)
    if args.to is not None:
        flags = {"--from": args.source, "--task": args.task, "--config": args.config}
        flags["--encoder-only"] = args.encoder_only
        given = [flag for flag, value in flags.items() if value]
        if given:
            raise ConfigError(f"--to writes a layout back and takes none of {given}")
        report = export(args.src, args.out, args.to)
    else:
        report = convert(args.src, args.out, args.source, args.tower, args.encoder_only, args.task, args.config)
    print(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    run_command(main)

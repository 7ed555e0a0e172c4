"""Build UNITER databases (txt_db + img_db) from your own data.

    python -m uniter_fast.build --captions captions.jsonl --features feats/ --vocab vocab.txt --out db/
    python -m uniter_fast.build --task vqa --annotations vqa.jsonl --features feats/ --vocab vocab.txt --out db/

Without ``--task`` (or with ``--task pretrain``): pretraining dbs from captions (``uniter_fast.data.build``). With
``--task <name>``: the task's dbs from its annotations (``Task.build_dbs``; formats in ``docs/data.md``), with the
task's own options (``--task vqa --help`` lists them, e.g. ``--ans2label``). With ``--from <format>``: the
annotations are a public dataset's files as published (``uniter_fast.importers``; ``docs/datasets.md``), read by
that format's importer (its options: ``--from <format> --help``) into the databases of the task it feeds; the
importer reads its own options and the task's (e.g. ``--ans2label``) and may return an ``Imported`` whose options
(e.g. the answer vocabulary VQA v2's files define) the task's builder takes over the command line's.

Writes ``out/txt`` and ``out/img`` (+ ``out/img_gt``, the GT-box features of RE and VCR) under a temporary name,
renamed at the end; prints the counts as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence

from uniter_fast.data.task_db import Imported
from uniter_fast.entry import CommandParser, run_command
from uniter_fast.importers import Importer, importers

PRETRAIN = "pretrain"


def _parser(
    task_options: dict[str, tuple[type, Any, str]], tasks: list[str], formats: list[str], importer: Optional[Importer]
) -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m uniter_fast.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--task", default=PRETRAIN, choices=[PRETRAIN, *tasks], help="pretrain (captions; the default) or a task"
    )
    parser.add_argument("--captions", help="pretrain: captions.jsonl with {id, image, caption} lines")
    parser.add_argument(
        "--from",
        dest="source_format",
        choices=formats,
        help="read --annotations as this public dataset's files (default: the task's own annotation format)",
    )
    parser.add_argument(
        "--annotations",
        nargs="+",
        help="a task's annotations (a JSON-lines file; RE: the refs directory); with --from: "
        + (importer.files if importer else "the format's files"),
    )
    parser.add_argument("--gt_features", help="re / vcr: directory of per-image GT-box .npz files")
    parser.add_argument("--features", required=True, help="directory of per-image .npz files")
    parser.add_argument("--vocab", required=True, help="WordPiece vocab.txt (bert-base-cased's for real runs)")
    parser.add_argument("--out", required=True, help="output directory (must not exist); gets txt/ and img/")
    parser.add_argument("--conf_th", type=float, default=0.2)
    parser.add_argument("--max_bb", type=int, default=100)
    parser.add_argument("--min_bb", type=int, default=10)
    parser.add_argument("--num_bb", type=int, default=36, help="boxes per image when --conf_th -1")
    parser.add_argument("--compress", action="store_true", help="pretrain: store np.savez_compressed records")
    parser.add_argument("--toker_name", default=None, help="tokenizer name written to meta.json (default: vocab dir)")
    for name, (kind, default, help_text) in task_options.items():
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"{help_text} (this task's option)")
    for name, (kind, default, help_text) in (importer.options if importer else {}).items():
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"{help_text} (this format's option)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Command-line entry point (see the module docstring); returns the printed report."""
    from uniter_fast.tasks import TASKS

    builders = sorted(name for name, t in TASKS.items() if t.builds_dbs)
    formats = importers()
    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--task", default=None)
    known.add_argument("--from", dest="source_format", default=None)
    first, _ = known.parse_known_args(argv)
    importer = formats.get(first.source_format) if first.source_format else None
    task_name = first.task or (importer.task if importer else PRETRAIN)
    task = TASKS.get(task_name)
    parser = _parser(
        task.build_options if task is not None and task.builds_dbs else {}, builders, sorted(formats), importer
    )
    args = parser.parse_args(argv)
    if importer is not None and first.task is not None and first.task != importer.task:
        parser.error(f"--from {importer.name} feeds --task {importer.task}, not --task {first.task}")
    if args.annotations and len(args.annotations) > 1 and importer is None:
        parser.error(f"--annotations takes one file without --from, got {len(args.annotations)}")
    annotations: Any = None
    if importer is not None:
        if not args.annotations:
            parser.error(f"--from {importer.name} needs --annotations {importer.files}")
        given = [*importer.options, *(task.build_options if task is not None and task.builds_dbs else {})]
        read = importer.read(args.annotations, {name: getattr(args, name) for name in given})
        annotations = read if isinstance(read, Imported) else Imported(" ".join(args.annotations), read)
    elif args.annotations:
        annotations = args.annotations[0]
    toker_name = args.toker_name or os.path.basename(os.path.dirname(os.path.abspath(args.vocab))) or "wordpiece"
    if task is None:
        from uniter_fast.data.build import build_dbs

        captions = annotations if importer is not None else args.captions
        if not captions:
            parser.error("--captions is required (or give --task and --annotations for a downstream task)")
        boxes = (args.conf_th, args.max_bb, args.min_bb, args.num_bb)
        report = build_dbs(captions, args.features, args.vocab, args.out, *boxes, args.compress, toker_name)
    else:
        from uniter_fast.data.tokenizer import WordPiece

        if annotations is None:
            parser.error(f"--task {task.name} needs --annotations")
        if not os.path.isfile(args.vocab):
            raise FileNotFoundError(f"vocab file {args.vocab!r} does not exist")
        options = {name: getattr(args, name) for name in task.build_options}
        report = task.build_dbs(
            annotations,
            args.features,
            args.out,
            WordPiece(args.vocab),
            toker_name,
            (args.conf_th, args.max_bb, args.min_bb, args.num_bb),
            args.gt_features,
            options,
        )
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run_command(main)

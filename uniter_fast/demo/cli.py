"""Serve the browser demo of fine-tuned UNITER checkpoints on a local page (needs the ``[demo]`` extra).

    python -m uniter_fast.demo --checkpoint finetuned-vqa/ --detector bua-r101.pth --vocab vocab.txt
    python -m uniter_fast.demo --checkpoint vqa=vqa/ --checkpoint itm=itm/ --checkpoint re=re/ \\
        --detector bua-r101.pth --vocab vocab.txt --port 7860

A --checkpoint is TASK=PATH, or a finetune.py export folder whose task.json names its task. The page has a tab per
task and a word-region alignment tab; open the address it prints. docs/own-images.md, "Browser demo".
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from uniter_fast.entry import CommandParser, device_argument
from uniter_fast.errors import ConfigError, closest
from uniter_fast.extract.config import add_detector_arguments, detector_config


def parser() -> argparse.ArgumentParser:
    """The command-line options (see ``--help``)."""
    ap = CommandParser(
        prog="python -m uniter_fast.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="[TASK=]PATH",
        help="a fine-tuned checkpoint, one per task (repeatable); TASK= where it has no task.json",
    )
    ap.add_argument("--detector", required=True, help="BUTD Faster R-CNN weights (docs/extract.md lists them)")
    ap.add_argument("--vocab", default=None, help="WordPiece vocab.txt (default: each checkpoint folder's vocab.txt)")
    ap.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=7860, help="port to serve on")
    ap.add_argument("--device", type=device_argument, default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--top-k", type=int, default=5, help="vqa: answers shown")
    add_detector_arguments(ap)
    return ap


def saved_task(path: str) -> Optional[str]:
    """The task that the checkpoint folder's task.json names (None without one)."""
    from uniter_fast.tasks.checkpoint import TASK_FILE

    file = os.path.join(path, TASK_FILE)
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f).get("task")


def checkpoint_tasks(values: Sequence[str]) -> dict[str, str]:
    """{task: checkpoint path} of the ``--checkpoint`` values (``TASK=PATH`` or a folder whose task.json names its
    task); a ConfigError naming the value that is neither, a path that does not exist, or a task given twice."""
    from uniter_fast.tasks import answering_tasks

    tasks = answering_tasks()
    found: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or os.path.exists(value):
            name, path = "", value
        elif name not in tasks:
            raise ConfigError(
                f"--checkpoint: expected TASK=PATH with TASK one of {tasks}, got {value!r}" + closest(name, tasks)
            )
        if not os.path.exists(path):
            raise ConfigError(f"--checkpoint: expected an existing checkpoint, got {path!r} (not found)")
        task = name or saved_task(path)
        if task not in tasks:
            raise ConfigError(
                f"--checkpoint: {path!r} has no task.json naming one of {tasks}; give it as TASK=PATH"
                if task is None
                else f"--checkpoint: {path!r} is a {task!r} model, which answers no queries; expected one of {tasks}"
            )
        if task in found:
            raise ConfigError(f"--checkpoint: two checkpoints for {task}: {found[task]!r} and {path!r}")
        found[task] = path
    return found


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Load the checkpoints and the detector, then serve the page until interrupted."""
    args = parser().parse_args(argv)
    from uniter_fast.demo.app import build_app, require_gradio

    require_gradio()  # before minutes of loading
    checkpoints = checkpoint_tasks(args.checkpoint)
    if args.top_k < 1:
        raise ConfigError(f"--top-k: expected an integer >= 1, got {args.top_k}")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port: expected a port in 1..65535, got {args.port}")
    if not os.path.isfile(args.detector):
        raise ConfigError(f"--detector: expected a weights file, got {args.detector!r} (not found)")
    from uniter_fast.extract.extractor import Extractor
    from uniter_fast.inference import Pipeline

    config = detector_config(args)
    extractor = Extractor(args.detector, device=args.device, config=config)  # one detector for every task
    pipelines = {
        task: Pipeline.from_pretrained(task, path, extractor, vocab=args.vocab, device=args.device, top_k=args.top_k)
        for task, path in checkpoints.items()
    }
    app = build_app(pipelines, checkpoints)
    try:
        app.launch(server_name=args.host, server_port=args.port)
    except OSError as err:  # the port is taken or the address is not this machine's
        raise ConfigError(f"--host/--port: cannot serve on {args.host}:{args.port} ({err})") from None

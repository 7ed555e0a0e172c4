"""What a run writes under ``output_dir`` besides checkpoints (``ckpt/``): the JSON-lines logs of training steps and
validations, the rank-0 TensorBoard writer (``tb/``), the name of a pretraining run's export, and the plain-text
tables of the final summaries.

A log line is appended whole, but a process killed in the middle of an append can leave its last line cut short;
:func:`read_jsonl` drops such a line (it has no newline), so a resumed run reads the complete records only.
"""

from __future__ import annotations

import json
import os
from typing import Any

from uniter_fast.errors import DataError
from uniter_fast.files import write_text_atomic

STEP_LOG = "train_steps.jsonl"
VAL_LOG = "validation.jsonl"
TB_SUBDIR = "tb"
PRETRAINED_SUBDIR = "pretrained"  # a pretraining run's consolidated fp32 weights, which fine-tuning starts from


def open_output_dir(output_dir: str, rank: int) -> Any:
    """Create ``output_dir``; on rank 0 return a TensorBoard ``SummaryWriter`` on ``output_dir/tb`` (None elsewhere)."""
    os.makedirs(output_dir, exist_ok=True)
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(output_dir, TB_SUBDIR))


def append_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    """Append ``records`` to a JSON-lines file, one line each."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] if it does not exist); a last line without its newline (an append cut
    short by a kill) is left out. A line that is not JSON is a ``DataError`` naming the file and the line."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {number}: not a JSON record ({err}); expected one JSON object") from None
    return records


def logged_results(path: str, step: int) -> dict[str, dict[str, float]]:
    """The validation results of ``step`` in the validation log ``path``: ``{name: {metric: value}}`` ({} if none)."""
    return {
        r["task"]: {k: v for k, v in r.items() if k not in ("step", "task")}
        for r in read_jsonl(path)
        if r["step"] == step
    }


def truncate_log(path: str, last_step: int) -> list[dict[str, Any]]:
    """Drop the records after ``last_step`` from a JSON-lines log (steps a crashed run logged past its last checkpoint
    and a resumed run logs again); returns the kept records."""
    kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
    if os.path.isfile(path):
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A plain text table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), line, *(fmt.format(*map(str, r)) for r in rows)])

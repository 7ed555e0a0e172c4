"""The pretraining loop: one task per optimizer step, gradient accumulation, validation, logging, checkpoints.

Resume is exact: the DeepSpeed checkpoint holds the weights, optimizer and LR-scheduler state; its client state
holds the step and the data loader's state; each rank's RNG states sit beside it in ``rng_rank{r}.pt``. The
``latest`` pointer moves (temp file, then rename) only after every rank has written the whole checkpoint, so a
process killed while saving leaves the previous checkpoint as the one ``--resume`` loads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from uniter_fast.checkpoint import save_pretrained
from uniter_fast.data.loader import move_to_device
from uniter_fast.pretraining.checkpoint import load_consolidated_zero
from uniter_fast.pretraining.config import TrainingConfig
from uniter_fast.pretraining.validate import validate

logger = logging.getLogger(__name__)

CKPT_SUBDIR = "ckpt"
EXPORT_SUBDIR = "pretrained"
LATEST = "latest"  # the tag of the newest complete checkpoint (DeepSpeed's file name, read by its tools too)
STEP_LOG = "train_steps.jsonl"
VAL_LOG = "validation.jsonl"
RECENT = 20  # training steps per task averaged in the progress bar and the final table


class TaskStream(Protocol):
    """What the loop needs from the data side: an endless stream of (task name, batch), the same task for each
    whole accumulation cycle on every rank, with a resumable state."""

    def __iter__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: str, text: str) -> None:
    """``text`` into ``path`` via a temp file and a rename: readers see the old or the new content, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_output_dir(output_dir: str, rank: int) -> Any:
    """Create ``output_dir``; on rank 0 return a TensorBoard ``SummaryWriter`` on ``output_dir/tb`` (None elsewhere)."""
    os.makedirs(output_dir, exist_ok=True)
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(output_dir, "tb"))


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] if it does not exist)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_log(path: str, last_step: int) -> list[dict[str, Any]]:
    """Drop the records after ``last_step`` from a JSON-lines log (steps a crashed run logged past its last checkpoint
    and a resumed run logs again); returns the kept records."""
    kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
    if os.path.isfile(path):
        _write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A plain text table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), line, *(fmt.format(*map(str, r)) for r in rows)])


class Trainer:
    """Runs ``engine`` (a DeepSpeed engine around a UniterForPretraining) on ``stream`` for the configured steps."""

    progress_name = "pretrain"  # the progress bar's label
    validate_at_start = True  # validate the untrained model (the final table's step-0 column)

    def __init__(
        self,
        engine: Any,
        cfg: TrainingConfig,
        stream: TaskStream,
        val_loaders: Callable[[], dict[str, Iterable[dict]]],
        output_dir: str,
        writer: Optional[Any] = None,
    ) -> None:
        self.engine = engine
        self.cfg = cfg
        self.stream = stream
        self.val_loaders = val_loaders
        self.output_dir = output_dir
        self.ckpt_dir = os.path.join(output_dir, CKPT_SUBDIR)
        self.writer = writer
        self.step = 0
        self.rank = _rank()
        self.recent: dict[str, list[float]] = defaultdict(list)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """``engine.save_checkpoint`` (all ranks) with the step, the stream state and each rank's RNG states; then,
        once every rank is done, rank 0 points ``latest`` at it atomically. Returns the tag."""
        tag = f"step{self.step}"
        os.makedirs(os.path.join(self.ckpt_dir, tag), exist_ok=True)
        rng_path = os.path.join(self.ckpt_dir, tag, f"rng_rank{self.rank}.pt")
        torch.save(rng_state(), rng_path + ".tmp")
        os.replace(rng_path + ".tmp", rng_path)
        client = {"step": self.step, "stream": self.stream.state_dict()}
        self.engine.save_checkpoint(self.ckpt_dir, tag=tag, client_state=client, save_latest=False)
        _barrier()
        if self.rank == 0:
            _write_atomic(os.path.join(self.ckpt_dir, LATEST), tag)
        _barrier()
        return tag

    def resume(self) -> None:
        """Load the checkpoint that ``latest`` names and continue from its step; the logs keep their records up to
        that step."""
        latest = os.path.join(self.ckpt_dir, LATEST)
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt_dir} (no {LATEST!r} file)")
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        path, client = self.engine.load_checkpoint(self.ckpt_dir, tag=tag)
        if path is None:
            raise RuntimeError(f"--resume: DeepSpeed could not load checkpoint {tag!r} in {self.ckpt_dir}")
        self.step = int(client["step"])
        self.stream.load_state_dict(client["stream"])
        set_rng_state(torch.load(os.path.join(self.ckpt_dir, tag, f"rng_rank{self.rank}.pt"), weights_only=False))
        _barrier()  # every rank has read the logs' step before rank 0 rewrites them
        if self.rank == 0:
            truncate_log(os.path.join(self.output_dir, VAL_LOG), self.step)
            for record in truncate_log(os.path.join(self.output_dir, STEP_LOG), self.step):
                self.recent[record["task"]] = (self.recent[record["task"]] + [record["loss"]])[-RECENT:]
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ logging
    def _log_step(self, task: str, losses: dict[str, float], lr: float) -> None:
        if self.rank != 0:
            return
        record = {"step": self.step, "task": task, "lr": lr, **losses}
        with open(os.path.join(self.output_dir, STEP_LOG), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in losses.items():
                self.writer.add_scalar(f"train/{task}/{key}", value, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)

    def _log_validation(self, results: dict[str, dict[str, float]]) -> None:
        if self.rank != 0:
            return
        summary = ", ".join(f"{t}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()) for t, m in results.items())
        logger.info("step %d validation: %s", self.step, summary)
        with open(os.path.join(self.output_dir, VAL_LOG), "a", encoding="utf-8") as f:
            for task, metrics in results.items():
                f.write(json.dumps({"step": self.step, "task": task, **metrics}) + "\n")
        if self.writer is not None:
            for task, metrics in results.items():
                for key, value in metrics.items():
                    if math.isfinite(value):
                        self.writer.add_scalar(f"val/{task}/{key}", value, self.step)

    def run_validation(self) -> dict[str, dict[str, float]]:
        """Validate every task on this rank's shard of the validation sets (reduced over ranks)."""
        with torch.random.fork_rng(devices=[]):
            results = validate(self.engine, self.val_loaders(), lambda b: move_to_device(b, self.engine.device))
        self._log_validation(results)
        return results

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[tuple[str, dict]]) -> tuple[str, dict[str, float]]:
        """One optimizer step over the micro-batches of one accumulation cycle (all of one task); gradients are
        summed over the micro-batches as in the original. Returns (task, each loss term averaged over the
        micro-batches and the ranks), read back from the device once per step."""
        task = micro_batches[0][0]
        sums: dict[str, torch.Tensor] = {}
        for name, batch in micro_batches:
            if name != task:
                raise RuntimeError(f"one task per optimizer step: got {name!r} within a {task!r} cycle")
            out = self.engine(move_to_device(batch, self.engine.device), task)
            self.engine.backward(out["loss"], scale_wrt_gas=False)
            self.engine.step()
            for key, value in out.items():
                sums[key] = sums[key] + value.detach().float() if key in sums else value.detach().float()
        keys = sorted(sums)
        totals = torch.stack([sums[k] for k in keys])
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(totals)
        values = (totals / (len(micro_batches) * world)).tolist()
        losses = dict(zip(keys, values))
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(f"step {self.step + 1}, task {task}: non-finite loss {losses}")
        return task, losses

    def train(self, stop_after: Optional[int] = None) -> dict[str, dict[str, float]]:
        """Train to ``num_train_steps`` (validating and saving on schedule), save, validate, export; returns the final
        validation metrics. ``stop_after`` ends the run early at that step (checkpoint saved, no export), as an
        interruption would, without changing the LR schedule."""
        cfg = self.cfg
        last = cfg.num_train_steps if stop_after is None else min(stop_after, cfg.num_train_steps)
        accum = self.engine.gradient_accumulation_steps()
        stream = iter(self.stream)
        if self.step == 0 and self.validate_at_start:
            self.run_validation()  # the untrained model's figures, the baseline of the final table
        bar = tqdm(total=last, initial=self.step, desc=self.progress_name, disable=self.rank != 0, dynamic_ncols=True)
        while self.step < last:
            lr = self.engine.get_lr()[0]
            with torch.random.fork_rng(devices=[]):  # data loading must not move the RNG that dropout uses
                micro_batches = [next(stream) for _ in range(accum)]
            task, losses = self.train_step(micro_batches)
            self.step += 1
            self.recent[task] = (self.recent[task] + [losses["loss"]])[-RECENT:]
            self._log_step(task, losses, lr)
            bar.update(1)
            bar.set_postfix({t: f"{np.mean(v):.3f}" for t, v in sorted(self.recent.items())}, refresh=False)
            if self.step % cfg.valid_steps == 0 and self.step < last:
                self.run_validation()
            if self.step % cfg.save_steps == 0 and self.step < last:
                self.save()
        bar.close()
        tag = self.save()
        results = self.run_validation()
        if self.step == cfg.num_train_steps:
            self.export(tag)
        return results

    def export(self, tag: str) -> None:
        """Consolidated fp32 weights of checkpoint ``tag`` into ``output_dir/pretrained`` (rank 0)."""
        if self.rank == 0:
            module = self.engine.module
            if self.engine.zero_optimization_stage() > 0:
                fresh = type(module)(module.config, img_label_dim=module.region_classifier.output.out_features)
                load_consolidated_zero(fresh, self.ckpt_dir, tag)
                module = fresh
            save_pretrained(module, os.path.join(self.output_dir, EXPORT_SUBDIR), dtype=torch.float32)
        _barrier()

    def summary(self, results: dict[str, dict[str, float]]) -> str:
        """The final metrics table: per task, the mean training loss of its last steps, the validation loss at step 0
        (untrained) and now, and the other validation metrics (accuracy; mean OT distance of matched / mismatched
        pairs for ITM)."""
        first = {r["task"]: r for r in read_jsonl(os.path.join(self.output_dir, VAL_LOG)) if r["step"] == 0}
        extra = sorted({k for m in results.values() for k in m} - {"loss"})
        rows = []
        for task in sorted(set(results) | set(self.recent)):
            train = f"{np.mean(self.recent[task]):.4f}" if self.recent.get(task) else "-"
            val = results.get(task, {})
            start = f"{first[task]['loss']:.4f}" if task in first else "-"
            now = f"{val['loss']:.4f}" if "loss" in val else "-"
            rows.append([task, train, start, now, *(f"{val[k]:.4f}" if k in val else "-" for k in extra)])
        header = ["task", "train loss", "val loss step 0", "val loss", *(f"val {k}" for k in extra)]
        return format_table(rows, header)

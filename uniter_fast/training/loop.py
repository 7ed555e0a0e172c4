"""The training loop every recipe runs: one task per optimizer step, gradient accumulation, validation, logging,
checkpoints and an exact resume.

The recipe gives the loop a DeepSpeed engine, an endless stream of (task name, batch) pairs and two callables:
``validate(engine, step) -> {name: {metric: value}}`` (all ranks; the same results on every rank) and
``export(engine, checkpoint_dir, tag)`` (rank 0 writes the final weights of checkpoint ``tag``).

Resume is exact: the DeepSpeed checkpoint holds the weights, optimizer and LR-scheduler state; its client state holds
the step and the stream's state; each rank's RNG states sit beside it in ``rng_rank{r}.pt``. The ``latest`` pointer
moves (temp file, then rename) only after every rank has written the whole checkpoint, so a process killed while
saving leaves the previous checkpoint as the one ``--resume`` loads. Whatever a step logs (its training record, a
validation of that step) is written before the checkpoint of that step, so the logs of a resumed run keep exactly
the records up to its checkpoint and the run logs every later one again, as an uninterrupted run would. A run killed
after its last checkpoint (in the final validation, the export, or after) redoes the export on ``--resume``; one
killed before its first checkpoint starts again from step 0.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from uniter_fast.data.buckets import Buckets
from uniter_fast.data.loader import move_to_device
from uniter_fast.errors import ConfigError, RunFailed
from uniter_fast.files import atomic_write, write_text_atomic
from uniter_fast.training.adversarial import MicroStep, plain_step
from uniter_fast.training.capture import CapturedStep
from uniter_fast.training.config import RunConfig
from uniter_fast.training.distributed import barrier, rank_and_world
from uniter_fast.training.logs import STEP_LOG, VAL_LOG, append_jsonl, logged_results, truncate_log
from uniter_fast.training.rng import rng_state, set_rng_state
from uniter_fast.training.zero import clear_zero3_gradients

logger = logging.getLogger(__name__)

CKPT_SUBDIR = "ckpt"
LATEST = "latest"  # the tag of the newest complete checkpoint (DeepSpeed's file name, read by its tools too)
RECENT = 20  # training steps per task averaged in the progress bar and the final table

Results = dict[str, dict[str, float]]
Validate = Callable[[Any, int], Results]
Export = Callable[[Any, str, str], None]


def checkpoint_tag(step: int) -> str:
    """The tag (directory name under ``ckpt/``) of the checkpoint of ``step``."""
    return f"step{step}"


class TaskStream(Protocol):
    """What the loop needs from the data side: an endless stream of (task name, batch), the same task for each
    whole accumulation cycle on every rank, with a resumable state."""

    def __iter__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Trainer:
    """Runs ``engine`` on ``stream`` for ``cfg.num_train_steps`` optimizer steps, validating every
    ``cfg.valid_steps`` (and at step 0 with ``validate_at_start``) and checkpointing every ``cfg.save_steps``.
    ``micro_step(engine, batch, task)`` runs the forward(s) and backward(s) of one micro-batch (default
    :func:`~uniter_fast.training.adversarial.plain_step`; VILLA's adversarial step for an ``adversarial`` block).
    ``capture_tokens``: the packed tokens a micro-batch holds, which size the captured step's buckets
    (``Buckets.for_run``; default ``cfg.train_batch_size``, the token budget; the fine-tuning recipe gives it for a
    task whose ``train_batch_size`` counts examples)."""

    def __init__(
        self,
        engine: Any,
        cfg: RunConfig,
        stream: TaskStream,
        validate: Validate,
        export: Export,
        writer: Optional[Any] = None,
        progress_name: str = "train",
        validate_at_start: bool = False,
        micro_step: Optional[MicroStep] = None,
        capture_tokens: Optional[int] = None,
    ) -> None:
        self.engine, self.cfg, self.stream, self.writer = engine, cfg, stream, writer
        self.micro_step = micro_step or plain_step
        self.validate, self.export = validate, export
        self.progress_name, self.validate_at_start = progress_name, validate_at_start
        self.output_dir = cfg.output_dir
        self.ckpt_dir = os.path.join(cfg.output_dir, CKPT_SUBDIR)
        self.step = 0
        self.saved_step: Optional[int] = None  # the step of the newest complete checkpoint of this run
        self.rank = rank_and_world()[0]
        self.recent: dict[str, list[float]] = defaultdict(list)
        self.captured: Optional[CapturedStep] = None
        if cfg.capture and micro_step is not None:
            raise ConfigError(
                "capture replays the plain step's forward and backward: set capture false for a run "
                "with its own micro-batch step (an adversarial block)"
            )
        if cfg.capture:
            tokens = cfg.train_batch_size if capture_tokens is None else capture_tokens
            buckets = Buckets.for_run(cfg.max_txt_len, cfg.max_bb, cfg.num_bb, tokens)
            self.captured = CapturedStep(engine.module, engine.device, buckets, engine)

    def run_micro_batch(self, batch: dict, task: str) -> dict[str, torch.Tensor]:
        """The forward(s) and backward(s) of one host micro-batch; the forward's outputs. With ``cfg.capture`` the
        captured step's forward (fixed shapes, replayed) and the engine's backward, else ``micro_step`` on the
        device batch."""
        if self.captured is not None:
            out = self.captured(batch, task)
            self.engine.backward(out["loss"], scale_wrt_gas=False)
            return out
        return self.micro_step(self.engine, move_to_device(batch, self.engine.device), task)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        """``engine.save_checkpoint`` (all ranks) with the step, the stream state and each rank's RNG states; then,
        once every rank is done, rank 0 points ``latest`` at it atomically. Returns the tag."""
        tag = checkpoint_tag(self.step)
        os.makedirs(os.path.join(self.ckpt_dir, tag), exist_ok=True)
        state = rng_state()
        atomic_write(os.path.join(self.ckpt_dir, tag, f"rng_rank{self.rank}.pt"), lambda tmp: torch.save(state, tmp))
        client = {"step": self.step, "stream": self.stream.state_dict()}
        self.engine.save_checkpoint(self.ckpt_dir, tag=tag, client_state=client, save_latest=False)
        barrier()
        if self.rank == 0:
            write_text_atomic(os.path.join(self.ckpt_dir, LATEST), tag)
        barrier()
        self.saved_step = self.step
        return tag

    def resume(self) -> None:
        """Load the checkpoint that ``latest`` names and continue from its step; the logs keep their records up to
        that step. Without a complete checkpoint (a run killed before its first) the run starts again from step 0,
        its logs emptied."""
        latest = os.path.join(self.ckpt_dir, LATEST)
        if not os.path.isfile(latest):
            logger.warning("--resume: no complete checkpoint in %s yet; starting again from step 0", self.ckpt_dir)
            self._truncate_logs(-1)
            return
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        path, client = self.engine.load_checkpoint(self.ckpt_dir, tag=tag)
        if path is None:
            raise RuntimeError(f"--resume: DeepSpeed could not load checkpoint {tag!r} in {self.ckpt_dir}")
        self.step = self.saved_step = int(client["step"])
        self.stream.load_state_dict(client["stream"])
        set_rng_state(torch.load(os.path.join(self.ckpt_dir, tag, f"rng_rank{self.rank}.pt"), weights_only=False))
        self._truncate_logs(self.step)
        logger.info("resumed from %s at step %d", path, self.step)

    def _truncate_logs(self, step: int) -> None:
        """Rank 0 drops the log records after ``step`` (and takes the recent training losses from those it keeps)."""
        barrier()  # every rank has read the logs' step before rank 0 rewrites them
        if self.rank == 0:
            truncate_log(os.path.join(self.output_dir, VAL_LOG), step)
            for record in truncate_log(os.path.join(self.output_dir, STEP_LOG), step):
                self.recent[record["task"]] = (self.recent[record["task"]] + [record["loss"]])[-RECENT:]
        barrier()

    # ------------------------------------------------------------------ logging
    def _log_step(self, task: str, losses: dict[str, float], lr: float) -> None:
        if self.rank != 0:
            return
        append_jsonl(os.path.join(self.output_dir, STEP_LOG), [{"step": self.step, "task": task, "lr": lr, **losses}])
        if self.writer is not None:
            for key, value in losses.items():
                self.writer.add_scalar(f"train/{task}/{key}", value, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)

    def _log_validation(self, results: Results) -> None:
        if self.rank != 0:
            return
        summary = ", ".join(f"{t}: " + " ".join(f"{k}={v:.4f}" for k, v in m.items()) for t, m in results.items())
        logger.info("step %d validation: %s", self.step, summary)
        append_jsonl(
            os.path.join(self.output_dir, VAL_LOG),
            [{"step": self.step, "task": name, **metrics} for name, metrics in results.items()],
        )
        if self.writer is not None:
            for name, metrics in results.items():
                for key, value in metrics.items():
                    if math.isfinite(value):
                        self.writer.add_scalar(f"val/{name}/{key}", value, self.step)

    def run_validation(self) -> Results:
        """The recipe's validation (all ranks; the data loading inside must not move the training RNG), logged."""
        with torch.random.fork_rng(devices=[]):
            results = self.validate(self.engine, self.step)
        self._log_validation(results)
        return results

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[tuple[str, dict]]) -> tuple[str, dict[str, float]]:
        """One optimizer step over the micro-batches of one accumulation cycle (all of one task); gradients are
        summed over the micro-batches as in the original. Returns (task, each loss term averaged over the
        micro-batches and the ranks), read back from the device once per step."""
        task = micro_batches[0][0]
        sums: dict[str, torch.Tensor] = {}
        # under ZeRO-3 the parameters this task does not reach get a zero gradient, as under ZeRO-1/2
        if self.engine.zero_optimization_partition_weights():
            clear_zero3_gradients(self.engine)
        for name, batch in micro_batches:
            if name != task:
                raise RuntimeError(f"one task per optimizer step: got {name!r} within a {task!r} cycle")
            out = self.run_micro_batch(batch, task)
            self.engine.step()
            for key, value in out.items():
                sums[key] = sums[key] + value.detach().float() if key in sums else value.detach().float()
        keys = sorted(sums)
        totals = torch.stack([sums[k] for k in keys])
        world = rank_and_world()[1]
        if world > 1:
            dist.all_reduce(totals)
        values = (totals / (len(micro_batches) * world)).tolist()
        losses = dict(zip(keys, values))
        if not all(math.isfinite(v) for v in values):
            raise RunFailed(f"step {self.step + 1}, task {task}: non-finite loss {losses}")
        return task, losses

    def train(self, stop_after: Optional[int] = None) -> Results:
        """Train to ``num_train_steps`` (validating and saving on schedule), validate, save, export; returns the final
        validation metrics. ``stop_after`` ends the run early at that step (checkpoint saved, no export), as an
        interruption would, without changing the LR schedule. A run resumed at its last step validated and saved
        that step before: its results are read back from the validation log, and only the export is done again."""
        cfg = self.cfg
        if stop_after is not None and stop_after < self.step:
            raise ConfigError(f"--stop_after {stop_after} lies before step {self.step}, where the run resumed")
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
        if self.saved_step == self.step:
            results = logged_results(os.path.join(self.output_dir, VAL_LOG), self.step) or self.run_validation()
            tag = checkpoint_tag(self.step)
        else:
            results = self.run_validation()
            tag = self.save()
        if self.step == cfg.num_train_steps:
            if self.rank == 0:
                self.export(self.engine, self.ckpt_dir, tag)
            barrier()
        return results

"""Ranks: the process-group environment, rank start-up (threads, DeepSpeed's process group, logging, seeds), and the
rank/barrier/lockstep helpers every floor above uses (validation, task evaluation, retrieval scoring)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from uniter_fast.training.rng import seed_everything


def setup_environment() -> None:
    """Make ``python pretrain.py`` work like a launcher-started rank 0 of 1, and pick the CPU accelerator of DeepSpeed
    when there is no GPU (must run before ``import deepspeed``)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        defaults["MASTER_PORT"] = str(port)
        for key, value in defaults.items():
            os.environ.setdefault(key, value)


def launch_rank() -> int:
    """This process's rank as its launcher set it (``RANK``: deepspeed, torchrun), readable before any process group
    exists; 0 without a launcher."""
    return int(os.environ.get("RANK", "0"))


def launch_world() -> int:
    """The world size as the launcher set it (``WORLD_SIZE``), readable before any process group exists; 1 without
    a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_ranks(seed: int, num_workers: Optional[int]) -> tuple[int, int, int]:
    """After ``setup_environment``: one PyTorch thread per CPU rank (unless ``OMP_NUM_THREADS`` is set; more threads
    oversubscribe the cores, 10x slower on a shared machine), DeepSpeed's process group, warnings-only logging off
    rank 0, every RNG seeded. Returns (rank, world size, loader workers: ``num_workers``, else 2 on GPU, 0 on CPU)."""
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    seed_everything(seed)
    workers = num_workers if num_workers is not None else (2 if torch.cuda.is_available() else 0)
    return rank, world, workers


SHM_WORKSPACE = "/dev/shm/deepspeed_allreduce_buffer"
"""DeepSpeed's CPU accelerator maps one shared-memory workspace per rank for its all-reduce
(``deepspeed/ops/csrc/cpu/comm/shm.cpp``: ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``,
64 MiB each, when every rank is on one machine) and never unlinks it, so every CPU run would leave its ranks' files
in /dev/shm (RAM) behind."""


def release_shm_workspace() -> None:
    """Unlink this rank's DeepSpeed shared-memory workspace name (:data:`SHM_WORKSPACE`), once every rank is past the
    process group's start-up (each rank maps its peers' workspaces there; the barrier makes sure): the mappings stay
    valid, and the memory goes back when the last rank exits, also a killed one. No-op where there is none (a CUDA
    run, ranks on several machines)."""
    if not dist.is_available() or not dist.is_initialized():
        return
    barrier()
    rank = dist.get_rank()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{SHM_WORKSPACE}_{os.getuid()}_{addr}_{port}_{rank}")


def init_launched_process_group() -> tuple[int, int]:
    """(rank, world size): the launcher's process group when started by ``torchrun`` with several ranks (created
    here if needed: NCCL on GPU, gloo on CPU), else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank_and_world()


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def lockstep(loader: Iterable[dict], device: torch.device) -> Iterator[tuple[dict, bool]]:
    """(batch, counts) pairs until every rank is out of batches; a rank that ran out early repeats its last batch
    with ``counts`` False, so that all ranks run the same number of forwards (ZeRO-3 gathers weights in each). One
    process alone yields its batches as they come (no per-batch flag through the device, which would wait for the
    device's queue)."""
    if not is_distributed():
        yield from ((batch, True) for batch in loader)
        return
    batches, last = iter(loader), None
    while True:
        batch = next(batches, None)
        more = torch.tensor([batch is not None], dtype=torch.int64, device=device)
        if is_distributed():
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not bool(more):
            return
        if batch is None and last is None:
            raise RuntimeError("this rank has no validation batch while others do; use a larger validation set")
        if batch is not None:
            last = batch
        yield last, batch is not None

"""Task mixing as the original ``MetaLoader`` (``data/loader.py``): one task per optimizer step, drawn with
probability proportional to its mix ratio, every micro-batch of that step from the same task.

The draw of step s uses a generator seeded by (seed, s), so all ranks draw the same task without communication
and a resumed run repeats the original sequence. State = (step, micro-batches done in that step, loader states).

An optional curriculum (``phases``: (first step, mix ratios) pairs) changes the ratios at fixed steps; the draw of
step s still depends only on (seed, s) and the phase that holds s, so resuming inside or across a phase is exact.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from uniter_fast.data.loader import TaskLoader


class MetaLoader:
    """Yields (task_name, batch) forever from ``loaders`` (name -> TaskLoader, e.g. "mlm_coco").

    ``mix_ratios`` (name -> positive weight; default 1 each) and ``grad_accum_steps`` micro-batches per step.
    ``phases`` (optional, replaces ``mix_ratios``): ``[(first_step, ratios), ...]`` with first steps 0, then strictly
    increasing (0-based optimizer steps); each phase's ratios name a non-empty subset of the loaders (the others are
    not drawn in it), and the last phase runs forever.
    """

    def __init__(
        self,
        loaders: Mapping[str, TaskLoader],
        mix_ratios: Optional[Mapping[str, float]] = None,
        grad_accum_steps: int = 1,
        seed: int = 42,
        phases: Optional[Sequence[tuple[int, Mapping[str, float]]]] = None,
    ) -> None:
        if not loaders:
            raise ValueError("loaders must name at least one task loader")
        ratios = dict(mix_ratios) if mix_ratios is not None else {name: 1.0 for name in loaders}
        if set(ratios) != set(loaders):
            raise ValueError(f"mix_ratios keys {sorted(ratios)} must equal the loader names {sorted(loaders)}")
        if any(not r > 0 for r in ratios.values()):
            raise ValueError(f"mix_ratios must be positive, got {ratios}")
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        self.loaders = dict(loaders)
        self.names = list(self.loaders)
        self.phase_starts, self.phase_probs = [0], [self._probs(ratios)]
        if phases is not None:
            starts = [int(start) for start, _ in phases]
            if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
                raise ValueError(f"phases must start at step 0 with strictly increasing first steps, got {starts}")
            for start, phase_ratios in phases:
                unknown = sorted(set(phase_ratios) - set(self.loaders))
                if not phase_ratios or unknown:
                    raise ValueError(
                        f"phase at step {start}: ratios must name some of the loaders {self.names}, got "
                        f"{dict(phase_ratios)}"
                    )
                if any(not r > 0 for r in phase_ratios.values()):
                    raise ValueError(f"phase at step {start}: ratios must be positive, got {dict(phase_ratios)}")
            self.phase_starts = starts
            self.phase_probs = [self._probs(phase_ratios) for _, phase_ratios in phases]
        self.grad_accum_steps, self.seed = grad_accum_steps, seed
        self.step, self.micro = 0, 0
        self._iters: dict[str, Iterator[Any]] = {}

    def _probs(self, ratios: Mapping[str, float]) -> np.ndarray:
        weights = np.array([ratios.get(n, 0.0) for n in self.names], dtype=np.float64)
        return weights / weights.sum()

    def draw(self, step: int) -> str:
        """The task of 0-based optimizer step ``step`` (same on every rank; ratios of the phase holding ``step``)."""
        probs = self.phase_probs[int(np.searchsorted(self.phase_starts, step, side="right")) - 1]
        return self.names[int(np.random.default_rng([self.seed, step]).choice(len(self.names), p=probs))]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while True:
            name = self.draw(self.step)
            while self.micro < self.grad_accum_steps:
                if name not in self._iters:
                    self._iters[name] = iter(self.loaders[name])
                batch = next(self._iters[name])
                self.micro += 1
                yield name, batch
            self.step, self.micro = self.step + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Counters of the mixer and of every task loader (plain ints; JSON/torch.save friendly)."""
        return {
            "step": self.step,
            "micro": self.micro,
            "seed": self.seed,
            "loaders": {name: loader.state_dict() for name, loader in self.loaders.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the next item is the one an uninterrupted run would yield next."""
        if set(state["loaders"]) != set(self.loaders):
            raise ValueError(f"state has loaders {sorted(state['loaders'])}, this mixer has {sorted(self.loaders)}")
        self.step, self.micro, self.seed = int(state["step"]), int(state["micro"]), int(state["seed"])
        for name, loader_state in state["loaders"].items():
            self.loaders[name].load_state_dict(loader_state)
        self._iters = {}

"""Task mixing as the original ``MetaLoader`` (uniter.md §3.5): one task per optimizer step, drawn with
probability proportional to its mix ratio, every micro-batch of that step from the same task.

The draw of step s uses a generator seeded by (seed, s), so all ranks draw the same task without communication
and a resumed run repeats the original sequence. State = (step, micro-batches done in that step, loader states).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import numpy as np

from uniter_fast.data.loader import TaskLoader


class MetaLoader:
    """Yields (task_name, batch) forever from ``loaders`` (name -> TaskLoader, e.g. "mlm_coco").

    ``mix_ratios`` (name -> positive weight; default 1 each) and ``grad_accum_steps`` micro-batches per step.
    """

    def __init__(
        self,
        loaders: Mapping[str, TaskLoader],
        mix_ratios: Optional[Mapping[str, float]] = None,
        grad_accum_steps: int = 1,
        seed: int = 42,
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
        weights = np.array([ratios[n] for n in self.names], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.grad_accum_steps, self.seed = grad_accum_steps, seed
        self.step, self.micro = 0, 0
        self._iters: dict[str, Iterator[Any]] = {}

    def draw(self, step: int) -> str:
        """The task of optimizer step ``step`` (same on every rank)."""
        return self.names[int(np.random.default_rng([self.seed, step]).choice(len(self.names), p=self.probs))]

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

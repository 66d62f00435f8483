"""Optional private random generator for methods that draw random numbers each step."""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class SeededRandomness:
    """Mixin: ``self._generator`` is ``None`` (torch's global generator, governed by
    ``seed_everything``) or a private ``torch.Generator`` seeded by the ``seed`` hyperparameter,
    whose state goes into the method's ``state_dict``."""

    name: ClassVar[str]  # the method's name, a class constant (as on Method)
    _generator: torch.Generator | None

    def _init_generator(self, seed: int | None) -> None:
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)

    def _get_state(self) -> dict[str, Any]:
        return {} if self._generator is None else {"generator": self._generator.get_state()}

    def _set_state(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            if self._generator is None:
                raise ValueError(
                    f"{self.name}: state has a generator but this instance has no seed"
                )
            self._generator.set_state(state["generator"])

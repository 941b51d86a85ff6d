"""Server strategies: how the cloud steps its master along a round's aggregated delta, chosen by name.

  fedavgm        master += lr * v, v = momentum * v + delta (Hsu et al. 2019); momentum 0 and lr 1
                 is plain FedAvg
  fedadam[:TAU]  Adam on the pseudo-gradient delta (Reddi et al. 2021, "Adaptive Federated
                 Optimization"): m = b1 m + (1 - b1) delta, v = b2 v + (1 - b2) delta^2,
                 master += lr * m / (sqrt(v) + tau)
  fedyogi[:TAU]  the same with Yogi's additive second moment, v -= (1 - b2) delta^2 sign(v - delta^2),
                 which grows more slowly when updates get large

The adaptive ones normalize each coordinate by its own history, so a layer whose updates are
small (or sent rarely, as top-k makes them) still moves; that is also why their lr is much smaller
than FedAvg's 1 (lr is the largest step a coordinate takes, about). Every strategy keeps its state as
named arrays (`state`), which is what a checkpoint stores and a resumed coordinator loads back.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from pqsu.protocol.errors import PqsuError


class StrategyError(PqsuError):
    """An unknown server strategy name or option."""


class AggregationError(PqsuError):
    """A bad aggregator name or option, or an aggregate the master must not take."""


@dataclass
class ServerStrategy(ABC):
    lr: float = 1.0
    # "<slot>/<tensor>" (or "<tensor>" for FedAvgM's velocity) -> array
    state: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def step(self, master: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> None:
        """Update `master` in place. Non-finite results are refused before anything is written."""
        new_w, new_state = self._propose(master, delta)
        if not all(np.isfinite(w).all() for w in new_w.values()):
            raise AggregationError("aggregated update is not finite; the master model is left unchanged")
        for k, w in new_w.items():
            master[k][...] = w
        self.state = {k: np.asarray(v, np.float32) for k, v in new_state.items()}

    @abstractmethod
    def _propose(self, master: dict[str, np.ndarray], delta: dict[str, np.ndarray]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(new weights, new state) for this delta, without touching either."""

    # the checkpoint's name for the state, kept from when momentum was the only one
    @property
    def velocity(self) -> dict[str, np.ndarray]:
        return self.state

    @velocity.setter
    def velocity(self, value: dict[str, np.ndarray]) -> None:
        self.state = dict(value)


@dataclass
class FedAvgM(ServerStrategy):
    momentum: float = 0.0

    def _propose(self, master, delta):
        if not self.momentum:
            return {k: master[k] + self.lr * d for k, d in delta.items()}, {}
        v = {k: self.momentum * self.state.get(k, 0.0) + d for k, d in delta.items()}
        return {k: master[k] + self.lr * x for k, x in v.items()}, v


@dataclass
class FedAdam(ServerStrategy):
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def _second(self, v: np.ndarray | float, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * d2

    def _propose(self, master, delta):
        new_w, state = {}, {}
        for k, d in delta.items():
            m = self.beta1 * self.state.get(f"m/{k}", 0.0) + (1 - self.beta1) * d
            v = self._second(self.state.get(f"v/{k}", np.zeros_like(d)), np.square(d))
            new_w[k] = master[k] + self.lr * m / (np.sqrt(v) + self.tau)
            state[f"m/{k}"], state[f"v/{k}"] = m, v
        return new_w, state


@dataclass
class FedYogi(FedAdam):
    def _second(self, v, d2):
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)


STRATEGIES = {"fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi}


def check_strategy(spec: str) -> None:
    make_strategy(spec)


def make_strategy(spec: str, lr: float = 1.0, momentum: float = 0.0) -> ServerStrategy:
    """`fedavgm` (uses `momentum`), `fedadam[:TAU]` or `fedyogi[:TAU]`; `lr` is the server learning rate."""
    name, _, arg = str(spec).strip().partition(":")
    if name not in STRATEGIES:
        raise StrategyError(f"unknown server strategy {spec!r}; choose one of: fedavgm, fedadam[:TAU], fedyogi[:TAU]")
    if name == "fedavgm":
        if arg:
            raise StrategyError(f"fedavgm takes no option (set --server-momentum), got {spec!r}")
        return FedAvgM(lr=lr, momentum=momentum)
    try:
        tau = float(arg) if arg else 1e-3
    except ValueError:
        tau = -1.0
    if not tau > 0:
        raise StrategyError(f"{name}:TAU needs a tau > 0 (the adaptivity floor), got {spec!r}")
    return STRATEGIES[name](lr=lr, tau=tau)

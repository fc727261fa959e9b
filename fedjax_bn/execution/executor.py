"""The executor interface: what every executor gives a round, and the one result type.

An executor runs one round of a cohort of ``C`` clients (the whole population, or a sampled
cohort) of one :class:`~fedjax_bn.algorithms.Algorithm`, through its pure client functions.
Executors differ only in how the clients run (``registry.py`` lists them); a round
(``round.py``, ``cohort.py``) talks to them through this interface alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from fedjax_bn.algorithms.base import FedState
from fedjax_bn.client import accuracy_of
from fedjax_bn.data import ClientArrays

Array = jax.Array


class RoundResult(NamedTuple):
    """Per-slot training metrics of one round (each ``[C]``): mean loss, each task metric's
    mean (``metrics[name]``), examples seen; ``quarantined`` marks clients whose update or loss
    was not finite (dropped from the aggregation, state not written); ``clients`` the slots'
    population ids (``arange(C)`` when every client trains; in a cohort round sorted, an id
    equal to the population size ``N`` is an empty slot); ``uplink_bytes`` what each slot sent
    (0 where it took no step), ``downlink_bytes`` what it received (0 for an empty slot), int32,
    from shapes alone (``fedjax_bn/compress/wire.py``), filled in by the round functions."""

    loss: Array
    metrics: dict[str, Array]
    num_seen: Array
    quarantined: Array
    clients: Array
    uplink_bytes: Array | None = None
    downlink_bytes: Array | None = None

    @property
    def accuracy(self) -> Array:
        """The ``accuracy`` metric (NaN where the task has none)."""
        return accuracy_of(self)


class Executor(Protocol):
    """Runs one round of a cohort whose host-side sizes are ``sizes``.

    ``batches``: a given batch order (``batches.batches_from_order``) instead of the shuffle by
    ``key``; ``budget``: each client's most local steps (host int32 ``[C]``,
    ``fedjax_bn.budgets``), None: no limit; ``ids``: the slots' population ids, which key their
    steps' randomness and come back as ``RoundResult.clients`` (None: ``0..C-1``).
    """

    exact_sizes: bool
    """Whether its compiled programs depend on the clients' exact sizes (a cohort round then
    passes them as they are) or only on bounds of them (a cohort round passes canonical
    bucketed sizes, so that a round compiles once per bucket: ``cohort.plan_sizes``)."""

    def __call__(
        self,
        state: FedState,
        train: ClientArrays,
        key: Array,
        sizes: tuple[int, ...],
        batches: Any = None,
        budget: np.ndarray | None = None,
        ids: np.ndarray | None = None,
    ) -> tuple[FedState, RoundResult]: ...

    def padded_fraction(self, sizes: tuple[int, ...], n_max: int) -> float:
        """Share of the client-steps it runs that are masked no-ops (budgets not counted)."""
        ...

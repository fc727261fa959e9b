"""The runner's evaluation of a population: sampled clients, seen vs unseen, held-out clients.

Under partial participation (``config.cohort_size``) some clients have never trained when an
evaluation comes; under a local-BN policy (fedbn, silobn) their BN layers are still the initial
ones (``docs/execution.md``, "Clients that never trained"). An evaluation row reports the
clients that have trained (``seen_acc``) and those that have not (``unseen_acc``) apart, and
with ``config.adapt_bn`` the unseen ones again after AdaBN on their own training images
(``unseen_adapted_acc``). ``config.held_out`` keeps the partition's last clients out of the
population altogether: they are evaluated as newcomers (``held_out_acc``; after AdaBN
``held_out_adapted_acc``). ``config.eval_clients`` evaluates a seeded sample of clients at
intermediate evaluations and every client at the last round, one client's model at a time.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import jax
import numpy as np

import fedjax_bn as fb
from fedjax_bn.adapt import adapt_variables, new_client_variables
from fedjax_bn.data import FederatedData


def split_held_out(
    data: FederatedData, held_out: int
) -> tuple[FederatedData, FederatedData | None]:
    """The population (the first clients) and the ``held_out`` last clients, never trained."""
    if held_out == 0:
        return data, None
    num = data.num_clients - held_out

    def part(sl: slice) -> FederatedData:
        train, test = (jax.tree.map(lambda a: a[sl], arrays) for arrays in (data.train, data.test))
        return data.replace(train=train, test=test, domains=data.domains[sl])

    return part(slice(0, num)), part(slice(num, None))


def eval_ids(num_clients: int, sample: int, seed: int, rnd: int, final: bool) -> np.ndarray:
    """The clients an evaluation covers: every one at the last round or when ``sample`` is 0,
    else ``sample`` of them drawn with ``(seed, rnd)`` (the same on a resumed run)."""
    if final or sample == 0 or sample >= num_clients:
        return np.arange(num_clients)
    rng = np.random.default_rng([seed, rnd])
    return np.sort(rng.choice(num_clients, sample, replace=False))


def _mean(values: np.ndarray, keep: np.ndarray) -> float | None:
    return float(np.mean(values[keep])) if keep.any() else None


def held_out_metrics(
    alg: fb.Algorithm, state: Any, population: FederatedData, held: FederatedData, batch: int
) -> dict[str, float]:
    """Mean test accuracy of the held-out clients with the newcomer's model
    (:func:`~fedjax_bn.adapt.new_client_variables`), before and after AdaBN on their images."""
    start = new_client_variables(alg, state, population.train.n)
    plain, adapted = [], []
    for c in range(held.num_clients):
        x, y = held.test.client(c)
        if len(y) == 0:
            continue
        plain.append(fb.evaluate_model(alg.model, start, x, y, batch).accuracy)
        own = adapt_variables(alg.model, start, held.train.client(c)[0])
        adapted.append(fb.evaluate_model(alg.model, own, x, y, batch).accuracy)
    if not plain:
        return {}
    return {"held_out_acc": float(np.mean(plain)), "held_out_adapted_acc": float(np.mean(adapted))}


def evaluate_population(
    alg: fb.Algorithm,
    state: Any,
    population: FederatedData,
    held: FederatedData | None,
    seen: Collection[int],
    *,
    ids: np.ndarray,
    adapt: bool,
    batch: int,
) -> dict[str, Any]:
    """One evaluation row's client fields: ``client_acc`` over ``ids`` (each client's own in
    ``client_accs``, ``{id: accuracy}``, clients with test data only), split into seen and
    unseen clients, the unseen again after AdaBN (``adapt``, local-BN policies only), and the
    held-out clients."""
    clients = fb.evaluate_clients(alg, state, population, batch, clients=ids)
    was_seen = np.isin(ids, np.fromiter(seen, np.int64, len(seen)))
    has = clients.count > 0
    row: dict[str, Any] = {
        "client_acc": clients.mean_accuracy,
        "client_accs": dict(
            zip(map(str, ids[has]), map(float, clients.accuracy[has]), strict=True)
        ),
        "eval_clients": len(ids),
        "seen_clients": len(seen),
        "seen_acc": _mean(clients.accuracy, was_seen & has),
        "unseen_acc": _mean(clients.accuracy, ~was_seen & has),
    }
    unseen = ids[~was_seen & has]
    if adapt and alg.policy != "fedavg" and unseen.size:
        adapted = fb.evaluate_clients(
            alg, state, population, batch, clients=unseen, adapt=set(unseen.tolist())
        )
        row["unseen_adapted_acc"] = adapted.mean_accuracy
    if held is not None:
        row.update(held_out_metrics(alg, state, population, held, batch))
    return row

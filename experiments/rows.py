"""One round's history row (flax examples' metrics, in a dict): training loss and metrics over
the clients that counted, BN divergences from the monitor, and the evaluation columns when due.

``experiments/train.py`` builds one per round of a run, alone or batched with other runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np

import fedjax_bn as fb
from experiments import evaluation, history, registry
from fedjax_bn import monitor
from fedjax_bn.recalibrate import recalibrate_bn

if TYPE_CHECKING:
    from experiments.train import Run

Config = ml_collections.ConfigDict
Row = history.Row


def _mean_by(values: Any, weights: Any) -> float:
    values, weights = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    return float(np.sum(values * weights) / max(np.sum(weights), 1.0))


def task_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A result's task metrics other than accuracy (which has its own ``*_acc`` columns); each
    becomes ``train_<name>`` and ``global_<name>`` history columns."""
    return {k: v for k, v in metrics.items() if k != "accuracy"}


def _floats(per_layer: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in per_layer.items()}


def eval_state(config: Config, alg_name: str, alg: fb.Algorithm, state: Any, data: Any) -> Any:
    """The state evaluation sees: with exact BN recalibration over the clients' training data
    (``config.recalibrate``, or an algorithm in ``registry.RECALIBRATED``) where the policy has
    global statistics (fedavg); the training state itself is never changed."""
    wanted = config.recalibrate or alg_name in registry.RECALIBRATED
    if not wanted or alg.policy != "fedavg":
        return state
    return recalibrate_bn(alg, state, data, batch_size=config.eval_batch_size)


def monitor_view(
    state: Any, x_probe: Any, mask_probe: Any, ids: np.ndarray, config: Config
) -> tuple[Any, Any, Any]:
    """What the BN monitor compares: every client, or in a cohort run the round's cohort only
    (its divergences are pairwise, O(K^2) instead of O(N^2); an empty slot repeats the last
    client, keeping the shape, and so the compiled monitor, fixed)."""
    if not config.cohort_size:
        return state, x_probe, mask_probe
    rows = np.minimum(ids, len(x_probe) - 1)
    clients = jax.device_put(jax.tree.map(lambda a: a[rows], state.clients))
    return state._replace(clients=clients), x_probe[rows], mask_probe[rows]


def round_row(
    run: Run, config: Config, probe: tuple[Any, Any], state: Any, result: Any, seconds: float
) -> Row:
    """One round's history row from its result: training loss and metrics over the clients
    that were not quarantined (weighted by examples seen), the cohort, BN divergences; the
    evaluation columns are None until :func:`evaluate_row` fills them. ``uplink_bytes``: what
    the clients that trained sent; ``downlink_bytes``: the broadcast to the cohort (from
    the round result, ``fedjax_bn/compress/wire.py``)."""
    ids = np.asarray(result.clients)
    div = run.measure(*monitor_view(state, *probe, ids, config))
    weights = result.num_seen * ~result.quarantined
    row: Row = {
        "train_loss": _mean_by(result.loss, weights),
        "train_acc": _mean_by(result.accuracy, weights),
        "global_acc": None,
        "global_loss": None,
        "client_acc": None,
        "quarantined": [int(ids[c]) for c in np.flatnonzero(np.asarray(result.quarantined))],
        "cohort": [int(c) for c in ids if c < run.data.num_clients],
        "bn_div": float(monitor.mean_over_layers(div["bn"])),
        "bn_div_source": monitor.stats_source(state),
        "probe_div": float(monitor.mean_over_layers(div["probe"])),
        "affine_div": float(monitor.mean_over_layers(div["affine"])),
        "bn_div_layers": _floats(div["bn"]),
        "probe_div_layers": _floats(div["probe"]),
        "affine_div_layers": _floats(div["affine"]),
        "seconds": seconds,
    }
    if run.attack is not None:
        row.update(run.attack.record())
    for name, values in task_metrics(result.metrics).items():  # beyond accuracy
        row.update({f"train_{name}": _mean_by(values, weights), f"global_{name}": None})
    for name, per_slot in (
        ("uplink_bytes", result.uplink_bytes),
        ("downlink_bytes", result.downlink_bytes),
    ):
        row[name] = int(np.sum(np.asarray(per_slot), dtype=np.int64))
    return row


def evaluate_row(
    run: Run, config: Config, alg_name: str, state: Any, seen: set[int], rnd: int
) -> Row:
    """The evaluation columns of round ``rnd``: the global model on the test data (where the
    policy has one) and the population's clients (own, seen, held out; see evaluation.py)."""
    evaluated = eval_state(config, alg_name, run.alg, state, run.data)
    row: Row = {}
    glob = fb.evaluate_global(run.alg, evaluated, run.data, config.eval_batch_size)
    if glob is not None:
        row.update(global_acc=glob.accuracy, global_loss=glob.loss)
        row.update({f"global_{k}": v for k, v in task_metrics(glob.metrics).items()})
    final = rnd == config.rounds
    ids = evaluation.eval_ids(run.data.num_clients, config.eval_clients, run.seed, rnd, final)
    population = evaluation.evaluate_population(
        run.alg,
        evaluated,
        run.data,
        run.held,
        seen,
        ids=ids,
        adapt=config.adapt_bn,
        batch=config.eval_batch_size,
    )
    return {**row, **population}

"""One training run, in the shape of flax's examples: build what the run needs once
(:func:`build_run`: the algorithm, its round function and the monitor), then rounds,
each turned into one history row (:func:`round_row`, :func:`evaluate_row`) handed to the metric
writers (``experiments/writers.py``).

All federated logic is the library's; this module wires a config to it.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

import fedjax_bn as fb
from experiments import attacks, evaluation, history, privacy, registry, writers
from fedjax_bn import monitor
from fedjax_bn.algorithms import model_parts
from fedjax_bn.checkpoint import Checkpointer
from fedjax_bn.data import FederatedData
from fedjax_bn.recalibrate import recalibrate_bn

Config = ml_collections.ConfigDict
Row = history.Row
ConfigError = registry.ConfigError


class Seeds(NamedTuple):
    """Independent seeds derived from one experiment seed."""

    init: int
    data: int
    shuffle: int


def derive_seeds(seed: int) -> Seeds:
    """Model init, data partition and client shuffling seeds, independent of each other."""
    init, data, shuffle = np.random.SeedSequence(seed).generate_state(3)
    return Seeds(int(init), int(data) % 2**31, int(shuffle))


class Run(NamedTuple):
    """Everything one (setting, algorithm, seed) run trains and measures with, built once."""

    alg: fb.Algorithm
    round_fn: Any
    measure: Any  # jitted monitor.round_divergences of alg
    data: FederatedData  # the training clients (held-out ones removed)
    held: Any  # the held-out clients, or None
    seed: int  # the experiment seed
    seeds: Seeds  # derived from it
    epsilons: Any = None  # DP runs: epsilon after each round (privacy.epsilons), else None
    attack: attacks.Attack | None = None  # config.attack, with its attackers; None: no attack


def cohort_sampler(config: Config, num_clients: int) -> Any:
    """The configured sampler: a name ``make_round`` knows, or ``available`` with every
    client online with probability ``config.availability``."""
    if config.sampler != "available":
        return config.sampler
    probabilities = np.full(num_clients, config.availability, np.float32)
    return functools.partial(fb.sampling.available, probabilities=probabilities)


def step_budget(config: Config) -> fb.budgets.Budget | None:
    """Stragglers: each client's local steps drawn per round uniformly from
    ``[config.budget_min_steps, config.budget_max_steps]``; None when both are 0."""
    low, high = config.budget_min_steps, config.budget_max_steps
    return fb.budgets.uniform_steps(low, high) if high else None


def make_round_fn(config: Config, alg: fb.Algorithm, num_clients: int) -> Any:
    """The configured round function of ``alg`` over ``num_clients`` (all of the config's
    execution fields are read here and only here)."""
    cohort_size, sampler = config.cohort_size or None, cohort_sampler(config, num_clients)
    if privacy.enabled(config):  # Poisson or fixed-size cohorts the accountant can reason about
        cohort_size, sampler = privacy.sampler(config)
    return fb.make_round(
        alg,
        executor=config.executor,
        batch_size=config.batch_size,
        local_epochs=config.local_epochs,
        client_threads=config.client_threads or None,
        cohort_size=cohort_size,
        sampler=sampler,
        budget=step_budget(config),
        donate_state=bool(cohort_size),  # O(K) state writes a round, not O(N)
    )


def build_run(config: Config, data: FederatedData, alg_name: str, seed: int) -> Run:
    """Build one run; a factory's ValueError (a bad hyperparameter) becomes a ConfigError, so
    every run is checked before anything trains or is written."""
    seeds = derive_seeds(seed)
    data, held = evaluation.split_held_out(data, config.held_out)
    shape = jax.tree.leaves(data.train.sample_x())[0].shape[1:]
    try:
        model = registry.build_model(config, data.num_classes, shape, seed=seeds.init)
        tx = registry.build_optimizer(config)
        alg = registry.build_algorithm(alg_name, model, tx, config)
        alg, data, attack = attacks.prepare(config, alg, data, seed)
        round_fn = make_round_fn(config, alg, data.num_clients)
    except ConfigError:
        raise
    except ValueError as e:  # e.g. mu < 0, an executor option it does not take
        raise ConfigError(f"{alg_name}: {e}") from e
    measure = jax.jit(functools.partial(monitor.round_divergences, alg))
    epsilons = privacy.epsilons(config, config.rounds) if privacy.enabled(config) else None
    return Run(alg, round_fn, measure, data, held, seed, seeds, epsilons, attack)


def _mean_by(values: Any, weights: Any) -> float:
    values, weights = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    return float(np.sum(values * weights) / max(np.sum(weights), 1.0))


def task_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A result's task metrics other than accuracy (which has its own ``*_acc`` columns); each
    becomes ``train_<name>`` and ``global_<name>`` history columns."""
    return {k: v for k, v in metrics.items() if k != "accuracy"}


def _floats(per_layer: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in per_layer.items()}


def checkpoint_dir(out: Path, setting: str, alg_name: str, seed: int) -> Path:
    """Where one run's checkpoints live."""
    return out / "checkpoints" / f"{setting}__{alg_name}__seed{seed}"


def tensorboard_dir(out: Path, setting: str, alg_name: str, seed: int) -> Path:
    """Where one run's TensorBoard events live (``tensorboard --logdir <out>/tensorboard``)."""
    return out / "tensorboard" / f"{setting}__{alg_name}__seed{seed}"


def resume_point(
    path: Path, ckpt: Checkpointer, like: Any, key: jax.Array, rounds: int
) -> tuple[int, Any, jax.Array, list[Row]]:
    """``(rounds done, state, key, rows)`` to continue a run from: its latest checkpoint, the
    history cut back to that checkpoint's offset (rows after it are recomputed exactly)."""
    if ckpt.latest_round() is None:
        path.unlink(missing_ok=True)  # nothing checkpointed: the run starts over
        return 0, like, key, []
    restored = ckpt.restore(like)
    with path.open("r+b") as f:
        f.truncate(restored.meta["history_offset"])
    rows = history.read_history(path)
    if len(rows) != restored.round or (rows and rows[-1]["round"] != restored.round):
        raise ConfigError(f"{path} does not match its checkpoint of round {restored.round}.")
    return restored.round, restored.state, restored.key, rows[:rounds]


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
    evaluation columns are None until :func:`evaluate_row` fills them."""
    ids = np.asarray(getattr(result, "clients", np.arange(len(result.loss))))
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


def run_writers(
    config: Config, out: Path, setting: str, alg_name: str, seed: int, done: int
) -> tuple[writers.HistoryWriter, writers.Writers]:
    """The history writer (the record; resume reads its offset) and every writer of the run."""
    record = writers.HistoryWriter(
        history.history_path(out, setting, alg_name, seed), append=done > 0
    )
    views: list[Any] = [record]
    views.append(
        writers.ProgressWriter(
            f"{setting} {alg_name} seed={seed}",
            done=done,
            total=config.rounds,
            enabled=config.progress,
        )
    )
    if config.tensorboard and not writers.tensorboard_available():
        print("note: no TensorBoard events: tensorboardX is missing (pip install tensorboardX).")
    elif config.tensorboard:
        views.append(
            writers.TensorBoardWriter(tensorboard_dir(out, setting, alg_name, seed), done=done)
        )
    return record, writers.Writers(views)


def train_run(
    config: Config, run: Run, setting: str, alg_name: str, seed: int, out: Path, *, resume: bool
) -> list[Row]:
    """Train one built run; every round is written and flushed.

    Checkpoints (state, next key, history offset) every ``config.checkpoint_every`` rounds, at
    the last round and on interrupt; ``resume`` continues from the latest one, bit for bit.
    """
    state = run.alg.init(
        jax.random.key(run.seeds.init), run.data.train.sample_x(), run.data.num_clients
    )
    key = jax.random.key(run.seeds.shuffle)
    probe = monitor.probe_batches(run.data.train, config.monitor.probe_size)  # (x, mask)
    if run.alg.policy != "fedavg" and not model_parts(state).local:
        print(
            f"note: {alg_name}: the model has no BatchNorm layer, so under the {run.alg.policy} "
            "policy nothing stays local; it trains as FedAvg."
        )
    path = history.history_path(out, setting, alg_name, seed)
    ckpt = Checkpointer(
        checkpoint_dir(out, setting, alg_name, seed), max_to_keep=config.keep_checkpoints
    )
    done, rows = 0, []
    if resume and path.exists():
        done, state, key, rows = resume_point(path, ckpt, state, key, config.rounds)
    if done >= config.rounds:
        ckpt.close()
        return rows
    seen = {c for row in rows for c in row["cohort"]}  # clients that have trained
    record, out_writers = run_writers(config, out, setting, alg_name, seed, done)
    start = time.perf_counter() - (rows[-1]["wall"] if rows else 0.0)
    saved = done
    try:
        for rnd in range(done + 1, config.rounds + 1):
            key, round_key = jax.random.split(key)
            t0 = time.perf_counter()
            state, result = run.round_fn(state, run.data.train, round_key)
            jax.block_until_ready(state)
            row = {"setting": setting, "algorithm": alg_name, "seed": seed, "round": rnd}
            row.update(round_row(run, config, probe, state, result, time.perf_counter() - t0))
            if run.epsilons is not None:  # DP: the guarantee after this round, the clip it used
                row.update(epsilon=run.epsilons[rnd - 1], dp_clip=float(state.server.dp.clip))
            if row["quarantined"]:
                print(
                    f"warning: {setting} {alg_name} seed={seed} round {rnd}: clients "
                    f"{row['quarantined']} had a non-finite update or loss and were left out",
                    file=sys.stderr,
                )
            seen.update(row["cohort"])
            if rnd == 1 or rnd % config.eval_every == 0 or rnd == config.rounds:
                row.update(evaluate_row(run, config, alg_name, state, seen, rnd))
            row["wall"] = time.perf_counter() - start
            out_writers.write(row)
            rows.append(row)
            if rnd % config.checkpoint_every == 0 or rnd == config.rounds:
                ckpt.save(rnd, state, key, history_offset=record.offset())
                saved = rnd
    except KeyboardInterrupt:
        if rows and saved < rows[-1]["round"]:  # the last finished round, for --resume
            try:
                ckpt.save(rows[-1]["round"], state, key, history_offset=record.offset())
            except RuntimeError:  # its buffers were donated to the interrupted cohort round
                print(f"note: --resume continues from the checkpoint of round {saved}.")
        raise
    finally:
        out_writers.close()
        ckpt.close()
    return rows

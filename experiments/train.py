"""One training run, in the shape of flax's examples: build what the run needs once
(:func:`build_run`: the algorithm, its round function and the monitor), then rounds,
each turned into one history row (:func:`round_row`, :func:`evaluate_row`) handed to the metric
writers (``experiments/writers.py``).

All federated logic is the library's; this module wires a config to it.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

import fedjax_bn as fb
from experiments import attacks, evaluation, history, privacy, registry, rows, writers
from fedjax_bn import monitor
from fedjax_bn.algorithms import model_parts
from fedjax_bn.checkpoint import Checkpointer
from fedjax_bn.data import FederatedData

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
    hyper: Any = None  # a sweep point's values for the initial state (experiments/sweep.py)
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


def round_options(config: Config, num_clients: int) -> fb.RoundOptions:
    """How the config's rounds run over ``num_clients`` clients: all of the config's execution
    fields are read here and only here (``RoundOptions`` checks them; 0 in the config is None
    there: the executor's default, or no cohort)."""
    cohort_size, sampler = config.cohort_size or None, cohort_sampler(config, num_clients)
    if privacy.enabled(config):  # Poisson or fixed-size cohorts the accountant can reason about
        cohort_size, sampler = privacy.sampler(config)
    return fb.RoundOptions(
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
        round_fn = fb.make_round(alg, round_options(config, data.num_clients))
    except ConfigError:
        raise
    except ValueError as e:  # e.g. mu < 0, an executor option it does not take
        raise ConfigError(f"{alg_name}: {e}") from e
    measure = jax.jit(functools.partial(monitor.round_divergences, alg))
    epsilons = privacy.epsilons(config, config.rounds) if privacy.enabled(config) else None
    return Run(alg, round_fn, measure, data, held, seed, seeds, epsilons, attack=attack)


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


@dataclasses.dataclass
class Live:
    """One run being trained: its identity, latest state and key, rows, writers and checkpoints
    (what :func:`record_round` advances by one round; ``train_run`` and the batched runs of
    ``experiments/parallel.py`` share it, so both write the same files)."""

    run: Run
    setting: str
    alg_name: str
    state: Any
    key: jax.Array
    probe: tuple[Any, Any]  # the monitor's fixed batches (x, mask)
    ckpt: Checkpointer
    done: int  # rounds already in the history (resumed)
    rows: list[Row]
    seen: set[int]  # clients that have trained
    record: writers.HistoryWriter | None = None
    writers: writers.Writers | None = None
    start: float = 0.0  # perf_counter at round 0 of the run (resumed runs: shifted back)
    saved: int = 0  # the last checkpointed round


def open_run(
    config: Config, run: Run, setting: str, alg_name: str, out: Path, *, resume: bool
) -> Live:
    """The run's starting state and key, or where ``resume`` finds it; no writer is opened."""
    state = run.alg.init(
        jax.random.key(run.seeds.init), run.data.train.sample_x(), run.data.num_clients
    )
    if run.hyper:  # a sweep point: its values are data, the compiled programs stay
        state = fb.with_hyperparams(state, run.hyper)
    key = jax.random.key(run.seeds.shuffle)
    probe = monitor.probe_batches(run.data.train, config.monitor.probe_size)  # (x, mask)
    if run.alg.policy != "fedavg" and not model_parts(state).local:
        print(
            f"note: {alg_name}: the model has no BatchNorm layer, so under the {run.alg.policy} "
            "policy nothing stays local; it trains as FedAvg."
        )
    path = history.history_path(out, setting, alg_name, run.seed)
    ckpt = Checkpointer(
        checkpoint_dir(out, setting, alg_name, run.seed), max_to_keep=config.keep_checkpoints
    )
    done, rows = 0, []
    if resume and path.exists():
        done, state, key, rows = resume_point(path, ckpt, state, key, config.rounds)
    seen = {c for row in rows for c in row["cohort"]}
    return Live(run, setting, alg_name, state, key, probe, ckpt, done, rows, seen, saved=done)


def begin(config: Config, live: Live, out: Path) -> None:
    """Open the run's writers and start its clock (the rounds to train come next)."""
    live.record, live.writers = run_writers(
        config, out, live.setting, live.alg_name, live.run.seed, live.done
    )
    live.start = time.perf_counter() - (live.rows[-1]["wall"] if live.rows else 0.0)


def record_round(
    config: Config, live: Live, rnd: int, state: Any, result: Any, seconds: float
) -> Row:
    """Round ``rnd`` of the run done (``state``, ``result``, its ``seconds``): its history row
    built, evaluated when due, written and flushed; a checkpoint when due."""
    run, setting, alg_name, seed = live.run, live.setting, live.alg_name, live.run.seed
    live.state = state
    row = {"setting": setting, "algorithm": alg_name, "seed": seed, "round": rnd}
    row.update(rows.round_row(run, config, live.probe, state, result, seconds))
    if run.epsilons is not None:  # DP: the guarantee after this round, the clip it used
        row.update(epsilon=run.epsilons[rnd - 1], dp_clip=float(state.server.dp.clip))
    if row["quarantined"]:
        print(
            f"warning: {setting} {alg_name} seed={seed} round {rnd}: clients "
            f"{row['quarantined']} had a non-finite update or loss and were left out",
            file=sys.stderr,
        )
    live.seen.update(row["cohort"])
    if rnd == 1 or rnd % config.eval_every == 0 or rnd == config.rounds:
        row.update(rows.evaluate_row(run, config, alg_name, state, live.seen, rnd))
    row["wall"] = time.perf_counter() - live.start
    live.writers.write(row)
    live.rows.append(row)
    if rnd % config.checkpoint_every == 0 or rnd == config.rounds:
        live.ckpt.save(rnd, state, live.key, history_offset=live.record.offset())
        live.saved = rnd
    return row


def save_interrupted(live: Live) -> None:
    """On Ctrl-C: checkpoint the last finished round, for ``--resume``."""
    if live.rows and live.saved < live.rows[-1]["round"]:
        try:
            live.ckpt.save(
                live.rows[-1]["round"], live.state, live.key, history_offset=live.record.offset()
            )
        except RuntimeError:  # its buffers were donated to the interrupted cohort round
            print(f"note: --resume continues from the checkpoint of round {live.saved}.")


def close_run(live: Live) -> None:
    """Close the run's writers (if opened) and checkpointer."""
    try:
        if live.writers is not None:
            live.writers.close()
    finally:
        live.ckpt.close()


def train_run(
    config: Config, run: Run, setting: str, alg_name: str, seed: int, out: Path, *, resume: bool
) -> list[Row]:
    """Train one built run; every round is written and flushed.

    Checkpoints (state, next key, history offset) every ``config.checkpoint_every`` rounds, at
    the last round and on interrupt; ``resume`` continues from the latest one, bit for bit.
    """
    del seed  # run.seed
    live = open_run(config, run, setting, alg_name, out, resume=resume)
    try:
        if live.done >= config.rounds:
            return live.rows
        begin(config, live, out)
        for rnd in range(live.done + 1, config.rounds + 1):
            live.key, round_key = jax.random.split(live.key)
            t0 = time.perf_counter()
            state, result = run.round_fn(live.state, run.data.train, round_key)
            jax.block_until_ready(state)
            record_round(config, live, rnd, state, result, time.perf_counter() - t0)
    except KeyboardInterrupt:
        save_interrupted(live)
        raise
    finally:
        close_run(live)
    return live.rows

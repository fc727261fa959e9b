"""The experiment runner: for every (setting, seed, algorithm) train, evaluate, monitor, record.

All federated logic is the library's (``fedjax_bn``); this module wires a config to it and writes
results. :func:`run_experiment` is the in-process entry point; ``experiments/run.py`` the CLI.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

import fedjax_bn as fb
from experiments import evaluation, privacy, registry, report
from experiments.configs import base
from fedjax_bn import monitor
from fedjax_bn.algorithms import model_parts
from fedjax_bn.checkpoint import Checkpointer
from fedjax_bn.data import FederatedData
from fedjax_bn.recalibrate import recalibrate_bn

SAMPLERS = (*fb.sampling.SAMPLERS, "available")  # by name; available binds config.availability

Config = ml_collections.ConfigDict
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


def flat_fields(config: Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of a config by dotted path (``data.alpha``), in config order."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        out.update(flat_fields(value, path + ".") if isinstance(value, Config) else {path: value})
    return out


def field_paths(config: Config) -> list[str]:
    """Every leaf field of a config as a dotted path, sorted."""
    return sorted(flat_fields(config))


def check_fields(config: Config) -> None:
    """Raise a ConfigError naming unknown fields and listing the valid ones (base.get_config)."""
    valid = field_paths(base.get_config())
    unknown = sorted(set(field_paths(config)) - set(valid))
    if unknown:
        raise ConfigError(f"Unknown config field(s) {unknown}; valid fields: {', '.join(valid)}.")


class Bound(NamedTuple):
    """The valid range of one numeric field: ``low <= value`` (``<`` if strict), ``<= high``
    (``<`` if high_strict)."""

    field: str
    kind: type  # int: integers only; float: any finite number
    low: float
    strict: bool = False
    high: float | None = None
    note: str = ""
    high_strict: bool = False  # ``value < high`` instead of ``<=``


# Every numeric field's valid range, checked by validate before anything is written.
BOUNDS: tuple[Bound, ...] = (
    Bound("rounds", int, 1),
    Bound("eval_every", int, 1),
    Bound("batch_size", int, 1),
    Bound("local_epochs", int, 1),
    Bound("eval_batch_size", int, 1),
    Bound("checkpoint_every", int, 1),
    Bound("cohort_size", int, 0, note=" (0: every client every round)"),
    Bound("client_threads", int, 0, note=" (0: 2 on a CPU with 2+ cores, else 1)"),
    Bound("availability", float, 0, strict=True, high=1),
    Bound("held_out", int, 0),
    Bound("eval_clients", int, 0, note=" (0: every client)"),
    Bound("budget_min_steps", int, 0),
    Bound("budget_max_steps", int, 0, note=" (0: no budget)"),
    Bound("keep_checkpoints", int, 1),
    Bound("mu", float, 0),  # even when no prox algorithm is selected
    Bound("clip_norm", float, 0, note=" (0: no clipping)"),
    Bound("server_lr", float, 0, note=" (0: the factory's default)"),
    Bound("data.num_clients", int, 1),
    Bound("data.alpha", float, 0, strict=True),
    Bound("data.min_size", int, 0),
    Bound("data.max_train", int, 0, note=" (0: all)"),
    Bound("data.max_test", int, 0, note=" (0: all)"),
    Bound("model.momentum", float, 0, high=1),
    Bound("model.num_filters", int, 1),
    Bound("model.dropout", float, 0, high=1, high_strict=True),
    Bound("label_smoothing", float, 0, high=1, high_strict=True),
    Bound("optim.lr", float, 0, strict=True),
    Bound("optim.weight_decay", float, 0),
    Bound("optim.momentum", float, 0),
    Bound("monitor.probe_size", int, 1),
    Bound("dp.noise_multiplier", float, 0),
    Bound("dp.clip_norm", float, 0, strict=True),
    Bound("dp.target_epsilon", float, 0, note=" (0: use dp.noise_multiplier)"),
    Bound("dp.delta", float, 0, high=1, high_strict=True),
    Bound("dp.q", float, 0, high=1),
    Bound("dp.target_quantile", float, 0, high=1, high_strict=True),
    Bound("dp.clip_learning_rate", float, 0, strict=True),
)


def describe(bound: Bound) -> str:
    """What ``bound`` accepts, e.g. ``'an integer >= 1'``, ``'a finite number in [0, 1]'``."""
    kind = "an integer" if bound.kind is int else "a finite number"
    if bound.high is not None:
        close = ")" if bound.high_strict else "]"
        return f"{kind} in {'(' if bound.strict else '['}{bound.low:g}, {bound.high:g}{close}"
    return f"{kind} {'>' if bound.strict else '>='} {bound.low:g}{bound.note}"


def in_bounds(bound: Bound, value: Any) -> bool:
    """Whether ``value`` has ``bound``'s kind (bools never count), is finite and in range."""
    kinds = int if bound.kind is int else int | float
    if isinstance(value, bool) or not isinstance(value, kinds):
        return False
    if not isinstance(value, int) and not abs(value) < float("inf"):  # NaN, inf
        return False
    above = value > bound.low if bound.strict else value >= bound.low
    if bound.high is None:
        return above
    return above and (value < bound.high if bound.high_strict else value <= bound.high)


def check_numbers(config: Config) -> None:
    """One ConfigError naming every numeric field outside its :data:`BOUNDS` and what is valid."""
    fields = flat_fields(config)
    bad = [
        f"config.{b.field} must be {describe(b)}, got {fields[b.field]!r}"
        for b in BOUNDS
        if b.field in fields and not in_bounds(b, fields[b.field])
    ]
    if bad:
        raise ConfigError("; ".join(bad) + ".")


def _seed(item: Any) -> int:
    """One seed: a non-negative int, or its decimal digits."""
    if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
        return item
    if isinstance(item, str) and item.isascii() and item.isdigit():
        return int(item)
    raise ConfigError(
        f"config.seeds must be non-negative integers, e.g. --config.seeds=0,1,2; got {item!r}."
    )


def _distinct(field: str, items: tuple[Any, ...]) -> tuple[Any, ...]:
    """``items``, or a ConfigError naming the repeated ones (their runs would share files)."""
    repeated = sorted({str(i) for i in items if items.count(i) > 1})
    if repeated:
        raise ConfigError(f"config.{field} lists more than once: {', '.join(repeated)}.")
    return items


def parse_seeds(value: Any) -> tuple[int, ...]:
    """Distinct non-negative seeds from an int, a sequence, or text like ``'0,1,2'``."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    pieces = [p for i in items for p in (registry.names(i) if isinstance(i, str) else [i])]
    seeds = _distinct("seeds", tuple(_seed(p) for p in pieces))
    if not seeds:
        raise ConfigError("Give at least one seed, e.g. --config.seeds=0,1,2.")
    return seeds


def validate(config: Config) -> Config:
    """Check every name and number before any training; returns a copy with names normalized."""
    check_fields(config)
    config = Config(config.to_dict())  # unlocked copy; the caller's config is left alone
    config.settings = _distinct("settings", registry.names(config.settings))
    config.algorithms = _distinct("algorithms", registry.names(config.algorithms))
    for name in config.settings:
        registry.lookup(registry.SETTINGS, name, "setting")
    for name in config.algorithms:
        registry.lookup(registry.ALGORITHMS, name, "algorithm")
    if config.augment:  # '' is none
        registry.lookup(registry.AUGMENTS, config.augment, "augment")
    registry.lookup(registry.LOSSES, config.loss, "loss function")
    if not config.settings or not config.algorithms:
        raise ConfigError("Give at least one setting and one algorithm.")
    config.seeds = parse_seeds(config.seeds)
    check_numbers(config)
    population = config.data.num_clients - config.held_out
    if population < 1:
        raise ConfigError(
            f"config.held_out ({config.held_out}) leaves no client to train out of "
            f"config.data.num_clients = {config.data.num_clients}."
        )
    if config.cohort_size > population:
        raise ConfigError(
            f"config.cohort_size ({config.cohort_size}) exceeds the population "
            f"(config.data.num_clients - config.held_out = {population}); 0 trains every client."
        )
    if config.sampler not in SAMPLERS:
        valid = ", ".join(SAMPLERS)
        raise ConfigError(f"Unknown config.sampler {config.sampler!r}; valid: {valid}.")
    if config.budget_max_steps and config.budget_min_steps > config.budget_max_steps:
        raise ConfigError(
            f"config.budget_min_steps ({config.budget_min_steps}) exceeds "
            f"config.budget_max_steps ({config.budget_max_steps})."
        )
    if config.budget_min_steps and not config.budget_max_steps:
        raise ConfigError("config.budget_min_steps needs config.budget_max_steps >= it.")
    if config.sampler != "uniform" and not config.cohort_size:
        raise ConfigError(f"config.sampler={config.sampler!r} needs config.cohort_size >= 1.")
    try:
        privacy.check(config)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    model = registry.build_model(config, num_classes=10)
    tx = registry.build_optimizer(config)
    try:  # factories check their hyperparameters; make_round knows the executors
        algs = [registry.build_algorithm(a, model, tx, config) for a in config.algorithms]
        fb.make_round(
            algs[0],
            executor=config.executor,
            batch_size=config.batch_size,
            client_threads=config.client_threads or None,
        )
    except ConfigError:
        raise
    except ValueError as e:  # e.g. mu < 0, an unknown executor (listing the valid ones)
        raise ConfigError(str(e)) from e
    return config


def enable_compilation_cache(path: str) -> None:
    """jax's persistent compilation cache in ``path`` for this process; '' turns it off (so
    does ``FEDJAX_BN_COMPILATION_CACHE=0``)."""
    if path:
        fb.enable_compilation_cache(path)
    else:
        fb.disable_compilation_cache()


RESULT_ENTRIES = ("config.json", "history", "checkpoints", "summary.json", "plots")


def prepare_out_dir(config: Config, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Create the output directory and prove it writable, or raise a clear ConfigError.

    A directory that already holds results is refused unless ``resume`` (continue it) or
    ``overwrite`` (its previous results are deleted first).
    """
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(config.out_dir or f"results/{config.name}-{stamp}").expanduser().resolve()
    found = [name for name in RESULT_ENTRIES if (out / name).exists()]
    if found and not (resume or overwrite):
        raise ConfigError(
            f"Output directory {out} already holds results ({', '.join(found)}); continue it "
            f"with --resume={out}, replace them with --overwrite, or choose another "
            "--config.out_dir."
        )
    if resume and not (out / "config.json").exists():
        raise ConfigError(f"Nothing to resume in {out}: it has no config.json.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"Cannot write to output directory {out}: {e.strerror or e}. "
            "Choose another with --config.out_dir=PATH."
        ) from e
    if overwrite and not resume:
        for name in found:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return out


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


def resume_point(
    path: Path, ckpt: Checkpointer, like: Any, key: jax.Array, rounds: int
) -> tuple[int, Any, jax.Array, list[report.Row]]:
    """``(rounds done, state, key, rows)`` to continue a run from: its latest checkpoint, the
    history cut back to that checkpoint's offset (rows after it are recomputed exactly)."""
    if ckpt.latest_round() is None:
        path.unlink(missing_ok=True)  # nothing checkpointed: the run starts over
        return 0, like, key, []
    restored = ckpt.restore(like)
    with path.open("r+b") as f:
        f.truncate(restored.meta["history_offset"])
    rows = report.read_history(path)
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


def cohort_sampler(config: Config, num_clients: int) -> Any:
    """The configured sampler: a name ``make_round`` knows, or ``available`` with every
    client online with probability ``config.availability``."""
    if config.sampler != "available":
        return config.sampler
    probabilities = np.full(num_clients, config.availability, np.float32)
    return functools.partial(fb.sampling.available, probabilities=probabilities)


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


def step_budget(config: Config) -> fb.budgets.Budget | None:
    """Stragglers: each client's local steps drawn per round uniformly from
    ``[config.budget_min_steps, config.budget_max_steps]``; None when both are 0."""
    low, high = config.budget_min_steps, config.budget_max_steps
    return fb.budgets.uniform_steps(low, high) if high else None


def train_run(
    config: Config,
    data: FederatedData,
    setting: str,
    alg_name: str,
    seed: int,
    out: Path,
    *,
    resume: bool = False,
) -> list[report.Row]:
    """Train one algorithm on one setting with one seed; every round is written and flushed.

    Checkpoints (state, next key, history offset) every ``config.checkpoint_every`` rounds, at
    the last round and on interrupt; ``resume`` continues from the latest one, bit for bit.
    """
    seeds = derive_seeds(seed)
    data, held = evaluation.split_held_out(data, config.held_out)
    shape = jax.tree.leaves(data.train.sample_x())[0].shape[1:]
    model = registry.build_model(config, data.num_classes, shape, seed=seeds.init)
    alg = registry.build_algorithm(alg_name, model, registry.build_optimizer(config), config)
    cohort_size, sampler = config.cohort_size or None, cohort_sampler(config, data.num_clients)
    if privacy.enabled(config):  # Poisson or fixed-size cohorts the accountant can reason about
        cohort_size, sampler = privacy.sampler(config)
        epsilons = privacy.epsilons(config, config.rounds)
    round_fn = fb.make_round(
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
    measure = jax.jit(functools.partial(monitor.round_divergences, alg))
    x_probe, mask_probe = monitor.probe_batches(data.train, config.monitor.probe_size)
    state = alg.init(jax.random.key(seeds.init), data.train.sample_x(), data.num_clients)
    key = jax.random.key(seeds.shuffle)
    if alg.policy != "fedavg" and not model_parts(state).local:
        print(
            f"note: {alg_name}: the model has no BatchNorm layer, so under the {alg.policy} "
            "policy nothing stays local; it trains as FedAvg."
        )
    path = report.history_path(out, setting, alg_name, seed)
    ckpt = Checkpointer(
        checkpoint_dir(out, setting, alg_name, seed), max_to_keep=config.keep_checkpoints
    )
    done, rows = 0, []
    if resume and path.exists():
        done, state, key, rows = resume_point(path, ckpt, state, key, config.rounds)
    seen = {c for row in rows for c in row["cohort"]}  # clients that have trained
    if done >= config.rounds:
        ckpt.close()
        return rows
    writer = report.HistoryWriter(path, append=bool(rows))
    start = time.perf_counter() - (rows[-1]["wall"] if rows else 0.0)
    bar = tqdm(
        range(done + 1, config.rounds + 1),
        desc=f"{setting} {alg_name} seed={seed}",
        unit="round",
        initial=done,
        total=config.rounds,
        disable=not config.progress,
        file=sys.stderr,
    )
    acc, saved = None, done
    try:
        for rnd in bar:
            key, round_key = jax.random.split(key)
            t0 = time.perf_counter()
            state, result = round_fn(state, data.train, round_key)
            jax.block_until_ready(state)
            seconds = time.perf_counter() - t0
            # The clients' post-round statistics, when the round returns them (see monitor.py).
            client_stats = getattr(result, "batch_stats", None)
            ids = np.asarray(getattr(result, "clients", np.arange(len(result.loss))))
            div = measure(*monitor_view(state, x_probe, mask_probe, ids, config), client_stats)
            quarantined = [int(ids[c]) for c in np.flatnonzero(np.asarray(result.quarantined))]
            if quarantined:
                print(
                    f"warning: {setting} {alg_name} seed={seed} round {rnd}: clients "
                    f"{quarantined} had a non-finite update or loss and were left out",
                    file=sys.stderr,
                )
            row: report.Row = {
                "setting": setting,
                "algorithm": alg_name,
                "seed": seed,
                "round": rnd,
                "train_loss": _mean_by(result.loss, result.num_seen * ~result.quarantined),
                "train_acc": _mean_by(result.accuracy, result.num_seen * ~result.quarantined),
                "global_acc": None,
                "global_loss": None,
                "client_acc": None,
                "quarantined": quarantined,
                "cohort": [int(c) for c in ids if c < data.num_clients],
                "bn_div": float(monitor.mean_over_layers(div["bn"])),
                "bn_div_source": monitor.stats_source(state, client_stats),
                "probe_div": float(monitor.mean_over_layers(div["probe"])),
                "affine_div": float(monitor.mean_over_layers(div["affine"])),
                "bn_div_layers": _floats(div["bn"]),
                "probe_div_layers": _floats(div["probe"]),
                "affine_div_layers": _floats(div["affine"]),
                "seconds": seconds,
            }
            weights = result.num_seen * ~result.quarantined
            for name, values in task_metrics(result.metrics).items():  # beyond accuracy
                row.update({f"train_{name}": _mean_by(values, weights), f"global_{name}": None})
            if privacy.enabled(config):
                row.update(epsilon=epsilons[rnd - 1], dp_clip=float(state.server.dp.clip))
            seen.update(row["cohort"])
            final = rnd == config.rounds
            if rnd == 1 or rnd % config.eval_every == 0 or final:
                evaluated = eval_state(config, alg_name, alg, state, data)
                glob = fb.evaluate_global(alg, evaluated, data, config.eval_batch_size)
                if glob is not None:
                    row.update(global_acc=glob.accuracy, global_loss=glob.loss)
                    row.update({f"global_{k}": v for k, v in task_metrics(glob.metrics).items()})
                ids = evaluation.eval_ids(data.num_clients, config.eval_clients, seed, rnd, final)
                row.update(
                    evaluation.evaluate_population(
                        alg,
                        evaluated,
                        data,
                        held,
                        seen,
                        ids=ids,
                        adapt=config.adapt_bn,
                        batch=config.eval_batch_size,
                    )
                )
                acc = row["client_acc"]
            row["wall"] = time.perf_counter() - start
            writer.write(row)
            rows.append(row)
            if rnd % config.checkpoint_every == 0 or rnd == config.rounds:
                ckpt.save(rnd, state, key, history_offset=writer.offset())
                saved = rnd
            postfix = {"loss": f"{row['train_loss']:.3f}"}
            postfix["acc"] = "-" if acc is None else f"{acc:.3f}"
            if "epsilon" in row:
                postfix["eps"] = f"{row['epsilon']:.3g}"
            bar.set_postfix(postfix)
    except KeyboardInterrupt:
        if rows and saved < rows[-1]["round"]:  # the last finished round, for --resume
            try:
                ckpt.save(rows[-1]["round"], state, key, history_offset=writer.offset())
            except RuntimeError:  # its buffers were donated to the interrupted cohort round
                print(f"note: --resume continues from the checkpoint of round {saved}.")
        raise
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    return rows


def finish(out: Path, config: Config, runs: list[report.Row], rows: list[report.Row]) -> dict:
    """Summary JSON, tables on stdout, plots; returns the summary."""
    results = report.aggregate(runs)
    summary = {"name": config.name, "runs": runs, "results": results}
    report.write_json(out / "summary.json", summary)
    by_setting: dict[str, dict[str, list[report.Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_setting[row["setting"]][row["algorithm"]].append(row)
    plots = []
    for setting, per_alg in results.items():
        print("\n" + report.format_table(setting, per_alg))
        plots += report.plot_setting(out, setting, by_setting[setting])
    print(f"\nPlots: {', '.join(str(p.relative_to(out)) for p in plots)}")
    print(f"Results in {out}")
    return summary


def run_experiment(config: Config, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run every (setting, seed, algorithm) of ``config``; returns the output directory.

    Every config and data check runs before anything is written. Writes ``config.json``
    (resolved), ``history/*.jsonl`` (one row per round, flushed), ``checkpoints/``,
    ``summary.json`` and ``plots/*.png``; prints a table per setting. ``resume`` continues the
    runs in ``config.out_dir`` (complete runs are read back, the interrupted one restored from
    its latest checkpoint). On Ctrl-C (or SIGTERM) the current run is checkpointed, the partial
    results are summarized, then KeyboardInterrupt propagates.
    """
    config = validate(config)
    datasets = {
        (setting, seed): registry.build_setting(setting, config, derive_seeds(seed).data)
        for setting in config.settings
        for seed in config.seeds
    }
    out = prepare_out_dir(config, resume=resume, overwrite=overwrite)
    config.out_dir = str(out)
    enable_compilation_cache(config.compilation_cache)
    if not resume:
        (out / "config.json").write_text(config.to_json(indent=2) + "\n")
    print(f"Output directory: {out}")
    runs: list[report.Row] = []
    rows: list[report.Row] = []
    t0 = time.perf_counter()
    try:
        for setting in config.settings:
            for seed in config.seeds:
                data = datasets[(setting, seed)]
                for alg_name in config.algorithms:
                    run_rows = train_run(config, data, setting, alg_name, seed, out, resume=resume)
                    rows += run_rows
                    runs.append(report.run_summary(run_rows))
    except KeyboardInterrupt:
        print(
            f"\nInterrupted after {len(runs)} complete run(s); the history so far is in "
            f"{out / 'history'}; continue with: python -m experiments.run --resume={out}",
            file=sys.stderr,
        )
        with contextlib.suppress(FileNotFoundError):  # no round finished yet
            report.rebuild([out], out)
        raise
    finish(out, config, runs, rows)
    print(f"Total wall time: {time.perf_counter() - t0:.1f} s")
    return out

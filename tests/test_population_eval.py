"""Evaluation at population scale: sampled clients, never-trained and held-out clients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, assert_trees_equal, make_clients, sgd, tiny_cnn
from test_runner import tiny_argv

import fedjax_bn as fb
from experiments import evaluation, report, run
from fedjax_bn.adapt import adapt_variables, new_client_variables
from fedjax_bn.algorithms import client_variables, model_parts
from fedjax_bn.data import FederatedData
from fedjax_bn.tree import take_client


def tiny_data(sizes: tuple[int, ...] = (9, 5, 7, 6, 8)) -> FederatedData:
    return FederatedData(make_clients(0, sizes), make_clients(1, sizes), num_classes=10)


def trained(policy: str, data: FederatedData, rounds: int = 2, cohort: int | None = None):
    alg = fb.make_algorithm(tiny_cnn(), sgd(), policy=policy)
    state = alg.init(jax.random.key(0), data.train.x[0, :1], data.num_clients)
    round_fn = fb.make_round(alg, executor="sequential", batch_size=4, cohort_size=cohort)
    for r in range(rounds):
        state, result = round_fn(state, data.train, jax.random.key(r))
    return alg, state, result


def test_split_held_out_keeps_the_last_clients_apart() -> None:
    data = tiny_data()
    population, held = evaluation.split_held_out(data, 2)
    assert population.num_clients == 3 and held.num_clients == 2
    np.testing.assert_array_equal(population.train.n, data.train.n[:3])
    np.testing.assert_array_equal(held.test.x, data.test.x[3:])
    assert evaluation.split_held_out(data, 0) == (data, None)


def test_eval_ids_sample_is_seeded_and_the_last_round_covers_everyone() -> None:
    ids = evaluation.eval_ids(50, 7, seed=3, rnd=4, final=False)
    assert len(set(ids.tolist())) == 7 and list(ids) == sorted(ids) and ids.max() < 50
    np.testing.assert_array_equal(ids, evaluation.eval_ids(50, 7, seed=3, rnd=4, final=False))
    assert not np.array_equal(ids, evaluation.eval_ids(50, 7, seed=3, rnd=5, final=False))
    np.testing.assert_array_equal(evaluation.eval_ids(50, 7, 3, 4, final=True), np.arange(50))
    np.testing.assert_array_equal(evaluation.eval_ids(50, 0, 3, 4, final=False), np.arange(50))


def test_evaluating_a_sample_equals_those_clients_of_the_full_evaluation() -> None:
    data = tiny_data()
    alg, state, _ = trained("fedbn", data)
    full = fb.evaluate_clients(alg, state, data)
    part = fb.evaluate_clients(alg, state, data, clients=[4, 1])
    np.testing.assert_array_equal(part.ids, [4, 1])
    np.testing.assert_allclose(part.accuracy, full.accuracy[[4, 1]])
    np.testing.assert_allclose(part.loss, full.loss[[4, 1]], rtol=1e-6)
    with pytest.raises(ValueError, match=r"client ids must lie in \[0, 5\)"):
        fb.evaluate_clients(alg, state, data, clients=[5])


def test_adapted_evaluation_uses_the_clients_own_training_images() -> None:
    data = tiny_data()
    alg, state, _ = trained("fedbn", data)
    got = fb.evaluate_clients(alg, state, data, clients=[2], adapt={2})
    n_train, n_test = int(data.train.n[2]), int(data.test.n[2])
    own = adapt_variables(alg.model, client_variables(state, 2), data.train.x[2, :n_train])
    x, y = np.asarray(data.test.x[2, :n_test]), np.asarray(data.test.y[2, :n_test])
    want = fb.evaluate_model(alg.model, own, x, y)
    np.testing.assert_allclose(got.loss, [want.loss], rtol=1e-6)
    assert got.accuracy[0] == want.accuracy


def test_a_never_sampled_fedbn_client_keeps_the_initial_bn() -> None:
    """What a newly sampled client starts from under a local-BN policy: the initial BN."""
    data = tiny_data((6, 6, 6, 6, 6, 6))
    alg, state, result = trained("fedbn", data, rounds=1, cohort=2)
    init = alg.init(jax.random.key(0), data.train.x[0, :1], data.num_clients)
    never = sorted(set(range(6)) - set(np.asarray(result.clients).tolist()))
    for c in never:
        assert_trees_equal(take_client(state.clients.local, c), take_client(init.clients.local, c))


def test_a_newcomer_gets_the_global_model_or_under_fedbn_the_mean_local_bn() -> None:
    data = tiny_data()
    alg, state, _ = trained("fedavg", data)
    got = new_client_variables(alg, state, data.train.n)
    assert_trees_equal(got, fb.global_variables(alg, state, data.train.n))
    alg, state, _ = trained("fedbn", data)
    got = new_client_variables(alg, state, jnp.array([1.0, 0, 0, 0, 3.0]))
    parts = model_parts(state)
    want_local = jax.tree.map(lambda a: 0.25 * a[0] + 0.75 * a[4], parts.local)
    assert_trees_close(got["batch_stats"], want_local["batch_stats"])
    assert_trees_equal(got["params"]["Dense_0"], parts.shared["params"]["Dense_0"])


def test_population_run_reports_seen_unseen_and_held_out_clients(tmp_path) -> None:
    out = tmp_path / "out"
    extra = ("--config.data.num_clients=8", "--config.held_out=2", "--config.cohort_size=2",
             "--config.adapt_bn=True", "--config.eval_clients=3",
             "--config.budget_min_steps=1", "--config.budget_max_steps=2")  # fmt: skip
    assert run.main(tiny_argv(out, *extra, algorithms="fedbn")) == 0
    rows = report.read_history(report.history_path(out, "digits_feature_shift", "fedbn", 0))
    first, last = rows[0], rows[-1]
    assert first["eval_clients"] == 3 and last["eval_clients"] == 6  # all 6 at the last round
    assert all(c < 6 for r in rows for c in r["cohort"])  # held-out clients never train
    assert last["seen_clients"] == len({c for r in rows for c in r["cohort"]})
    assert last["seen_clients"] <= 4 < 6  # 2 rounds of 2: some clients never trained
    for key in ("seen_acc", "unseen_acc", "unseen_adapted_acc", "held_out_acc"):
        assert 0.0 <= last[key] <= 1.0
    assert 0.0 <= last["held_out_adapted_acc"] <= 1.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--config.held_out=4",), "leaves no client"),
        (("--config.held_out=2", "--config.cohort_size=3"), "exceeds the population"),
        (("--config.sampler=fancy",), "Unknown config.sampler 'fancy'"),
        (("--config.sampler=by_size",), "needs config.cohort_size"),
        (("--config.availability=0",), "config.availability"),
        (("--config.budget_min_steps=3", "--config.budget_max_steps=2"), "exceeds"),
        (("--config.budget_min_steps=1",), "needs config.budget_max_steps"),
    ],
)
def test_bad_population_options_are_one_clear_error(extra, message, tmp_path, capsys) -> None:
    assert run.main(tiny_argv(tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err


def test_a_population_larger_than_the_test_set_leaves_some_clients_without_test_data() -> None:
    data = fb.data.digits_feature_shift(400, seed=0)  # 360 test images for 400 clients
    test_n, train_n = np.asarray(data.test.n), np.asarray(data.train.n)
    assert test_n.min() == 0 and test_n.sum() == 360 and train_n.min() >= 1
    with pytest.raises(ValueError, match="more clients than examples"):
        fb.data.digits_feature_shift(2000, seed=0)  # 1,437 train images

"""AdaBN (Li et al., 2016): BN running statistics recomputed on a client's unlabeled data.

A trained model meets a new domain (a new client, a shifted test set): :func:`adapt_bn` keeps
every weight and replaces each BatchNorm layer's running ``mean``/``var`` by the statistics of
that layer's inputs over the given examples, by train-mode forward passes and no gradient step
(no labels needed). The statistics are read at each BN layer's input by the interceptor of
``bn_moments.bn_input_moments`` and pooled exactly over batches (counts, not averaged batch
variances), so they do not depend on the layers' momentum: the first BN layer gets exactly the
mean and biased variance of its inputs over ``x``; deeper layers those of inputs normalized
upstream with batch statistics (consecutive batches of ``batch_size``, no shuffling: the
result is deterministic). Integer leaves (counters) keep their value.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bn import policy as policy_lib
from fedjax_bn.aggregate import weighted_mean
from fedjax_bn.algorithms.base import (
    Algorithm,
    FedState,
    client_variables,
    model_parts,
    task_of,
)
from fedjax_bn.bn_moments import batch_moments, pool, with_moments
from fedjax_bn.tree import Variables, take_client

Array = jax.Array


def num_examples(x_N: Any) -> int:
    """The number of examples of an input pytree (its leaves' leading axis)."""
    return int(jax.tree.leaves(x_N)[0].shape[0])


def adapt_variables(
    model: Any, variables: Variables, x_N: Any, *, batch_size: int = 256
) -> Variables:
    """``variables`` with every BN layer's running statistics set to those of ``x_N``'s
    inputs to it (module docstring); unchanged for a model without BN."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    n = num_examples(x_N)
    if n < 1:
        raise ValueError("adapt_bn needs at least one example.")
    if not policy_lib.has_batch_norm(variables):
        return variables
    x_N = jax.tree.map(jnp.asarray, x_N)
    batch_size = min(batch_size, n)  # one compile shape, no all-padding batch
    x_1N, n_1 = jax.tree.map(lambda v: v[None], x_N), jnp.asarray([n], jnp.int32)
    batches = [
        batch_moments(model, variables, x_1N, n_1, jnp.asarray([0, s]), batch_size)
        for s in range(0, n, batch_size)
    ]
    moments = {p: pool([b[p] for b in batches]) for p in batches[0]}
    return {**variables, "batch_stats": with_moments(variables["batch_stats"], moments)}


def adapt_bn(
    alg: Algorithm,
    state: FedState,
    x_N: Array | np.ndarray,
    *,
    client: int | None = None,
    train_sizes: Array | None = None,
    batch_size: int = 256,
) -> Variables:
    """A model for data ``x_N``: client ``client``'s model (or the global model when None)
    with its BN running statistics recomputed on ``x_N`` (AdaBN; labels are not needed).

    The global model is the policy's (``policy.global_variables``; silobn pools the clients'
    statistics by ``train_sizes``, default equal weights, before they are replaced); fedbn has
    none, so name a ``client`` there. Returns variables for ``model.apply(..., train=False)``.
    """
    if client is not None:
        variables = client_variables(state, client)
    else:
        parts = model_parts(state)
        num = len(jax.tree.leaves(parts.local)[0]) if jax.tree.leaves(parts.local) else 1
        weights = jnp.ones((num,), jnp.float32) if train_sizes is None else train_sizes
        variables = policy_lib.global_variables(alg.policy, *parts, weights)
        if variables is None:
            raise ValueError(
                f"{alg.name!r} (policy {alg.policy!r}) has no global model: pass client=c to "
                "adapt client c's model."
            )
    return adapt_variables(task_of(alg), variables, x_N, batch_size=batch_size)


def new_client_variables(alg: Algorithm, state: FedState, train_sizes: Array) -> Variables:
    """The model a client that was never in the population starts from: the policy's global
    model (fedavg, silobn: statistics pooled by ``train_sizes``); under fedbn, which has none,
    the shared leaves plus the population's ``train_sizes``-weighted mean of the clients' local
    BN leaves. Pass it through :func:`adapt_variables` on the client's images to give it its
    own statistics (AdaBN) before use."""
    parts = model_parts(state)
    variables = policy_lib.global_variables(alg.policy, *parts, train_sizes)
    if variables is not None:
        return variables
    local = weighted_mean(parts.local, jnp.asarray(train_sizes), take_client(parts.local, 0))
    return policy_lib.merge(parts.shared, parts.pooled, local)

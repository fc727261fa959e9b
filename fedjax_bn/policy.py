"""The BN policy, in one module: which leaf is what, and what the global model is.

Which ``params`` belong to a BatchNorm layer is found structurally: a params leaf is a BN leaf
when its module path also appears in the ``batch_stats`` collection. Names of modules are never
matched, so nested and renamed BN layers are found. A BN layer's running moments are its
``batch_stats`` leaves ``mean`` and ``var`` (flax's ``nn.BatchNorm``); :func:`bn_moment_paths`
is the one place that reads those names.

A policy assigns every leaf one of three roles (``docs/design.md``'s table):

- ``shared``: averaged on the server, weighted by example counts (what server optimizers step);
- ``pooled``: BN running statistics pooled into one global set (fedavg);
- ``local``: kept per client, never leaves it.

Evaluation and monitoring ask this module (:func:`global_variables`); they never re-decide.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bn.aggregate import check_stacked, mean_leaf, normalized_weights, pooled_moments
from fedjax_bn.tree import Path, Variables, flatten, is_integer_leaf, take_client, unflatten

Role = Literal["shared", "pooled", "local"]
Policy = Literal["fedavg", "fedbn", "silobn"]
POLICIES: tuple[str, ...] = ("fedavg", "fedbn", "silobn")
BnStats = Literal["pooled", "mean"]
BN_STATS: tuple[str, ...] = ("pooled", "mean")


class Parts(NamedTuple):
    """A variables tree split by role; each part is a nested dict (possibly empty)."""

    shared: Variables
    pooled: Variables
    local: Variables


def bn_module_paths(variables: Variables) -> frozenset[Path]:
    """Module paths (without the collection name) that hold BatchNorm running statistics."""
    stats = flatten(variables.get("batch_stats", {}))
    return frozenset(path[:-1] for path in stats)


def is_bn_path(path: Path, bn_paths: frozenset[Path]) -> bool:
    """Whether a full variables path (collection first) belongs to a BatchNorm layer."""
    return path[0] == "batch_stats" or path[1:-1] in bn_paths


def has_batch_norm(variables: Variables) -> bool:
    """Whether the model has any BatchNorm layer (running statistics)."""
    return bool(bn_module_paths(variables))


def bn_param_mask(variables: Variables) -> Any:
    """A bool pytree over ``variables['params']``: True on BatchNorm scale/bias leaves."""
    bn_paths = bn_module_paths(variables)
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: tuple(k.key for k in kp)[:-1] in bn_paths, variables["params"]
    )


def bn_moment_paths(batch_stats: Variables) -> list[tuple[Path, Path]]:
    """``(mean path, var path)`` of every BN layer in a ``batch_stats`` tree (stacked or not)."""
    flat = flatten(batch_stats)
    return [(p, p[:-1] + ("var",)) for p in flat if p[-1] == "mean" and p[:-1] + ("var",) in flat]


def leaf_role(path: Path, policy: Policy, bn_paths: frozenset[Path]) -> Role:
    """The role of one leaf under ``policy`` (the BN policy table, in one place)."""
    collection = path[0]
    if collection == "params":
        return "local" if policy == "fedbn" and is_bn_path(path, bn_paths) else "shared"
    if collection == "batch_stats":
        return "pooled" if policy == "fedavg" else "local"
    return "local"  # any other mutable collection is client state


def check_policy(policy: str) -> None:
    """Raise a ValueError naming the valid policies."""
    if policy not in POLICIES:
        raise ValueError(f"Unknown BN policy {policy!r}; valid policies: {', '.join(POLICIES)}.")


def partition(variables: Variables, policy: Policy) -> Parts:
    """Split a model's variables into shared, pooled and local parts by ``policy``."""
    check_policy(policy)
    bn_paths = bn_module_paths(variables)
    parts: dict[Role, dict[Path, Any]] = {"shared": {}, "pooled": {}, "local": {}}
    for path, leaf in flatten(variables).items():
        parts[leaf_role(path, policy, bn_paths)][path] = leaf
    return Parts(*(unflatten(parts[role]) for role in Parts._fields))


def merge(*trees: Variables) -> Variables:
    """Union of disjoint partial variable trees (the inverse of :func:`partition`)."""
    flat: dict[Path, Any] = {}
    for tree in trees:
        for path, leaf in flatten(tree).items():
            if path in flat:
                raise ValueError(f"Variable {'/'.join(path)} appears in more than one part.")
            flat[path] = leaf
    return unflatten(flat)


def float_leaves(tree: Variables) -> dict[Path, Any]:
    """The float leaves of a tree by path: what averaging and server optimizers act on."""
    return {p: v for p, v in flatten(tree).items() if not is_integer_leaf(v)}


def with_leaves(tree: Variables, leaves: dict[Path, Any]) -> Variables:
    """``tree`` with the leaves at ``leaves``' paths replaced (others, e.g. integers, kept)."""
    return unflatten({**flatten(tree), **leaves})


def pool_batch_stats(
    stacked: Variables, weights_C: jax.Array, server: Variables, how: BnStats = "pooled"
) -> Variables:
    """Stacked BN running statistics folded into one set.

    ``how="pooled"``: each layer's ``(mean, var)`` become the moments of the union of the
    clients' data (:func:`~fedjax_bn.aggregate.pooled_moments`); ``"mean"``: the plain weighted
    mean of each statistic, as PyTorch loops and Flower do. Other float leaves get the weighted
    mean; integer leaves keep the server's value and dtype.
    """
    if how not in BN_STATS:
        raise ValueError(f"Unknown BN statistics rule {how!r}; valid: {', '.join(BN_STATS)}.")
    w_C = normalized_weights(weights_C)
    check_stacked(stacked, server, w_C.shape[0])
    flat, flat_server = flatten(stacked), flatten(server)
    out = {p: mean_leaf(v, w_C, flat_server[p]) for p, v in flat.items()}
    if how == "pooled":
        for mean_path, var_path in bn_moment_paths(stacked):
            mean_CX, var_CX = flat[mean_path], flat[var_path]
            mean, var = pooled_moments(mean_CX.astype(jnp.float32), var_CX.astype(jnp.float32), w_C)
            out[mean_path], out[var_path] = mean.astype(mean_CX.dtype), var.astype(var_CX.dtype)
    return unflatten(out)


def global_variables(
    policy: Policy,
    shared: Variables,
    pooled: Variables,
    local_C: Variables,
    weights_C: jax.Array,
) -> Variables | None:
    """The global model a policy defines, or None where it has none.

    fedavg: shared + pooled statistics. silobn: shared + the clients' local statistics pooled
    by ``weights_C`` (training sizes). fedbn: none (BN layers are personal), unless the model
    has no BN layer at all, when the shared parameters are the whole model.
    """
    check_policy(policy)
    if policy == "fedavg" or not local_C:
        return merge(shared, pooled)
    if policy == "silobn":
        stats = local_C.get("batch_stats", {})
        rest = {k: v for k, v in local_C.items() if k != "batch_stats"}
        if rest:  # other mutable collections are per client: no global version of them
            return None
        glob = pool_batch_stats(stats, weights_C, take_client(stats, 0)) if stats else {}
        return merge(shared, pooled, {"batch_stats": glob} if glob else {})
    return None

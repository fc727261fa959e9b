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

Personalization opens the ``local`` role to any part of the model the user names (``local=``
of :func:`partition` and ``make_algorithm``): the named modules' ``params`` and
``batch_stats`` are local under every policy (FedPer keeps the head, LG-FedAvg the body).
Names are matched as whole module-path components, never substrings (``"bn"`` does not catch
``"conv_bn2"``); :class:`AllBut` names the complement; a predicate over module paths is taken
as it is. A name or predicate that matches no module is an error.

Evaluation and monitoring ask this module (:func:`global_variables`); they never re-decide.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


class AllBut(NamedTuple):
    """Every module except those under the named module-path components (LG-FedAvg's body:
    ``AllBut(("Dense_1",))`` keeps all but the head local)."""

    names: tuple[str, ...]


# What make_algorithm(local=) takes: module-path component names, AllBut(names), or a predicate
# over module paths (``("Block_0", "head")``, without the collection or the leaf name).
LocalSpec = Sequence[str] | AllBut | Callable[[Path], bool]
Matcher = Callable[[Path], bool]


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


def module_paths(variables: Variables) -> list[Path]:
    """Every module path holding ``params`` or ``batch_stats``, in the variables' order."""
    seen = {p[1:-1]: None for p in flatten(variables) if p[0] in ("params", "batch_stats")}
    return list(seen)


def top_level_modules(variables: Variables) -> list[str]:
    """The model's top-level module names (what an error about ``local=`` lists)."""
    return list(dict.fromkeys(m[0] for m in module_paths(variables) if m))


def _names(spec: Any) -> tuple[str, ...]:
    names = (spec,) if isinstance(spec, str) else tuple(spec)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"local= names must be non-empty strings, got {names!r}.")
    return names


def local_matcher(variables: Variables, local: LocalSpec) -> Matcher | None:
    """A predicate over module paths saying which modules ``local`` keeps per client (None
    when ``local`` is empty), checked against ``variables``: every name must be a component of
    some module path, and a predicate must match some module; else a ValueError that lists the
    model's top-level modules."""
    if not isinstance(local, AllBut) and not callable(local) and not _names(local):
        return None
    modules = module_paths(variables)
    top = ", ".join(top_level_modules(variables)) or "(none)"
    if callable(local) and not isinstance(local, AllBut):
        if not any(local(m) for m in modules):
            raise ValueError(f"local= predicate matches no module; top-level modules: {top}.")
        return local
    names = frozenset(_names(local.names if isinstance(local, AllBut) else local))
    missing = sorted(n for n in names if not any(n in m for m in modules))
    if missing:
        raise ValueError(
            f"local= names {missing} match no module path component of the model (names are "
            f"matched whole, never as substrings); its top-level modules: {top}."
        )
    if isinstance(local, AllBut):
        return lambda module: not names.intersection(module)
    return lambda module: bool(names.intersection(module))


def local_mask(variables: Variables, local: LocalSpec) -> dict[Path, bool]:
    """``{path: kept per client by local=}`` over every ``params``/``batch_stats`` leaf."""
    match = local_matcher(variables, local)
    flat = flatten(variables)
    return {p: bool(match and p[0] in ("params", "batch_stats") and match(p[1:-1])) for p in flat}


def leaf_role(
    path: Path, policy: Policy, bn_paths: frozenset[Path], is_local: Matcher | None = None
) -> Role:
    """The role of one leaf under ``policy`` (the BN policy table, in one place); modules
    ``is_local`` matches (user-declared personal parts) are local under every policy."""
    collection = path[0]
    if is_local is not None and collection in ("params", "batch_stats") and is_local(path[1:-1]):
        return "local"
    if collection == "params":
        return "local" if policy == "fedbn" and is_bn_path(path, bn_paths) else "shared"
    if collection == "batch_stats":
        return "pooled" if policy == "fedavg" else "local"
    return "local"  # any other mutable collection is client state


def check_policy(policy: str) -> None:
    """Raise a ValueError naming the valid policies."""
    if policy not in POLICIES:
        raise ValueError(f"Unknown BN policy {policy!r}; valid policies: {', '.join(POLICIES)}.")


def partition(variables: Variables, policy: Policy, local: LocalSpec = ()) -> Parts:
    """Split a model's variables into shared, pooled and local parts by ``policy``; the
    modules ``local`` names (module docstring) are local whatever the policy."""
    check_policy(policy)
    bn_paths = bn_module_paths(variables)
    is_local = local_matcher(variables, local)
    parts: dict[Role, dict[Path, Any]] = {"shared": {}, "pooled": {}, "local": {}}
    for path, leaf in flatten(variables).items():
        parts[leaf_role(path, policy, bn_paths, is_local)][path] = leaf
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
    has no BN layer at all, when the shared parameters are the whole model. None under every
    policy when parameters are local (a personal head or body: FedPer, LG-FedAvg, FedRep); see
    :func:`fallback_variables` for a model that serves clients without one.
    """
    check_policy(policy)
    if local_C.get("params"):
        return None
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


def fallback_variables(
    policy: Policy,
    shared: Variables,
    pooled: Variables,
    local_C: Variables,
    weights_C: jax.Array,
) -> Variables:
    """A model for a client with no personal parts of its own (one that never trained): the
    policy's global model where it has one, else the global shared and pooled leaves plus the
    clients' local leaves averaged by ``weights_C`` (training sizes; BN running statistics
    pooled into the statistics of the union, integer leaves client 0's), i.e. an averaged head
    for FedPer, an averaged body for LG-FedAvg, averaged BN layers for FedBN."""
    glob = global_variables(policy, shared, pooled, local_C, weights_C)
    if glob is not None:
        return glob
    return merge(shared, pooled, pool_batch_stats(local_C, weights_C, take_client(local_C, 0)))

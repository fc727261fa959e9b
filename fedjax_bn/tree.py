"""Path predicates over Flax variable trees and the split of a model by BN policy.

Which ``params`` belong to a BatchNorm layer is found structurally: a params leaf is a BN leaf
when its module path also appears in the ``batch_stats`` collection. Names are never matched,
so nested and renamed BN layers are found.

A policy assigns every leaf one of three roles (DESIGN.md's table):

- ``shared``: averaged on the server, weighted by example counts;
- ``pooled``: BN running statistics pooled into one global set (fedavg);
- ``local``: kept per client, never leaves it.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

Variables = dict[str, Any]
Path = tuple[str, ...]
Role = Literal["shared", "pooled", "local"]
Policy = Literal["fedavg", "fedbn", "silobn"]
POLICIES: tuple[str, ...] = ("fedavg", "fedbn", "silobn")


class Parts(NamedTuple):
    """A variables tree split by role; each part is a nested dict (possibly empty)."""

    shared: Variables
    pooled: Variables
    local: Variables


def flatten(variables: Variables) -> dict[Path, Any]:
    """Nested dict -> {path tuple: leaf}."""
    return traverse_util.flatten_dict(variables) if variables else {}


def unflatten(flat: dict[Path, Any]) -> Variables:
    """{path tuple: leaf} -> nested dict (plain dicts, so trees compare equal by structure)."""
    return traverse_util.unflatten_dict(flat) if flat else {}


def bn_module_paths(variables: Variables) -> frozenset[Path]:
    """Module paths (without the collection name) that hold BatchNorm running statistics."""
    stats = flatten(variables.get("batch_stats", {}))
    return frozenset(path[:-1] for path in stats)


def is_bn_path(path: Path, bn_paths: frozenset[Path]) -> bool:
    """Whether a full variables path (collection first) belongs to a BatchNorm layer."""
    return path[0] == "batch_stats" or path[1:-1] in bn_paths


def is_integer_leaf(x: Any) -> bool:
    """Integer and boolean leaves (counters, steps) are never averaged."""
    dtype = jnp.result_type(x)
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)


def bn_param_mask(variables: Variables) -> Any:
    """A bool pytree over ``variables['params']``: True on BatchNorm scale/bias leaves."""
    bn_paths = bn_module_paths(variables)
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: tuple(k.key for k in kp)[:-1] in bn_paths, variables["params"]
    )


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


def check_same_structure(expected: Any, got: Any, what: str) -> None:
    """Raise a ValueError naming the first differing path when two trees do not match."""
    want = {p: (jnp.shape(v), jnp.result_type(v)) for p, v in flatten(expected).items()}
    have = {p: (jnp.shape(v), jnp.result_type(v)) for p, v in flatten(got).items()}
    if want.keys() != have.keys():
        missing = sorted("/".join(p) for p in want.keys() - have.keys())
        extra = sorted("/".join(p) for p in have.keys() - want.keys())
        raise ValueError(f"{what}: variable trees differ; missing {missing}, unexpected {extra}.")
    for path, spec in want.items():
        if have[path] != spec:
            raise ValueError(
                f"{what}: {'/'.join(path)} has shape/dtype {have[path]}, expected {spec}."
            )

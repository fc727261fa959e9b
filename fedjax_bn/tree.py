"""Generic pytree helpers: nested-dict paths, the leading client axis, structure checks.

Nothing here knows about BatchNorm; what a leaf *is* (shared, pooled, local) is decided in
``policy.py`` alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

Variables = dict[str, Any]
Path = tuple[str, ...]


def flatten(variables: Variables) -> dict[Path, Any]:
    """Nested dict -> {path tuple: leaf}."""
    return traverse_util.flatten_dict(variables) if variables else {}


def unflatten(flat: dict[Path, Any]) -> Variables:
    """{path tuple: leaf} -> nested dict (plain dicts, so trees compare equal by structure)."""
    return traverse_util.unflatten_dict(flat) if flat else {}


def is_integer_leaf(x: Any) -> bool:
    """Integer and boolean leaves (counters, steps) are never averaged or stepped."""
    dtype = jnp.result_type(x)
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)


def repeat_clients(tree: Any, num_clients: int) -> Any:
    """Every leaf repeated along a new leading client axis ``[num_clients, ...]``."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *jnp.shape(x))), tree)


def take_client(stacked: Any, c: Any) -> Any:
    """Client ``c``'s slice of a stacked tree (``c`` an int, a traced index or an index array)."""
    return jax.tree.map(lambda x: x[c], stacked)


def put_client(stacked: Any, c: Any, tree: Any) -> Any:
    """``stacked`` with client ``c``'s slice replaced by ``tree`` (functional ``.at[c].set``)."""
    return jax.tree.map(lambda s, v: s.at[c].set(v), stacked, tree)


def concat_clients(parts: list[Any]) -> Any:
    """Stacked trees concatenated along the client axis."""
    return parts[0] if len(parts) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


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

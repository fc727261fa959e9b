"""Tests for fedjax_bn.tree: generic tree checks (structure, integer leaves)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import pytest

from fedjax_bn.tree import check_same_structure, is_integer_leaf


def test_check_same_structure_names_the_difference() -> None:
    """Missing, extra and reshaped leaves are named in the error."""
    a = {"params": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}}
    check_same_structure(a, a, "x")
    with pytest.raises(ValueError, match=r"what: .*missing \['params/b'\]"):
        check_same_structure(a, {"params": {"w": a["params"]["w"]}}, "what")
    with pytest.raises(ValueError, match=r"unexpected \['params/c'\]"):
        check_same_structure(a, {"params": {**a["params"], "c": jnp.zeros(1)}}, "what")
    with pytest.raises(ValueError, match="params/w has shape/dtype"):
        check_same_structure(a, {"params": {**a["params"], "w": jnp.zeros((3, 2))}}, "what")
    with pytest.raises(ValueError, match="params/b has shape/dtype"):
        check_same_structure(a, {"params": {**a["params"], "b": jnp.zeros(3, jnp.int32)}}, "w")


@pytest.mark.parametrize(
    ("dtype", "integer"),
    [
        (jnp.int32, True),
        (jnp.uint8, True),
        (jnp.bool_, True),
        (jnp.float32, False),
        (jnp.bfloat16, False),
        (jnp.float16, False),
    ],
)
def test_is_integer_leaf(dtype: Any, integer: bool) -> None:
    """Integer and bool leaves are never averaged; float leaves of any width are."""
    assert is_integer_leaf(jnp.zeros(2, dtype)) is integer

"""Save and restore a run's state with orbax: atomic, the last ``n`` kept, restored exactly.

A run checkpoint holds the algorithm's whole ``FedState`` (server and every client's state),
the PRNG key the next round splits, the number of rounds done, and small integer metadata the
caller needs to continue exactly (e.g. the history file's byte offset, a sampler position).
orbax writes each checkpoint to a temporary directory and renames it when complete, so a crash
while writing leaves the previous checkpoint usable. ``orbax`` is imported here, not with
``fedjax_bn``.

    ckpt = Checkpointer(path, max_to_keep=2)
    ckpt.save(round_num, state, key, history_offset=123)
    round_num, state, key, meta = ckpt.restore(like=state)  # the latest
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import jax

Array = jax.Array


class Restored(NamedTuple):
    """A restored run: rounds done, its state, the next key, and the saved metadata."""

    round: int
    state: Any
    key: Array
    meta: dict[str, int]


class Checkpointer:
    """A directory of run checkpoints, one per saved round number (orbax ``CheckpointManager``)."""

    def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int = 2) -> None:
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).expanduser().resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_round(self) -> int | None:
        """The newest complete checkpoint's round number, or None."""
        return self._manager.latest_step()

    def save(self, round_num: int, state: Any, key: Array, **meta: int) -> None:
        """Checkpoint the state after ``round_num`` rounds and the key the next round splits."""
        ocp = self._ocp
        tree = {"state": state, "key": jax.random.key_data(key)}
        meta = {k: int(v) for k, v in meta.items()}
        args = ocp.args.Composite(
            tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave({**meta, "round": round_num})
        )
        self._manager.save(round_num, args=args, force=True)
        self._manager.wait_until_finished()

    def restore(self, like: Any, round_num: int | None = None) -> Restored:
        """The checkpoint of ``round_num`` (default: the latest), shaped like ``like`` (a state
        of the same algorithm, e.g. ``alg.init(...)``'s)."""
        ocp = self._ocp
        step = self.latest_round() if round_num is None else round_num
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = {"state": like, "key": jax.random.key_data(jax.random.key(0))}
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                tree=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        meta = dict(out["meta"])
        done = int(meta.pop("round"))
        key = jax.random.wrap_key_data(out["tree"]["key"])
        return Restored(done, out["tree"]["state"], key, meta)

    def close(self) -> None:
        self._manager.close()

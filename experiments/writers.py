"""Where a training run's rows go as they are made (flax examples' metric writers): the JSON-lines
history (what resume, the report and the docs read), the progress bar, and TensorBoard.

Every writer takes the same row dict once per round and is closed at the end of the run; the
history writer alone is the record (it is flushed every round), the others are views of it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from tqdm.auto import tqdm

from experiments.history import Row, clean

# Row keys that are coordinates or bookkeeping, not scalars to plot over rounds.
NOT_SCALARS = frozenset({"round", "seed", "wall"})


class MetricWriter(Protocol):
    """Takes one row per round; closed once at the end of the run."""

    def write(self, row: Row) -> None: ...

    def close(self) -> None: ...


class HistoryWriter:
    """Appends one JSON object per round to a run's history file and flushes it every round."""

    def __init__(self, path: Path, *, append: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO = path.open("a" if append else "w")

    def write(self, row: Row) -> None:
        """Write one row and flush it, so an interrupted run keeps every finished round."""
        self._file.write(json.dumps(clean(row)) + "\n")
        self._file.flush()

    def offset(self) -> int:
        """Bytes written so far (where a resumed run cuts the file back to)."""
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


class ProgressWriter:
    """A tqdm bar over the run's rounds with the last train loss and evaluated accuracy."""

    def __init__(self, desc: str, *, done: int, total: int, enabled: bool = True) -> None:
        self._bar = tqdm(
            desc=desc, unit="round", initial=done, total=total, disable=not enabled, file=sys.stderr
        )
        self._acc: float | None = None

    def write(self, row: Row) -> None:
        if row.get("client_acc") is not None:
            self._acc = row["client_acc"]
        shown = {"loss": f"{row['train_loss']:.3f}"}
        shown["acc"] = "-" if self._acc is None else f"{self._acc:.3f}"
        if row.get("epsilon") is not None:
            shown["eps"] = f"{row['epsilon']:.2f}"
        self._bar.set_postfix(shown)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def scalars(row: Row) -> dict[str, float]:
    """A row's plottable scalars: numbers (not flags or coordinates), per-layer dicts flattened
    to ``name/layer``; missing (None) and non-finite values left out, as the history writes them
    (``history.clean``: null)."""
    out: dict[str, float] = {}
    for key, value in clean(row).items():
        if key in NOT_SCALARS or isinstance(value, bool | str) or value is None:
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if v is not None})
        elif isinstance(value, int | float):
            out[key] = float(value)
    return out


class TensorBoardWriter:
    """TensorBoard event files (``tensorboardX``: no TensorFlow needed) in ``logdir``, one scalar
    per row column, stepped by round; ``tensorboard --logdir <out_dir>/tensorboard`` shows every
    run of a study. A resumed run purges the steps after its checkpoint, as the history does."""

    def __init__(self, logdir: Path, *, done: int = 0) -> None:
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(logdir), purge_step=done + 1 if done else None)

    def write(self, row: Row) -> None:
        for name, value in scalars(row).items():
            self._writer.add_scalar(name, value, row["round"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def tensorboard_available() -> bool:
    """Whether ``tensorboardX`` imports (it is in the ``experiments`` extra)."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


class Writers:
    """Several writers as one: each row to every writer, every writer closed (even on error)."""

    def __init__(self, writers: Sequence[Any]) -> None:
        self.writers = list(writers)

    def write(self, row: Row) -> None:
        for w in self.writers:
            w.write(row)

    def close(self) -> None:
        errors = []
        for w in self.writers:
            try:
                w.close()
            except Exception as e:  # noqa: BLE001 - close the rest, then raise the first
                errors.append(e)
        if errors:
            raise errors[0]

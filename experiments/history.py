"""A run's per-round history as written and read back: one JSON object per round (a ``Row``), the
columns it holds, and the summary of one run."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]
FINAL_METRICS = ("global_acc", "client_acc", "train_loss", "bn_div", "probe_div", "affine_div")
# Columns every history row has; any other ``train_<name>``/``global_<name>`` is a task metric.
BUILTIN_COLUMNS = frozenset({"train_loss", "train_acc", "global_loss", "global_acc"})
# Attacked runs only (experiments/attacks.py): the attack's kind, share, scale and client ids.
ATTACK_COLUMNS = ("attack", "attack_fraction", "attack_scale", "attackers")
DP_METRICS = ("epsilon", "dp_clip")  # DP runs only: epsilon after the round, the clip it set
WIRE_COLUMNS = ("uplink_bytes", "downlink_bytes")  # per round; a run's summary holds the sums


def dp_columns(rows: Iterable[Row]) -> list[str]:
    """The DP columns present in ``rows`` (none for a run without DP)."""
    keys = {k for r in rows for k in r}
    return [k for k in DP_METRICS if k in keys]


def metric_columns(rows: Iterable[Row]) -> list[str]:
    """The task-metric columns (``train_<name>``, ``global_<name>``) of ``rows``, besides the
    built-in ones, in first-seen order."""
    keys = dict.fromkeys(k for r in rows for k in r if k.startswith(("train_", "global_")))
    return [k for k in keys if k not in BUILTIN_COLUMNS]


def clean(value: Any) -> Any:
    """JSON-safe: numpy/jax scalars to floats, NaN/inf to None, containers recursively."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, str | bool | int) or value is None:
        return value
    x = float(value)
    return x if math.isfinite(x) else None


def split_label(label: str) -> tuple[str, str]:
    """``(setting, point)`` of a run label: a sweep point's ``<setting>@<field>=<value>,...``
    (``experiments/sweep.py``), or ``(label, "")`` for a run outside a sweep."""
    setting, _, point = label.partition("@")
    return setting, point


def history_path(out_dir: Path, setting: str, algorithm: str, seed: int) -> Path:
    """Where one run's per-round history lives."""
    return out_dir / "history" / f"{setting}__{algorithm}__seed{seed}.jsonl"


def read_history(path: Path) -> list[Row]:
    """The rows of one history file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_value(rows: Sequence[Row], key: str) -> float | None:
    """The last non-null value of ``key`` over rows (e.g. the last evaluated accuracy)."""
    for row in reversed(rows):
        if row.get(key) is not None:
            return row[key]
    return None


def run_summary(rows: Sequence[Row]) -> Row:
    """Final metrics of one run; ``sec_per_round`` excludes round 1 (it compiles); the total
    uplink and downlink bytes over its rounds."""
    seconds = [r["seconds"] for r in rows]
    steady = seconds[1:] or seconds
    keys = (*FINAL_METRICS, *metric_columns(rows), *dp_columns(rows))
    out = {k: last_value(rows, k) for k in keys}
    out.update(
        setting=rows[0]["setting"],
        algorithm=rows[0]["algorithm"],
        seed=rows[0]["seed"],
        rounds=len(rows),
        sec_per_round=float(np.mean(steady)),
        first_round_sec=seconds[0],
        wall_sec=rows[-1]["wall"],
        bn_div_source=rows[-1].get("bn_div_source"),
    )
    out.update({k: sum(r[k] for r in rows) for k in WIRE_COLUMNS if k in rows[0]})
    out.update({k: rows[0][k] for k in ATTACK_COLUMNS if k in rows[0]})
    return out


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (no NaN), indented."""
    path.write_text(json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")


# The statistics a row's ``bn_div`` was computed from (its ``bn_div_source``, see
# ``fedjax_bn.monitor.stats_source``): the tag shown next to each value, and what it means.
BN_SOURCES: dict[str, tuple[str, str]] = {
    "probe": ("probe", "batch statistics of a fixed probe batch through each client's model"),
    "local": ("running", "each client's own BN running statistics (kept local)"),
    "round": ("post-round", "clients' running statistics after local training, before pooling"),
}


def source_tag(source: str | None) -> str:
    """``'[probe]'`` for a ``bn_div_source`` (``'probe/running'`` if mixed), '' when unknown."""
    if not source:
        return ""
    return "[" + "/".join(BN_SOURCES.get(s, (s, ""))[0] for s in source.split("/")) + "]"


def source_notes(sources: Iterable[str | None]) -> list[str]:
    """One ``[tag] meaning`` line per distinct source in ``sources``, in first-seen order."""
    seen = dict.fromkeys(s for src in sources if src for s in src.split("/"))
    return [f"{source_tag(s)} = {BN_SOURCES.get(s, (s, 'unknown source'))[1]}" for s in seen]

"""The metric writers: every row reaches each writer; TensorBoard gets one scalar per column."""

from __future__ import annotations

import pytest

from experiments import history, writers


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the event files in ``logdir`` (TFRecord framing:
    u64 length, u32 crc, payload, u32 crc; payloads are ``Event`` protos)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            n = int.from_bytes(data[pos : pos + 8], "little")
            event = Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_scalars_flatten_per_layer_dicts_and_skip_flags_coordinates_and_non_finite() -> None:
    row = {
        "setting": "s",
        "round": 3,
        "seed": 0,
        "wall": 1.5,
        "train_loss": 0.25,
        "global_acc": None,
        "quarantined": [],
        "bn_div_layers": {"bn0": 1.0, "bn1": None, "bn2": float("nan")},
        "bn_div": float("nan"),  # the history writes null: TensorBoard gets no point either
        "update_norm": float("inf"),
        "flag": True,
        "count": 2,
    }
    assert writers.scalars(row) == {"train_loss": 0.25, "bn_div_layers/bn0": 1.0, "count": 2.0}


def test_history_writer_rows_read_back_and_offset_counts_bytes(tmp_path) -> None:
    path = tmp_path / "h.jsonl"
    w = writers.HistoryWriter(path)
    w.write({"round": 1, "x": float("nan")})
    first = w.offset()
    w.write({"round": 2, "x": 1.0})
    w.close()
    assert history.read_history(path) == [{"round": 1, "x": None}, {"round": 2, "x": 1.0}]
    assert 0 < first < path.stat().st_size


def test_tensorboard_writer_writes_each_column_by_round(tmp_path) -> None:
    pytest.importorskip("tensorboardX")
    w = writers.TensorBoardWriter(tmp_path)
    for rnd in (1, 2):
        w.write({"round": rnd, "train_loss": 1.0 / rnd, "bn_div_layers": {"bn0": float(rnd)}})
    w.close()
    got = read_scalars(tmp_path)
    assert got["train_loss"] == [(1, 1.0), (2, 0.5)]
    assert got["bn_div_layers/bn0"] == [(1, 1.0), (2, 2.0)]


def test_writers_close_every_writer_even_when_one_fails() -> None:
    closed = []

    class Boom:
        def write(self, row): ...

        def close(self):
            raise OSError("disk")

    class Ok:
        def write(self, row): ...

        def close(self):
            closed.append(True)

    with pytest.raises(OSError, match="disk"):
        writers.Writers([Boom(), Ok()]).close()
    assert closed == [True]

"""Reading and writing IDX files, the format of MNIST and Fashion-MNIST (pure numpy).

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions),
one big-endian uint32 per dimension, then the values in C order, big-endian. Files may be
gzipped; :func:`read_idx` detects that from the gzip magic bytes, not from the file name.
"""

from __future__ import annotations

import gzip as gzip_lib
import os
import zlib
from pathlib import Path

import numpy as np

# IDX dtype code -> the big-endian numpy dtype of the payload.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_HEADER = 4  # bytes of the magic number
_MAX_DIM = 2**32 - 1


def _name(dtype: np.dtype) -> str:
    """The dtype's name without byte order, e.g. ``int16``."""
    return dtype.newbyteorder("=").name


def _codes() -> str:
    """The known dtype codes, for error messages."""
    return ", ".join(f"0x{code:02X} {_name(dtype)}" for code, dtype in IDX_DTYPES.items())


def _decompress(raw: bytes, path: Path) -> bytes:
    """``raw`` itself, or its gunzipped content when it starts with the gzip magic bytes."""
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip_lib.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt gzip data ({err}).") from err


def _parse_header(data: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(payload dtype, shape, payload offset) from the magic number and dimensions."""
    if len(data) < _HEADER:
        raise ValueError(f"{path}: truncated IDX header: {len(data)} bytes, need at least 4.")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0:
        raise ValueError(
            f"{path}: bad magic number 0x{data[:4].hex().upper()}: an IDX file starts with "
            "two zero bytes, a dtype code and the number of dimensions."
        )
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02X}; known: {_codes()}.")
    if ndim < 1:
        raise ValueError(f"{path}: IDX header has 0 dimensions; need at least 1.")
    offset = _HEADER + 4 * ndim
    if len(data) < offset:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need {offset} bytes, got {len(data)}."
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=_HEADER))
    return IDX_DTYPES[code], shape, offset


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in IDX file ``path`` (gzipped or not), in native byte order.

    Raises ValueError naming the file when the magic number, the dtype code or the payload
    size (exactly prod(shape) * itemsize bytes after the header) is wrong.
    """
    path = Path(path)
    data = _decompress(path.read_bytes(), path)
    dtype, shape, offset = _parse_header(data, path)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(data) - offset
    if got < expected:
        raise ValueError(
            f"{path}: truncated IDX payload: shape {shape} of {_name(dtype)} "
            f"needs {expected} bytes, got {got}."
        )
    if got > expected:
        raise ValueError(
            f"{path}: {got - expected} trailing bytes after the IDX payload (shape {shape} of "
            f"{_name(dtype)} is {expected} bytes, the file holds {got})."
        )
    flat = np.frombuffer(data, dtype=dtype, offset=offset)
    return flat.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _code_of(dtype: np.dtype) -> int:
    """The IDX dtype code of ``dtype`` (any byte order), or ValueError listing the known ones."""
    for code, idx_dtype in IDX_DTYPES.items():
        if np.dtype(dtype).newbyteorder("=") == idx_dtype.newbyteorder("="):
            return code
    raise ValueError(f"IDX cannot store dtype {np.dtype(dtype).name}; supported: {_codes()}.")


def idx_bytes(array: np.ndarray) -> bytes:
    """The uncompressed IDX encoding of ``array`` (at least 1-D, a dtype IDX supports)."""
    array = np.asarray(array)
    code = _code_of(array.dtype)
    if array.ndim < 1 or array.ndim > 255:
        raise ValueError(f"IDX stores 1 to 255 dimensions, got shape {array.shape}.")
    if any(d > _MAX_DIM for d in array.shape):
        raise ValueError(f"IDX dimensions must fit in uint32, got shape {array.shape}.")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()


def write_idx(path: str | os.PathLike[str], array: np.ndarray, *, gzip: bool = False) -> Path:
    """Writes ``array`` to ``path`` as an IDX file, gzipped (deterministically) if ``gzip``.

    The file name is not changed: add ``.gz`` yourself if you want it. Returns the path.
    """
    path = Path(path)
    data = idx_bytes(array)
    path.write_bytes(gzip_lib.compress(data, mtime=0) if gzip else data)
    return path

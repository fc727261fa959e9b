"""``fedjax_bn.compression``: the compressors of :mod:`fedjax_bn.compress` under the name the
issue's examples use (``fb.compression.quantize(bits=4)``)."""

from fedjax_bn.compress import (
    Compressor,
    WireBytes,
    client_bytes,
    error_feedback,
    message_bytes,
    quantize,
    raw_bytes,
    round_bytes,
    stc,
    top_k,
)

__all__ = [
    "Compressor",
    "WireBytes",
    "client_bytes",
    "error_feedback",
    "message_bytes",
    "quantize",
    "raw_bytes",
    "round_bytes",
    "stc",
    "top_k",
]

"""Compression of what clients send, with its bytes counted (also ``fedjax_bn.compression``):
``make_algorithm(..., compress=quantize(bits=4))`` or ``compress=error_feedback(top_k(0.01))``.

See ``docs/robust_and_compression.md`` for what is compressed and how bytes are counted.
"""

from fedjax_bn.compress.transforms import (
    Compressor,
    FeedbackState,
    error_feedback,
    quantize,
    stc,
    stochastic_round,
    top_k,
)
from fedjax_bn.compress.wire import (
    WireBytes,
    broadcast_of,
    client_bytes,
    message_bytes,
    raw_bytes,
    round_bytes,
)

__all__ = [
    "Compressor",
    "FeedbackState",
    "WireBytes",
    "broadcast_of",
    "client_bytes",
    "error_feedback",
    "message_bytes",
    "quantize",
    "raw_bytes",
    "round_bytes",
    "stc",
    "stochastic_round",
    "top_k",
]

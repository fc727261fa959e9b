"""``fedjax_bn.compression``: the compressors of :mod:`fedjax_bn.compress` under the name the
issue's examples use (``fb.compression.quantize(bits=4)``)."""

from fedjax_bn.compress import *  # noqa: F403
from fedjax_bn.compress import __all__  # noqa: F401  (the same public names)

"""Deploy any fedjax_bn :class:`~fedjax_bn.algorithms.Algorithm` on Flower (optional extra).

``pip install "fedjax_bn[flower]"``. The same algorithm object a simulation used runs as a
Flower ``ServerApp`` (:func:`server_app`: ``init`` and ``server_update``) and ``ClientApp``
(:func:`client_app`: ``client_init``, the library's local loop, ``client_final``), each client's
persistent state (its ``FedState.clients`` row) kept in the client's ``Context.state``.
Messages travel as Flower ``ArrayRecord`` s keyed by pytree path (:mod:`.records`): no pickling,
dtypes kept. See ``docs/deploy.md``.

``import fedjax_bn`` never imports this package; importing it without Flower installed raises
an ImportError naming the extra.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError('fedjax_bn.flower needs Flower: pip install "fedjax_bn[flower]"') from err

from fedjax_bn.flower.client import ClientRunner, Layout, client_app, size_reply, train_reply
from fedjax_bn.flower.records import from_record, stack_trees, to_record
from fedjax_bn.flower.server import ServerRunner, run_server, server_app

__all__ = [
    "ClientRunner",
    "Layout",
    "ServerRunner",
    "client_app",
    "from_record",
    "run_server",
    "server_app",
    "size_reply",
    "stack_trees",
    "to_record",
    "train_reply",
]

"""User-level differential privacy: DP-FedAvg (``gaussian``, fixed or adaptive clipping) as
``make_algorithm(..., dp=gaussian(...))``, and its accountant over ``dp_accounting``
(``epsilon``, ``calibrate_noise``). ``docs/privacy.md`` says what leaves a client under each
BN policy. Importing this package does not import ``dp_accounting``; the accountant's
functions do, when called."""

from fedjax_bn.privacy.accountant import calibrate_noise, dp_event, epsilon
from fedjax_bn.privacy.dp_fedavg import DPMessage, DPServer, DPState, privatize
from fedjax_bn.privacy.gaussian import Gaussian, gaussian

__all__ = [
    "DPMessage",
    "DPServer",
    "DPState",
    "Gaussian",
    "calibrate_noise",
    "dp_event",
    "epsilon",
    "gaussian",
    "privatize",
]

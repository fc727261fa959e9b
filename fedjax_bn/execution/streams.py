"""The ``fold_in`` streams of a round key: each use of the key gets its own stream, so a
round's cohort, budgets, batches and step keys never correlate.

A cohort round folds the round key with ``SAMPLER_STREAM`` (which clients train) and
``EXECUTOR_STREAM`` (the key its executor gets); every round draws its budgets from
``BUDGET_STREAM``; an executor gives each client's steps keys from its key's ``STEP_STREAM``
(``loop.client_key``). The batches' shuffle uses an executor's key itself.
"""

from __future__ import annotations

SAMPLER_STREAM = 0
EXECUTOR_STREAM = 1
BUDGET_STREAM = 2
STEP_STREAM = 3

"""The digits BatchNorm study: the embedded default, named explicitly."""

from __future__ import annotations

import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
    """Exactly ``base.get_config()``; here so the study can be named on the command line."""
    return base.get_config()

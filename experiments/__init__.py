"""Experiment scripts around fedjax_bn: configs, a runner, reports. No library logic lives here."""

"""Experiment configs: ``base.py`` holds the default; every other module overrides it."""

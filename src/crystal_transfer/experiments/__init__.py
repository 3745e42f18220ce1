"""Experiments: the stages that train or use models, each a function the command line calls."""

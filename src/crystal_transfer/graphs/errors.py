"""Errors of the graphs stage."""

from __future__ import annotations

from crystal_transfer.errors import UserError
from crystal_transfer.graphs import neighbours


class GraphStageError(UserError):
    """The graphs stage cannot run or its outputs cannot be trusted (stale, corrupted or missing shards)."""


class NeighbourSearchError(GraphStageError, neighbours.NeighbourSearchError):
    """The neighbour search refused crystal ``crystal`` (index in its batch) of a batch; ``what`` says why."""

"""Errors the user can act on. The command line prints them as one line and exits with status 2.

Anything else is a bug and keeps its traceback. A stage raises a :class:`UserError` subclass for a bad
config, bad input, a missing or damaged file, or settings that cannot work together.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave (config, files, arguments), with a message saying what to do."""


class InputError(UserError, ValueError):
    """A value in the user's config, arguments or data that cannot be used."""


class MissingError(UserError, KeyError):
    """Something the user named (an id, a label, a model) is not there."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""

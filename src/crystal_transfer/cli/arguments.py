"""Argument types shared by the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crystal_transfer.errors import InputError


def json_arg(text: str) -> Any:
    """A JSON value given inline or as ``@file`` (the workflow passes config sections this way)."""
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise InputError(f"JSON argument file not found: {path}")
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc}): {text[:80]!r}") from None


def level(text: str) -> int | str:
    """A feature level: an integer number of convolutions, or 'crystal'."""
    return text if text == "crystal" else int(text)

"""Reading and writing torch files (weights, checkpoints, feature caches): plain tensors only, the same bytes for
the same content, and one clear message for a file that is damaged or holds more than tensors.

``torch.save`` to a path names the archive's inner folder after the file, so writing through a temporary file
would put a random name inside the bytes; writing through an open handle gives torch's fixed name instead, and
identical runs give identical files (and sha256). Loading always uses ``weights_only=True``: a file holding other
Python objects is refused, and the message never suggests loading it unsafely.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from crystal_transfer.atomic import atomic_path
from crystal_transfer.errors import UserError


class TensorFileError(UserError):
    """A torch file that cannot be used: truncated or damaged, or holding objects other than tensors."""


class DamagedTensorFile(TensorFileError):
    """The file is truncated or its bytes are damaged."""


class UnsafeTensorFile(TensorFileError):
    """The file holds Python objects that loading would have to unpickle; it is refused."""


def save_tensors(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically, byte-identical for identical
    content."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def load_tensors(source: str | Path | bytes, what: str, map_location: Any = "cpu", safe_globals: list | None = None):
    """``torch.load(..., weights_only=True)`` of a path or bytes; ``what`` names the file in the messages.

    ``safe_globals``: extra types the file may hold (e.g. ``argparse.Namespace`` in CGCNN's published checkpoints).
    """
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with torch.serialization.safe_globals(list(safe_globals or [])):
            return torch.load(handle, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises weights_only=False; that would run whatever code the file carries
        match = re.search(r"GLOBAL ([\w.]+)", str(exc))
        found = match.group(1) if match else ""
        raise UnsafeTensorFile(
            f"{what} holds Python objects other than tensors{f' ({found})' if found else ''}: refused, it is never "
            "unpickled; use a file written by this project or a published checkpoint it knows"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        first = " ".join(str(exc).split())[:160]
        raise DamagedTensorFile(f"{what} is truncated or damaged ({type(exc).__name__}: {first})") from None

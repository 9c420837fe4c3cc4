"""Atomic writes: every file fastflow writes goes through here.

A temporary file in the same folder is written, flushed, fsynced and renamed over the target, so a kill at
any moment leaves either the old file or the new one, never half of one. The temporary file is named
``.<name>.<random>.tmp``; one that a kill left behind is removed by :func:`remove_stale_temps`.

:func:`fault` is the crash-consistency test hook: with ``FASTFLOW_FAULT=<point>:<step>`` in the environment the
process SIGKILLs itself when it reaches that point at that step (tests/fastflow/test_resume.py).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save",
    "check_writable",
    "remove_stale_temps",
    "fault",
]

_FAULT = os.environ.get("FASTFLOW_FAULT", "")


def fault(point: str, step: int) -> None:
    """SIGKILL this process if ``FASTFLOW_FAULT`` is ``"<point>:<step>"``, or ``"<point>:<step>@<rank>"`` and
    this is that rank of a multi-process run (a test hook; a no-op otherwise)."""
    if not _FAULT:
        return
    where, _, rank = _FAULT.partition("@")
    if where == f"{point}:{step}" and (not rank or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it


def atomic_save(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then fsync and rename ``tmp_path`` over ``path``.

    ``write`` gets the path of an empty temporary file in ``path``'s folder and must write the whole content
    there (any writer that takes a file name: ``save_image``, ``savefig``, ``save_file``, ``torch.save``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_save(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_stale_temps(folder: str | Path, names) -> None:
    """Delete the temporary files (``.<name>.*.tmp``) that a kill during :func:`atomic_save` left in ``folder``.

    Only call this where no other process writes the same files at the same time.
    """
    folder = Path(folder)
    for name in names:
        for p in folder.glob(f".{name}.*.tmp"):
            try:
                p.unlink()
            except OSError:
                pass


def check_writable(path: str | Path, flag: str, kind: str = "any") -> None:
    """Fail early, before any work, if ``path`` cannot be written; ``kind`` is ``"dir"`` (a folder to write
    into, created if missing), ``"file"`` (a file to create or replace) or ``"any"`` (either).

    Checks, in order: no existing path of the wrong kind; the nearest existing ancestor is a folder (a path
    "under" a regular file cannot be created, even by root); that folder is writable.
    """
    from .errors import UserError

    path = Path(path)
    if kind not in ("dir", "file", "any"):
        raise ValueError(f"kind must be 'dir', 'file' or 'any', got {kind!r}")
    if str(path) in ("", "."):
        path = Path(".")
    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise UserError(f"{flag} {path}: is a file, not a folder")
        if kind == "file" and path.is_dir():
            raise UserError(f"{flag} {path}: is a folder, not a file")
        if not os.access(path, os.W_OK):
            raise UserError(f"{flag} {path}: not writable")
    probe = path if path.is_dir() else path.parent
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: creating under it would fail
            raise UserError(f"{flag} {path}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable")

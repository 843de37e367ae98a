"""Small file primitives: atomic replacement of a file, durable directory entries."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Makes the entries of directory ``path`` (created, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, text: str | bytes) -> None:
    """Replaces ``path`` by a file holding ``text``: written to a new file, fsynced, renamed over ``path``. A
    reader (or a process started after a crash) sees the old content or the new, never a mix."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))

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


# ``atomic_write`` writes ``<path>.tmp-<pid>`` first.
TMP_SUFFIX = ".tmp-"


def atomic_write(path: str, text: str | bytes) -> None:
    """Replaces ``path`` by a file holding ``text``: written to a new file, fsynced, renamed over ``path``. A
    reader (or a process started after a crash) sees the old content or the new, never a mix."""
    tmp = f"{path}{TMP_SUFFIX}{os.getpid()}"
    try:
        with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: no half-written temporary file is left behind
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def remove_stale_temporaries(directory: str) -> list[str]:
    """Removes the temporary files ``atomic_write`` left in ``directory`` when its process was killed (call it
    while holding the directory's lock, when no other writer can be mid-write); returns their names."""
    try:
        names = [n for n in os.listdir(directory) if TMP_SUFFIX in n]
    except OSError:
        return []
    for name in names:
        try:
            os.remove(os.path.join(directory, name))
        except OSError:
            pass
    return names

"""Exclusive, non-blocking file locks that name their holder.

A lock is an ``fcntl.flock`` on a file that holds the holder's PID. The kernel drops it when the holder's
process ends, however that ends (kill -9 included), so a dead holder never blocks anyone. Used for run
directories (``storage.RunStore``) and for the claims of sweep points (``results.ResultsStore.claim``).
"""

from __future__ import annotations

import errno
import fcntl
import os

_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


def try_lock(path: str) -> int | None:
    """Takes the exclusive lock on ``path`` (created if missing) and writes this process's PID into it.

    Returns:
      The lock file's descriptor (``release`` it, or close it, to unlock), or None if another process holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in _BUSY:
            return None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(fd: int) -> None:
    """Releases a lock taken by ``try_lock`` (the file stays: removing it would race with a new holder)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holder(path: str) -> int | None:
    """The PID of the process holding the lock on ``path``; None if nobody holds it, -1 if held by a process
    that has not written its PID yet."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in _BUSY:
                raise
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)

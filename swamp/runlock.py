"""The lock a process holds on a run directory while it trains the run: ``DIR/.lock``.

A POSIX record lock (``fcntl.lockf``): it belongs to the process, so DataLoader workers forked
while it is held do not keep it after their parent is killed, and the OS drops it when the
process ends however it ends. It also works across the nodes of a shared NFS filesystem. A
filesystem that refuses locks (some Lustre or NFS mounts) gets a warning and an unlocked run.
The file holds the holder's pid and host, for the message of whoever finds it taken.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
import warnings
from pathlib import Path

__all__ = ["LOCK_NAME", "RunLock", "holder"]

LOCK_NAME = ".lock"
_ATTEMPTS = 3   # tries of a lock found taken, 50 ms apart


class RunLock:
    """The lock of the run directory ``out``: :meth:`acquire`, then :meth:`release`."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / LOCK_NAME
        self._file = None

    def acquire(self) -> str | None:
        """Take the lock and return None, or return who holds it ("pid N on HOST"). Never
        raises OSError: a lock the filesystem refuses is warned of and skipped."""
        for attempt in range(_ATTEMPTS):   # a probe (:func:`holder`) holds a free lock for an instant
            self._file, taken_by = _locked(self.path)
            if taken_by is None or attempt == _ATTEMPTS - 1:
                break
            time.sleep(0.05)
        if self._file is not None:
            try:
                self._file.truncate(0)
                self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                self._file.flush()
            except OSError:   # a full disk: the lock holds, its file just cannot name us
                pass
        return taken_by

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _locked(path: Path):
    """(``path`` opened and locked, None), or (None, who holds it), or (None, None) with a warning
    when the filesystem refuses to lock it."""
    try:
        file = open(path, "a+", errors="replace")
    except OSError as error:
        return None, _unlocked(path, error)
    try:
        fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):   # EAGAIN / EACCES: another process has it
        file.seek(0)
        taken_by = file.read().strip() or "another process"
        file.close()
        return None, taken_by
    except OSError as error:   # ENOLCK, EOPNOTSUPP: no locks on this filesystem
        file.close()
        return None, _unlocked(path, error)
    return file, None


def _unlocked(path: Path, error: OSError) -> None:
    warnings.warn(f"{path}: cannot lock the run ({error}); a second `swamp resume` of it while it trains "
                  "would not be refused", stacklevel=4)


def holder(out: str | Path) -> str | None:
    """Who holds the lock of the run directory ``out`` (None: nobody), leaving the file as it
    was; a free lock is taken for an instant (:meth:`RunLock.acquire` retries past that). Not
    for the holding process itself: closing its probe would drop its own POSIX lock."""
    path = Path(out) / LOCK_NAME
    if not path.is_file():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a filesystem without locks: nobody can hold one
        file, taken_by = _locked(path)
    if file is not None:
        file.close()
    return taken_by

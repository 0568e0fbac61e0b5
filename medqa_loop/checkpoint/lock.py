"""One writer per run directory: a run holds an exclusive OS lock for its whole life.

The lock is ``flock`` on a file beside the run directory (``.<name>.lock`` in its parent), so
``--overwrite`` deleting the directory cannot delete the lock with it. The kernel drops the lock
when its process ends, SIGKILL included: there is never a stale lock to clear by hand. The file
says which process holds it (PID and host) for the error a second run gets. Only the main
process of a multi-process launch takes it; the others write nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path


# Locks this process holds, by lock file: a second run of the same process (a notebook, the
# tests, replay) shares it instead of refusing itself; other processes are refused.
_HELD: dict[Path, int] = {}


class RunDirectoryBusy(ValueError):
    """Another live run holds the run directory."""


class RunLock:
    def __init__(self, output_dir: Path):
        out = Path(output_dir).expanduser().resolve()
        self.path = out.parent / f".{out.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        if self.path in _HELD:
            return self  # this process holds it already; its first holder releases it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            try:
                who = json.loads(holder)
                who = f"process {who['pid']} on {who['host']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise RunDirectoryBusy(
                f"output_dir {self.path.parent / self.path.name[1:-5]} is in use by a live run ({who}); "
                "wait for it to end or pick another output_dir (--overwrite cannot take a live run's directory)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self.fd = _HELD[self.path] = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            del _HELD[self.path]
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __del__(self):
        self.release()

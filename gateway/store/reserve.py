"""Room kept for the databases on the storage file system.

An instance is answered Success once its file is in place; its index row is
written moments later.  Should the file system fill in between, the row
could not be written, and an acknowledged instance would be missing from the
index.  So a file of preallocated blocks (``<storage>/tmp/database-reserve``)
holds :data:`RESERVE_BYTES` for the databases: when a commit finds the disk
full, :meth:`SpaceReserve.release` gives the blocks back and the commit is
tried again, while the gateway refuses new work until the watermark probe
finds room to make the reserve again (:meth:`SpaceReserve.restore`).

Blocking: call these in a thread (the database's, or the disk pool).
"""

from __future__ import annotations

import os
import threading

from twisted.logger import Logger

#: Enough for the rows of every instance answered but not yet indexed and the
#: commits of their releases, many times over, and small beside any storage.
RESERVE_BYTES = 8 << 20


class SpaceReserve:
    log = Logger()

    def __init__(self, path: str, size: int = RESERVE_BYTES):
        self.path = path
        self.size = size
        self._lock = threading.Lock()
        self.held = False

    def restore(self) -> bool:
        """Hold the reserve; False when the file system has no room for it."""
        with self._lock:
            if self.held:
                return True
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, self.size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                self._truncate()
                return False
            self.held = True
            return True

    def release(self) -> bool:
        """Give the reserve's room back; False when it was not held."""
        with self._lock:
            if not self.held:
                return False
            self._truncate()
            self.held = False
        self.log.warn("the storage file system is full: its reserve of {size} bytes went to the "
                      "databases; new instances are refused until there is room again",
                      event="storage.reserve_released", size=self.size)
        return True

    def _truncate(self):
        try:
            os.truncate(self.path, 0)
        except OSError:
            pass

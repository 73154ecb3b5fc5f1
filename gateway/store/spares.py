"""Empty temporary files made ahead of need for the instance writers
(:mod:`gateway.store.writer`), in the disk pool."""

from __future__ import annotations

import os
from collections import deque

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from gateway.store import files

#: Temporary files kept ready for the next instances (see :class:`Spares`),
#: named ``tmp/spare-<run>-<n>.part``.
SPARES = 8
SPARE_PREFIX = "spare-"


def _discard_spare(path: str, fd: int) -> None:
    os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass


class Spares:
    """Empty temporary files created ahead of need, in the disk pool, a batch per job.

    Creating a file is the slowest step of storing an instance on some file
    systems (an inode and a directory entry: 0.02 to 0.5 ms of system time
    on the bench machines, depending on what the file system has been
    through), and it blocks whoever makes the call.  So a writer takes a
    ready file (:meth:`take`), and whenever half of them are used one pool
    job makes the next batch: one hand-off to a thread and back per
    ``keep // 2`` files, while the reactor goes on receiving.  When none is
    ready the writer is pooled and its job creates its file.  Spares are
    ``tmp/*.part`` files like any other: a crash leaves nothing that the
    start-up clean-up does not remove.
    """

    def __init__(self, storage, keep: int = SPARES):
        # storage: the gateway.store.writer.Storage whose tmp/ and pool are used
        self._storage = storage
        self.keep = keep
        self._ready: deque = deque()  # (path, fd, inode)
        self._closed = False
        self._making = False  # a pool job is making a batch ...
        self._batch = None  # ... and fires this when it is done

    def take(self):
        """A ready (path, fd, inode), or None; starts the next batch when
        half are used (reactor thread)."""
        spare = self._ready.popleft() if self._ready else None
        if len(self._ready) <= self.keep // 2:
            self.fill()
        return spare

    def fill(self) -> None:
        """Start a pool job making up to ``keep``, unless one runs (reactor thread)."""
        if self._making or self._closed or len(self._ready) >= self.keep:
            return
        self._making = True
        storage = self._storage
        paths = [storage.temporary_path(spare=True) for _ in range(self.keep - len(self._ready))]
        self._batch = deferToThreadPool(storage.reactor, storage.pool, _make_spares, paths)
        self._batch.addCallback(self._made)

    def _made(self, spares):
        self._making = False
        self._ready.extend(spares)

    def close(self):
        """Make no more; remove the ready files, and a batch being made once
        it is (in the pool)."""
        self._closed = True
        batch = self._batch if self._making else defer.succeed(None)

        def discard(_):
            spares, self._ready = list(self._ready), deque()
            return deferToThreadPool(self._storage.reactor, self._storage.pool, _discard_spares, spares)

        return batch.addCallback(discard)


def _make_spares(paths):
    """Pool thread: create the files; stops at the first failure (a full
    disk, say: writers will report it when they try)."""
    made = []
    for path in paths:
        try:
            fd = files.create_exclusive(path)
            made.append((path, fd, os.fstat(fd).st_ino))
        except OSError:
            break
    return made


def _discard_spares(spares):
    for path, fd, _inode in spares:
        _discard_spare(path, fd)

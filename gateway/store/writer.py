"""Streaming, non-blocking storage of received instances.

Each C-STORE gets an :class:`InstanceWriter`.  Dataset fragments are queued
as they come off the wire (memoryviews into received PDUs, no copy) and
written to a temporary file by a bounded thread pool, so the reactor never
blocks on the disk.  ``finish()`` flushes, optionally fsyncs, renames the file
atomically into place and fsyncs the directory; only then does its Deferred
fire, and only then may the C-STORE-RSP say Success.

All disk work of one writer runs in order: at most one pool job per writer
is in flight at a time, and it handles the operations queued before it
started and while it runs.  ``pending`` counts bytes queued and not yet
reported written, so the protocol can pause the transport when the disk
falls behind.

Write-behind: a job starts only once :data:`WRITE_BEHIND` bytes are queued,
or when the instance is finished or discarded.  Each job costs two thread
hand-offs (into the pool, back to the reactor); starting one per received
fragment made them the bulk of the work for small instances.  A job goes on
with whatever is queued while it runs, so a big instance is written as it
arrives and mostly finished by the job already running when its last
fragment comes.  A small instance is written, closed and renamed by one job.

Every byte is hashed (SHA-256) from memory as it is written, never read
back from the file.  The job that puts the file in place also picks the
indexed attributes out of the data set's first bytes
(:func:`gateway.store.header.header_attributes`), so ``finish()`` fires
with the complete record the index consumes.

Layout under the storage root (:class:`Storage` names each directory)::

    tmp/<random>.part                            instances being received
    tmp/database-reserve                         room kept for the databases (gateway.store.reserve)
    instances/<called AE>/<SOP Instance UID>.dcm  stored instances (Part 10)
    payloads/<payload id>/                       closed payloads (gateway.workflow)
    outputs/<payload id>/<pipeline>/             what pipelines wrote
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import threading
from collections import deque
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from gateway import IMPLEMENTATION_CLASS_UID
from gateway.dimse.sop import is_valid_uid
from gateway.interfaces import IInstanceStorage
from gateway.part10 import file_meta
from gateway.store.files import fsync_dir
from gateway.store.header import header_attributes
from gateway.store.reserve import SpaceReserve
from gateway.threads import WorkerPool


class StorageFull(OSError):
    """The disk (or quota) is full: answered with A700 Out of Resources."""


@dataclass(frozen=True)
class StoredInstance:
    """What the writer knows of an instance once it is durable: the record
    the index keeps."""

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    size: int  # bytes of the whole Part 10 file
    dataset_size: int
    replaced: bool  # an earlier copy of the same instance was overwritten
    sha256: str = ""  # of the whole file
    inode: int = 0
    #: The indexed header attributes (gateway.store.header), with ``header_error``.
    attributes: dict | None = None


_FINISH = object()

#: Queue this many bytes before a pool job writes them (see the module
#: docstring).  Well below the SCP's low-water mark, so an association that
#: is paused for its backlog always has a job running that will resume it.
WRITE_BEHIND = 256 << 10
_write = os.write  # the one disk write of the hot path (tests simulate a full disk here)
#: The first bytes of each data set are kept (copied): the indexed attributes
#: are picked out of them instead of reading the file.
HEAD_BYTES = 64 << 10
#: Temporary files kept ready for the next instances (see :class:`Spares`),
#: named ``tmp/spare-<random>.part``.
SPARES = 4
SPARE_PREFIX = "spare-"
#: The databases' reserve, in tmp/ (gateway.store.reserve).
RESERVE_FILE = "database-reserve"


class InstanceWriter:
    """Writes one instance; see the module docstring."""

    def __init__(self, storage: "Storage", final_path: str, header: bytes, meta: StoredInstance):
        self._storage = storage
        self._final = final_path
        self._tmp: str | None = None  # set by the first write (pool thread): a spare's, or a new one
        self._ops: deque = deque([header])
        self._header_len = len(header)
        self._meta = meta
        self._fd = -1
        self._hash = hashlib.sha256()  # of everything written so far (pool thread)
        self._head = bytearray()  # the first HEAD_BYTES of the data set (pool thread)
        self._header_written = False
        self._running = False
        self._failed: BaseException | None = None
        self._finishing = None
        self._closing = False  # _FINISH is queued: no more waiting for data
        self.pending = len(header)
        self.dataset_bytes = 0
        self.on_drained = None  # called (reactor thread) whenever pending drops

    # ---- reactor side ----------------------------------------------------

    def write(self, data) -> None:
        if self._failed is not None:
            return  # already failed: drop the rest, the response reports it
        self._ops.append(data)
        n = len(data)
        self.pending += n
        self.dataset_bytes += n
        if self.pending >= WRITE_BEHIND:
            self._kick()

    def finish(self):
        """Fire with a :class:`StoredInstance` once the file is durable."""
        d = self._finishing = Deferred()  # a job may fire it before _kick returns
        self._ops.append(_FINISH)
        self._closing = True
        self._kick()
        return d

    def discard(self) -> None:
        """Abandon the instance: the temporary file is removed."""
        # Queued writes are skipped once _failed is set; the pool job may be
        # popping from the queue right now, so it is not cleared here.
        self._failed = self._failed or ConnectionAbortedError("discarded")
        self._ops.append(_FINISH)
        self._closing = True
        self._kick()

    def _kick(self):
        if self._running or not self._ops:
            return
        if not self._closing and self.pending < WRITE_BEHIND:
            return  # wait for more data (or the end of the instance)
        self._running = True
        self._storage.pool.callInThread(self._job)

    def _job(self):
        """Pool thread: run the queued operations; hand the outcome to the
        reactor; then, once an instance is in place, make the spare files the
        next ones will take, while the peer reads the response."""
        try:
            result = self._drain()
        except BaseException as e:  # _drain never raises; should it, end the instance, never retry
            result = e
        self._storage.reactor.callFromThread(self._drained, result)
        if isinstance(result, tuple) and isinstance(result[1], StoredInstance):
            self._storage.spares.top_up()

    def _drained(self, result):
        self._running = False
        if isinstance(result, tuple):
            written, done = result
        else:
            written, done = 0, result
            self._failed = self._failed or done
            if not self._closing:  # later writes are dropped, and finish() reports it
                self._ops.clear()
                self.pending = written = 0
                done = None
        self.pending -= written
        if done is not None:
            self._complete(done)
            return None
        self._kick()
        if self.on_drained is not None:
            self.on_drained(self)
        return None

    def _complete(self, done):
        self._ops.clear()
        self.pending = 0
        d, self._finishing = self._finishing, None
        if d is not None:
            _fire(d, done)

    # ---- pool thread side -------------------------------------------------

    def _drain(self):
        """Run the queued operations, and any queued meanwhile; return (bytes
        written, outcome).

        outcome is None while the instance is still open, a StoredInstance on
        success, or the exception that ended it.
        """
        written = 0
        ops = self._ops
        try:
            while ops:
                op = ops.popleft()
                if op is _FINISH:
                    return written, self._close()
                if self._failed is not None:
                    written += len(op)
                    continue
                if self._fd < 0:
                    self._open()
                data = view = memoryview(op)
                if not self._header_written:  # the first op is our meta header
                    self._header_written = True
                elif len(self._head) < HEAD_BYTES:
                    self._head += view[:HEAD_BYTES - len(self._head)]
                while view:
                    n = _write(self._fd, view)
                    view = view[n:]
                written += len(op)
                self._hash.update(data)
        except OSError as e:
            self._failed = StorageFull(e.errno, e.strerror) if e.errno in (errno.ENOSPC, errno.EDQUOT) else e
        return written, None

    def _open(self):
        spare = self._storage.spares.take()
        if spare is not None:
            self._tmp, self._fd = spare
        else:
            self._tmp = self._storage.temporary_path()
            self._fd = _create(self._tmp)

    def _close(self):
        """Put the file in place; return its record, or the exception that stopped it."""
        try:
            if self._failed is not None:
                raise self._failed
            if self._fd < 0:  # nothing was ever written: still make the file
                self._open()
            size, inode, replaced = self._put_in_place()
        except BaseException as e:  # leave nothing behind
            self._abandon()
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                return StorageFull(e.errno, e.strerror)
            return e
        meta, head = self._meta, bytes(self._head)
        return StoredInstance(
            path=self._final,
            sop_class_uid=meta.sop_class_uid,
            sop_instance_uid=meta.sop_instance_uid,
            transfer_syntax_uid=meta.transfer_syntax_uid,
            size=size,
            dataset_size=size - self._header_len,
            replaced=replaced,
            sha256=self._hash.hexdigest(),
            inode=inode,
            attributes=header_attributes(self._final, head, meta.transfer_syntax_uid, len(head) < HEAD_BYTES),
        )

    def _put_in_place(self) -> tuple[int, int, bool]:
        """fsync (if asked), close, rename into place, fsync the directory;
        (size, inode, whether an earlier copy was replaced)."""
        fsync = self._storage.fsync
        if fsync:
            os.fsync(self._fd)
        st = os.fstat(self._fd)
        os.close(self._fd)
        self._fd = -1
        directory = os.path.dirname(self._final)
        replaced = os.path.exists(self._final)
        try:
            os.replace(self._tmp, self._final)
        except FileNotFoundError:  # the AE title's first instance (or its directory was removed)
            if not os.path.exists(self._tmp):
                raise
            os.makedirs(directory, exist_ok=True)
            if fsync:
                fsync_dir(os.path.dirname(directory))  # the new directory's own entry
            os.replace(self._tmp, self._final)
        if fsync:
            fsync_dir(directory)
        return st.st_size, st.st_ino, replaced

    def _abandon(self):
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass


def _fire(d: Deferred, outcome) -> None:
    """Fire ``d`` with an outcome from the pool: a result, or the exception."""
    if isinstance(outcome, BaseException):
        d.errback(outcome)
    else:
        d.callback(outcome)


def _create(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)


def _discard_spare(path: str, fd: int) -> None:
    os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass


class Spares:
    """Empty temporary files created ahead of need, in the disk pool.

    Creating a file is the slowest step of storing a small instance (an
    inode and a directory entry: 0.02 to 0.8 ms of system time here,
    depending on what the file system has been through).  A writer takes a
    ready file instead (:meth:`take`), and the job that put an instance in
    place makes the next ones (:meth:`top_up`) after handing its outcome to
    the reactor, while the association waits for its peer: no job of their
    own, nothing on the response's path.  When none is ready the writer
    creates its own.  Spares are ``tmp/*.part`` files like any other: a
    crash leaves nothing that the start-up clean-up does not remove.
    """

    def __init__(self, storage: "Storage", keep: int = SPARES):
        self._storage = storage
        self.keep = keep
        self._ready: deque = deque()  # (path, fd); deque appends and pops are thread-safe
        self._closed = False
        self._lock = threading.Lock()  # a spare made as close() empties the queue is not kept

    def take(self):
        """A ready (path, fd), or None.  Any thread."""
        try:
            return self._ready.popleft()
        except IndexError:
            return None

    def top_up(self) -> None:
        """Make up to ``keep`` ready (pool thread)."""
        for _ in range(self.keep - len(self._ready)):
            if self._closed:
                return
            path = self._storage.temporary_path(spare=True)
            try:
                fd = _create(path)
            except OSError:
                return  # a full disk, say: writers will report it when they try
            with self._lock:
                if not self._closed:
                    self._ready.append((path, fd))
                    continue
            _discard_spare(path, fd)
            return

    def close(self):
        """Make no more; remove the ready files (in the pool)."""
        with self._lock:
            self._closed = True
        spares = []
        while (spare := self.take()) is not None:  # writers may be taking some at the same time
            spares.append(spare)
        storage = self._storage

        def remove():
            for path, fd in spares:
                _discard_spare(path, fd)

        return deferToThreadPool(storage.reactor, storage.pool, remove)


@implementer(IInstanceStorage)
class Storage:
    """The storage root: hands out writers, owns the disk thread pool."""

    log = Logger()

    def __init__(self, root: str, reactor, pool: WorkerPool, *, fsync: bool = True,
                 implementation_version_name: str = "DICOMGW"):
        self.root = os.path.abspath(root)
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.instances_dir = os.path.join(self.root, "instances")
        self.payloads_dir = os.path.join(self.root, "payloads")
        self.outputs_dir = os.path.join(self.root, "outputs")
        #: Room kept for the databases on this file system (made by prepare()).
        self.reserve = SpaceReserve(os.path.join(self.tmp_dir, RESERVE_FILE))
        self.reactor = reactor
        self.pool = pool
        self.fsync = fsync
        self.implementation_version_name = implementation_version_name
        self._ae_dirs: dict[str, str] = {}  # called AE title -> its checked directory
        self.spares = Spares(self)

    def temporary_path(self, spare: bool = False) -> str:
        return os.path.join(self.tmp_dir, (SPARE_PREFIX if spare else "") + secrets.token_hex(12) + ".part")

    def prepare(self) -> int:
        """Create the directories and remove temporary files a crash left.

        Runs once at start-up, before any listener; returns how many
        leftovers were removed.
        """
        os.makedirs(self.tmp_dir, exist_ok=True)
        os.makedirs(self.instances_dir, exist_ok=True)
        removed = 0
        for name in os.listdir(self.tmp_dir):
            if name.endswith(".part"):
                try:
                    os.unlink(os.path.join(self.tmp_dir, name))
                    removed += 1
                except OSError:
                    pass
        if removed:
            self.log.info("removed {count} incomplete instance(s) left by an earlier run", count=removed)
        if not self.reserve.restore():
            self.log.warn("no room for the databases' reserve of {size} bytes under {root}; new "
                          "instances are refused until there is", size=self.reserve.size, root=self.root)
        return removed

    def path_for(self, called_ae: str, sop_instance_uid: str) -> str:
        """Where an instance is stored.  Refuses anything that is not a UID."""
        if not is_valid_uid(sop_instance_uid):
            raise ValueError(f"not a valid UID: {sop_instance_uid!r}")
        # A valid UID is digits and dots (never "." or ".."), so it cannot
        # leave the AE directory: only that directory needs the check, once
        # per AE title rather than once per instance.
        directory = self._ae_dirs.get(called_ae)
        if directory is None:
            directory = os.path.join(self.instances_dir, called_ae)
            # Belt and braces: the AE title is one we configured, but never
            # write outside the root whatever happens.
            if os.path.commonpath([self.instances_dir, os.path.abspath(directory)]) != self.instances_dir:
                raise ValueError(f"path escapes the storage root: {directory!r}")
            self._ae_dirs[called_ae] = directory
        return os.path.join(directory, sop_instance_uid + ".dcm")

    def begin(self, *, called_ae: str, calling_ae: str, sop_class_uid: str,
              sop_instance_uid: str, transfer_syntax_uid: str) -> InstanceWriter:
        if not is_valid_uid(sop_class_uid):
            raise ValueError(f"not a valid SOP Class UID: {sop_class_uid!r}")
        final = self.path_for(called_ae, sop_instance_uid)
        header = file_meta(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=self.implementation_version_name,
            source_ae_title=calling_ae or None,
        )
        meta = StoredInstance(final, sop_class_uid, sop_instance_uid, transfer_syntax_uid, 0, 0, False)
        return InstanceWriter(self, final, header, meta)

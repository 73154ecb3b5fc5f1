"""Streaming storage of received instances, on the reactor thread where that is safe.

Each C-STORE gets an :class:`InstanceWriter`, which writes the data set's
pieces to a temporary file as they come off the wire (memoryviews into the
received bytes, never copied) behind the File Meta Information header,
digests every byte from memory as it is written (never reading the file
back) and, on ``finish()``, puts the file in place with a rename: only then
is its callback told, and only then may the C-STORE-RSP say Success.

Where the work runs (measured on the bench machine, where handing a job to a
thread and back costs about 140 us, more than storing a small instance):

- *Direct*: the writes, and with ``fsync`` off the close and the rename, run
  on the reactor thread as the data arrive: they go to the page cache and
  take microseconds.  The file itself was created ahead of need, a batch at
  a time in the pool (:class:`~gateway.store.spares.Spares`), so no file creation is on the way.
  Every such call is timed: when they add up to more than :data:`BUSY` of
  a second (the page cache is full and the kernel makes writers wait for
  the disk), or one takes longer than :data:`SLOW`, new writers go to the
  pool for :data:`OFFLOAD_FOR` seconds, so that a slow disk holds back the
  associations that write to it, not the reactor.  A hiccup of a few
  milliseconds does neither.

  Why not in a thread: on this machine kind a job handed to another thread
  and back costs 140 us, and every background thread that wants the GIL
  back after a system call while the reactor holds it makes the reactor
  wait for a wake-up of the other CPU at its next system call.  Work of a
  few microseconds per instance is cheaper on the reactor; work of a
  fraction of a millisecond (creating a file) is cheaper in the pool, a
  batch per hand-off.
- *fsync*: with ``fsync`` on, the writes are direct and one disk pool job
  fsyncs the file, renames it and fsyncs its directory; the reactor never
  waits for it.
- *Pooled* (no spare ready, or the disk was found slow): every write runs in
  the disk pool, at most one job per writer at a time, handling what was
  queued before and while it runs.  A job starts once :data:`WRITE_BEHIND`
  bytes are queued, or when the instance is finished or discarded.
  ``pending`` counts bytes queued and not yet written, so that the protocol
  can pause the peer when the disk falls behind.

The first bytes of each data set are kept (:data:`HEAD_BYTES`): the payload
service picks the indexed attributes out of them (:mod:`gateway.store.header`)
on the reactor's next turn, after the response.

Layout under the storage root (:class:`Storage` names each directory)::

    tmp/[<node>/]<run>-<n>.part                  instances being received (and spares)
    tmp/[<node>/]database-reserve                room kept for the databases (gateway.store.reserve)
    instances/<called AE>/<SOP Instance UID>.dcm  stored instances (Part 10)
    payloads/<payload id>/                       closed payloads (gateway.workflow)
    outputs/<payload id>/<pipeline>/             what pipelines wrote
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass

import blake3
from twisted.logger import Logger
from zope.interface import implementer

from gateway import IMPLEMENTATION_CLASS_UID
from gateway.dimse.sop import is_valid_uid
from gateway.interfaces import IInstanceStorage
from gateway.part10 import file_meta
from gateway.store import files
from gateway.store.files import fsync_dir, move_into_place
from gateway.store.spares import SPARE_PREFIX, Spares
from gateway.store.reserve import SpaceReserve
from gateway.threads import WorkerPool


class StorageFull(OSError):
    """The disk (or quota) is full: answered with A700 Out of Resources."""


#: The digests ``[storage] digest`` may name: a fresh hasher for each (None: no digest).
DIGESTS = {"blake3": blake3.blake3, "sha256": hashlib.sha256, "none": None}


@dataclass(frozen=True)
class StoredInstance:
    """What the writer knows of an instance once it is in place: the record
    the index keeps."""

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    size: int  # bytes of the whole Part 10 file
    dataset_size: int
    replaced: bool  # an earlier copy of the same instance was overwritten
    #: Of the whole file, as "<algorithm>:<hex>" ("blake3:...", "sha256:..."); "" for none.
    digest: str = ""
    inode: int = 0
    #: The first bytes of the data set (all of it when it is shorter than
    #: HEAD_BYTES): where the indexed attributes are read from.
    head: bytes = b""


_FINISH = object()

#: Pooled writers queue this many bytes before a job writes them (see the
#: module docstring).  Well below the SCP's low-water mark, so an association
#: that is paused for its backlog always has a job running that will resume it.
WRITE_BEHIND = 256 << 10
_write = os.write  # the disk writes of the hot path (tests simulate a full disk here)
_writev = os.writev
_clock = time.monotonic
#: The first bytes of each data set are kept (copied) for the index.
HEAD_BYTES = 16 << 10
#: Disk work on the reactor taking more than this share of a second, or one
#: call taking longer than SLOW seconds, means the disk is behind: new
#: writers go to the pool ...
BUSY = 0.25
SLOW = 0.25
#: ... for this long (seconds) after it was seen.
OFFLOAD_FOR = 10.0
#: The databases' reserve, in tmp/ (gateway.store.reserve).
RESERVE_FILE = "database-reserve"


class InstanceWriter:
    """Writes one instance; see the module docstring.

    ``spare`` is a ready (path, fd, inode) from :class:`Spares`: the writer
    is then direct, else pooled.  Reactor thread: :meth:`write`, :meth:`finish`,
    :meth:`discard`, ``pending`` and ``on_drained`` (called whenever
    ``pending`` drops).
    """

    def __init__(self, storage: "Storage", final_path: str, header: bytes, meta: StoredInstance, spare=None):
        self._storage = storage
        self._final = final_path
        self._meta = meta
        self._header_len = len(header)
        hasher = DIGESTS[storage.digest]
        self._digest = hasher() if hasher is not None else None  # of everything written so far
        self._head = bytearray()  # the first HEAD_BYTES of the data set
        self._ops: deque = deque()
        self._running = False  # a pool job is under way
        self._failed: BaseException | None = None
        self._done = None  # (callback, args), once finish() is called
        self._closing = False  # _FINISH is queued: no more waiting for data
        self.pending = 0
        self.dataset_bytes = 0
        self.on_drained = None
        self._direct = spare is not None
        if self._direct:
            self._tmp, self._fd, self._inode = spare
            self._header = header  # written with the first data: one system call for a small instance
        else:
            self._tmp, self._fd, self._inode = None, -1, 0  # the first job creates the file
            self._header = None
            self._ops.append(header)
            self.pending = len(header)

    # ---- reactor side ----------------------------------------------------

    def write(self, data) -> None:
        if self._failed is not None:
            return  # already failed: drop the rest, the response reports it
        n = len(data)
        self.dataset_bytes += n
        head = self._head
        if len(head) < HEAD_BYTES:
            head += data[:HEAD_BYTES - len(head)]
        if self._direct:
            header, self._header = self._header, None
            self._write_now(data, header)
            return
        self._ops.append(data)
        self.pending += n
        if self.pending >= WRITE_BEHIND:
            self._kick()

    def finish(self, done, *args) -> None:
        """Put the file in place, then call ``done(outcome, *args)`` on the
        reactor thread: the :class:`StoredInstance`, or the exception that
        stopped it.  Direct without fsync, that happens before this returns."""
        self._done = (done, args)
        if self._header is not None:  # an empty data set
            header, self._header = self._header, None
            self._write_now(header)
        if self._direct and not self._storage.fsync:
            started = _clock()
            outcome = self._close()
            self._storage.timed(_clock() - started, "putting a file in place")
            self._complete(outcome)
            return
        self._ops.append(_FINISH)
        self._closing = True
        self._kick()

    def discard(self) -> None:
        """Abandon the instance: the temporary file is removed (in the pool)."""
        # Queued writes are skipped once _failed is set; a pool job may be
        # popping from the queue right now, so it is not cleared here.
        self._failed = self._failed or ConnectionAbortedError("discarded")
        self._direct = False
        self._ops.append(_FINISH)
        self._closing = True
        self._kick()

    def _write_now(self, data, header=None) -> None:
        started = _clock()
        try:
            self._put(data, header)
        except OSError as e:
            self._failed = _storage_error(e)
        self._storage.timed(_clock() - started, "writing")

    def _kick(self):
        if self._running or not self._ops:
            return
        if not self._closing and self.pending < WRITE_BEHIND:
            return  # wait for more data (or the end of the instance)
        self._running = True
        self._storage.pool.callInThread(self._job)

    def _job(self):
        """Pool thread: run the queued operations; hand the outcome to the reactor."""
        started = _clock()
        try:
            result = self._drain()
        except BaseException as e:  # _drain never raises; should it, end the instance, never retry
            result = e
        self._storage.reactor.callFromThread(self._drained, result, _clock() - started)

    def _drained(self, result, took):
        self._running = False
        if isinstance(result, tuple):
            written, done = result
            if written and took > SLOW and not self._storage.fsync:
                self._storage.timed(took, "writing in the disk pool")
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
            return
        self._kick()
        if self.on_drained is not None:
            self.on_drained(self)

    def _complete(self, outcome):
        self._ops.clear()
        self.pending = 0
        done, self._done = self._done, None
        if done is not None:
            callback, args = done
            callback(outcome, *args)

    # ---- either thread: the reactor's (direct) or the pool's ------------------

    def _put(self, data, header=None) -> None:
        """Write all of ``data`` (after ``header``, when given) and digest it."""
        fd = self._fd
        if header is None:
            n = _write(fd, data)
            rest = len(data) - n
        else:
            n = _writev(fd, (header, data))
            rest = len(header) + len(data) - n
            if self._digest is not None:
                self._digest.update(header)
            if rest and n < len(header):
                view = memoryview(header)[n:]
                while view:
                    view = view[_write(fd, view):]
                n, rest = 0, len(data)
            else:
                n -= len(header)
        if rest:
            view = memoryview(data)[n:]
            while view:
                view = view[_write(fd, view):]
        if self._digest is not None:
            self._digest.update(data)

    def _drain(self):
        """Pool thread: run the queued operations, and any queued meanwhile;
        return (bytes written, outcome): None while the instance is still
        open, a StoredInstance on success, or the exception that ended it."""
        written = 0
        ops = self._ops
        try:
            while ops:
                op = ops.popleft()
                if op is _FINISH:
                    return written, self._close()
                if self._failed is None:
                    if self._fd < 0:
                        self._open()
                    self._put(op)
                written += len(op)
        except OSError as e:
            self._failed = _storage_error(e)
        return written, None

    def _open(self):
        self._tmp = self._storage.temporary_path()
        self._fd = files.create_exclusive(self._tmp)
        self._inode = os.fstat(self._fd).st_ino

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
            return _storage_error(e) if isinstance(e, OSError) else e
        meta, digest = self._meta, self._digest
        return StoredInstance(
            path=self._final,
            sop_class_uid=meta.sop_class_uid,
            sop_instance_uid=meta.sop_instance_uid,
            transfer_syntax_uid=meta.transfer_syntax_uid,
            size=size,
            dataset_size=size - self._header_len,
            replaced=replaced,
            digest=f"{self._storage.digest}:{digest.hexdigest()}" if digest is not None else "",
            inode=inode,
            head=bytes(self._head),
        )

    def _put_in_place(self) -> tuple[int, int, bool]:
        """fsync (if asked), close, rename into place, fsync the directory;
        (size, inode, whether an earlier copy was replaced)."""
        fsync = self._storage.fsync
        if fsync:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        directory = os.path.dirname(self._final)
        try:
            replaced = move_into_place(self._tmp, self._final)
        except FileNotFoundError:  # the AE title's first instance (or its directory was removed)
            if not os.path.exists(self._tmp):
                raise
            os.makedirs(directory, exist_ok=True)
            if fsync:
                fsync_dir(os.path.dirname(directory))  # the new directory's own entry
            replaced = move_into_place(self._tmp, self._final)
        if fsync:
            self._storage.fsync_directory(directory)
        return self._header_len + self.dataset_bytes, self._inode, replaced

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


def _storage_error(e: OSError) -> OSError:
    """A full disk or quota as StorageFull (A700), any other error as it is."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(e, StorageFull):
        return StorageFull(e.errno, e.strerror)
    return e


@implementer(IInstanceStorage)
class Storage:
    """The storage root: hands out writers, owns the disk thread pool.

    ``digest`` names the algorithm of :data:`DIGESTS` every file is digested
    with.  :meth:`timed` is told how long each piece of disk work done on
    the reactor took, and sends writers to the pool while the disk is slow.
    """

    log = Logger()

    def __init__(self, root: str, reactor, pool: WorkerPool, *, fsync: bool = True, digest: str = "blake3",
                 implementation_version_name: str = "DICOMGW", node: str = ""):
        self.root = os.path.abspath(root)
        # Nodes sharing the root (a cluster) each have a tmp/<node>/ of their
        # own: one node's start never removes another's files in progress.
        self.tmp_dir = os.path.join(self.root, "tmp", node) if node else os.path.join(self.root, "tmp")
        self.instances_dir = os.path.join(self.root, "instances")
        self.payloads_dir = os.path.join(self.root, "payloads")
        self.outputs_dir = os.path.join(self.root, "outputs")
        #: Room kept for the databases on this file system (made by prepare()).
        self.reserve = SpaceReserve(os.path.join(self.tmp_dir, RESERVE_FILE))
        self.reactor = reactor
        self.pool = pool
        self.fsync = fsync
        self.digest = digest
        self.implementation_version_name = implementation_version_name
        self._ae_dirs: dict[str, str] = {}  # called AE title -> its checked directory
        self._dir_fds: dict[str, int] = {}  # AE directory -> a descriptor kept for fsync
        self.spares = Spares(self)
        self._run = secrets.token_hex(6)
        self._names = itertools.count(1)
        self.slow_until = 0.0  # writers are pooled until then (reactor.seconds())
        self._busy_since, self._busy = 0.0, 0.0  # disk time on the reactor in the current second

    def timed(self, seconds: float, what: str) -> None:
        """Disk work on the reactor (or a pooled write) took ``seconds``."""
        if seconds < 0.001:
            return  # the page cache at work: nothing to add up
        now = self.reactor.seconds()
        if now - self._busy_since >= 1.0:
            self._busy_since, self._busy = now, 0.0
        self._busy += seconds
        if seconds <= SLOW and self._busy <= BUSY:
            return
        if now >= self.slow_until:
            why = (f"{what} took {seconds * 1000:.0f} ms" if seconds > SLOW
                   else f"{self._busy * 1000:.0f} ms of the last second went to disk work, the last {what}")
            self.log.warn("storage under {root} is slow ({why}): writing in the disk pool, not on the reactor, "
                          "for at least {seconds:g} s", event="storage.slow", root=self.root, why=why,
                          seconds=OFFLOAD_FOR)
        self.slow_until = now + OFFLOAD_FOR

    def fsync_directory(self, directory: str) -> None:
        """fsync an AE directory (any thread), through a descriptor kept open
        for it: two system calls fewer per durable instance.  One whose
        directory was removed (and made again) is opened anew."""
        fd = self._dir_fds.get(directory)
        if fd is not None and os.fstat(fd).st_nlink == 0:
            self._dir_fds.pop(directory, None)
            fd = None
        if fd is None:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            kept = self._dir_fds.setdefault(directory, fd)  # another thread may have been quicker
            if kept != fd:
                os.close(fd)
                fd = kept
        os.fsync(fd)

    def temporary_path(self, spare: bool = False) -> str:
        """A new name in tmp/: this run's random prefix and a count (no random bytes per file)."""
        return os.path.join(self.tmp_dir, f"{SPARE_PREFIX if spare else ''}{self._run}-{next(self._names)}.part")

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
        spare = self.spares.take() if self.reactor.seconds() >= self.slow_until else None
        return InstanceWriter(self, final, header, meta, spare)

"""One SQLite database on a thread of its own: the one place that opens SQLite.

Every access runs on one dedicated thread, so the reactor never waits for
SQLite and transactions never interleave: each call of :meth:`Database.run`
is one transaction, run in submission order.  The index (:mod:`gateway.store.index`)
and the export jobs (:mod:`gateway.export.jobs`) each have one, in WAL mode.

Durability: a commit survives a crash of the process (WAL, synchronous=NORMAL);
:meth:`Database.run_durable` also makes it, and every commit before it,
survive a power failure (synchronous=FULL) while ``durable`` is set, which
follows ``[storage] fsync`` (also on reload).
"""

from __future__ import annotations

import os
import sqlite3

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.interfaces import IReconfigurable
from gateway.threads import WorkerPool

#: What a failing database raises (for callers that report it).
DatabaseError = sqlite3.Error

#: run_coalesced: a batch waits at most this long (seconds) for company, and
#: goes at once with this many calls.
COALESCE_DELAY = 0.02
COALESCE_MAX = 256


@implementer(IReconfigurable)
class Database:
    """SQLite on one dedicated thread; ``run(f, *args)`` = one transaction.

    ``schema`` is run (``executescript``) when the connection opens;
    ``name`` names the thread (``dicomgw-<name>``).
    """

    def __init__(self, path: str, reactor, *, schema: str, name: str, durable: bool = True, pool=None,
                 reserve=None):
        self.path = path
        # When a commit finds the disk full, this SpaceReserve's room is given
        # back and the commit tried again (gateway.store.reserve).
        self.reserve = reserve
        self.reactor = reactor
        self.schema = schema
        self.durable = durable
        # One thread owns the connection; tests may pass a pool of their own.
        self._own_pool = pool is None
        self.pool = pool if pool is not None else WorkerPool(1, f"dicomgw-{name}")
        self._conn: sqlite3.Connection | None = None
        self._batch: list = []  # (f, args, Deferred) waiting for the next shared transaction
        self._batch_running = False
        self._batch_timer = None

    def start(self):
        if self._own_pool:
            self.pool.start()
        return self.run(lambda conn: None)

    def reconfigure(self, config):
        """``[storage] fsync`` decides whether run_durable fsyncs, from the next commit on."""
        self.durable = config.storage.fsync

    def stop(self):
        self.flush()  # queued ahead of the close

        def close():
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        d = deferToThreadPool(self.reactor, self.pool, close)
        if self._own_pool:
            d.addBoth(lambda r: (self.pool.stop(), r)[1])
        return d

    def _connect(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(self.schema)
        return conn

    def _transaction(self, f, args, durable=False):
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        if durable:
            conn.execute("PRAGMA synchronous=FULL")
        try:
            try:
                with conn:  # commit on return, roll back on an exception
                    return f(conn, *args)
            except sqlite3.OperationalError as e:
                if not _disk_full(e) or self.reserve is None or not self.reserve.release():
                    raise
            with conn:  # once more, in the reserve's room
                return f(conn, *args)
        finally:
            if durable:
                conn.execute("PRAGMA synchronous=NORMAL")

    def run(self, f, *args):
        """Run ``f(connection, *args)`` as one transaction on the database thread.

        The commit survives a crash of the process (WAL, synchronous=NORMAL)
        but not necessarily a power failure: see :meth:`run_durable`.
        """
        return deferToThreadPool(self.reactor, self.pool, self._transaction, f, args)

    def run_coalesced(self, f, *args):
        """Like :meth:`run`, but calls made within :data:`COALESCE_DELAY` of
        each other (or while an earlier batch is being committed) are
        committed together, in one transaction.

        ``f`` is called as ``f(connection, shared, *args)``: ``shared`` is a
        dict common to the calls of one transaction, where a call may keep
        what it read for the next (only coalesced calls write in that
        transaction).  One that raises rolls back only itself and fails only
        its own Deferred (see :func:`_run_items`).  A batch goes when it
        has :data:`COALESCE_MAX` calls, when the delay is up, or when
        :meth:`flush` says someone is waiting.  Callers that need an order
        against other writes flush and wait for these Deferreds first (an
        association's release waits for its instances' rows).
        """
        d = Deferred()
        self._batch.append((f, args, d))
        if not self._batch_running:
            if len(self._batch) >= COALESCE_MAX:
                self.flush()
            elif self._batch_timer is None:
                self._batch_timer = self.reactor.callLater(COALESCE_DELAY, self.flush)
        return d

    def flush(self):
        """Commit what :meth:`run_coalesced` holds now, without waiting."""
        timer, self._batch_timer = self._batch_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._batch and not self._batch_running:
            self._next_batch()

    def _next_batch(self):
        batch, self._batch = self._batch, []
        self._batch_running = True
        job = deferToThreadPool(self.reactor, self.pool, self._transaction, _run_items,
                                ([(f, args) for f, args, _d in batch],))

        def finished(outcome):
            self._batch_running = False
            if isinstance(outcome, Failure):  # the commit itself failed: every call of the batch did
                for _f, _a, d in batch:
                    d.errback(outcome)
            else:
                for (_f, _a, d), (ok, value) in zip(batch, outcome):
                    if ok:
                        d.callback(value)
                    else:
                        d.errback(value)
            if self._batch:  # they have waited for this batch already
                self.flush()

        job.addBoth(finished)

    def run_durable(self, f, *args):
        """Like :meth:`run`, and the commit is fsynced (when ``durable``).

        The write-ahead log is sequential, so this also makes every earlier
        commit durable: the index rows of an association's instances are
        committed cheaply one by one and made durable together by the
        release, before the A-RELEASE-RP says so to the peer.
        """
        return deferToThreadPool(self.reactor, self.pool, self._transaction, f, args, self.durable)


def _disk_full(e: sqlite3.Error) -> bool:
    return getattr(e, "sqlite_errorcode", None) == 13 or "database or disk is full" in str(e)  # SQLITE_FULL


def _run_items(conn, items):
    """The body of one coalesced transaction.

    The items run together in one savepoint, sharing one dict.  Should one
    raise, that savepoint is rolled back and each item runs again in a
    savepoint of its own with a dict of its own, so that only the one that
    raised is undone: the outcome is the same as if each had been isolated
    from the start, for two statements fewer per item when none fails.
    """
    if not conn.in_transaction:
        conn.execute("BEGIN")
    conn.execute("SAVEPOINT batch")
    try:
        shared: dict = {}
        results = [(True, f(conn, shared, *args)) for f, args in items]
    except Exception:
        conn.execute("ROLLBACK TO batch")
        conn.execute("RELEASE batch")
    else:
        conn.execute("RELEASE batch")
        return results
    results = []
    for f, args in items:
        conn.execute("SAVEPOINT item")
        try:
            value = f(conn, {}, *args)
        except Exception:
            conn.execute("ROLLBACK TO item")
            conn.execute("RELEASE item")
            results.append((False, Failure()))
        else:
            conn.execute("RELEASE item")
            results.append((True, value))
    return results

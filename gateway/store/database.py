"""The databases, on a thread of their own: the one place that opens them.

Every access runs on one dedicated thread, so the reactor never waits for
the database and transactions of one process never interleave: each call
of :meth:`Database.run` is one transaction, run in submission order.  The
index (:mod:`gateway.store.index`) and the export jobs
(:mod:`gateway.export.jobs`) each have one.

Two back ends, one schema (versioned migrations, applied when the first
connection opens, under a lock so that two nodes starting at once apply
each migration once) and one dialect of SQL (:mod:`gateway.store.dialect`
translates it):

- **SQLite** (the default): a file under the storage root, in WAL mode.  A
  commit survives a crash of the process (synchronous=NORMAL);
  :meth:`Database.run_durable` also makes it, and every commit before it,
  survive a power failure (synchronous=FULL) while ``durable`` is set,
  which follows ``[storage] fsync`` (also on reload).
- **PostgreSQL** (``[index] url = "postgresql://..."``, through psycopg 3):
  the tables live in the schema ``[index] schema`` (the export jobs in
  ``<schema>_exports``); every commit is durable the way the server is
  configured.  A lost connection fails the transaction under way (the
  caller sees the error: nothing is reported done that is not committed)
  and the next transaction connects again; :attr:`Database.problem` says
  why the last one failed, until one succeeds.
"""

from __future__ import annotations

import os
import sqlite3
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.interfaces import IReconfigurable
from gateway.store import dialect
from gateway.threads import WorkerPool

try:
    import psycopg
except ImportError:  # only [index] url = "postgresql://..." needs it
    psycopg = None

#: What a failing database raises (for callers that report it).
DatabaseError = (sqlite3.Error,) + ((psycopg.Error,) if psycopg is not None else ())

#: run_coalesced: a batch waits at most this long (seconds) for company, and
#: goes at once with this many calls.
COALESCE_DELAY = 0.02
COALESCE_MAX = 256
#: Seconds to wait for a PostgreSQL connection before the transaction fails.
CONNECT_TIMEOUT = 5

_MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations ("
                     "version INTEGER NOT NULL PRIMARY KEY, name TEXT NOT NULL, applied REAL)")


class SchemaTooNew(Exception):
    """The database was migrated by a newer gateway than this one."""


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def migrate(conn, migrations) -> list[int]:
    """Apply the ``migrations`` ((version, name, script), in order) the
    database lacks, in the transaction under way; return their versions.

    The first statement takes the migrations lock, so a second node that
    starts at the same time waits, then finds them applied."""
    pg = dialect.dialect_of(conn) == dialect.POSTGRESQL
    dialect.lock(conn, "dicomgw-migrations")
    conn.execute(dialect.postgres_ddl(_MIGRATIONS_TABLE) if pg else _MIGRATIONS_TABLE)
    have = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
    known = [v for v, _n, _s in migrations]
    if have and known and max(have) > max(known):
        raise SchemaTooNew(f"the database is at schema version {max(have)}; this gateway knows up to "
                           f"{max(known)}: upgrade the gateway")
    applied = []
    for version, name, script in migrations:
        if version in have:
            continue
        for statement in dialect.statements(script):
            conn.execute(dialect.postgres_ddl(statement) if pg else statement)
        conn.execute("INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)",
                     (version, name, dialect.db_now(conn)))
        applied.append(version)
    return applied


class _Row(tuple):
    """A PostgreSQL row read as sqlite3.Row is: by position or by name."""

    __slots__ = ()
    _names: dict = {}

    def __getitem__(self, key):
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self):
        return list(self._names)


_row_classes: dict = {}


def _row_factory(cursor):
    names = tuple(c.name for c in cursor.description) if cursor.description else ()
    cls = _row_classes.get(names)
    if cls is None:
        positions: dict = {}
        for i, name in enumerate(names):
            positions.setdefault(name, i)  # the first of a repeated name, as sqlite3.Row
        cls = _row_classes[names] = type("Row", (_Row,), {"__slots__": (), "_names": positions})
    return cls


class PostgresConnection:
    """A psycopg connection that takes the gateway's SQL (:mod:`gateway.store.dialect`)."""

    dialect = dialect.POSTGRESQL
    in_transaction = True  # psycopg opens one with the first statement

    def __init__(self, raw):
        self.raw = raw

    def execute(self, sql, params=()):
        cur = self.raw.cursor()
        cur.execute(dialect.postgres_sql(sql), tuple(params))
        return cur

    def executemany(self, sql, seq):
        seq = [tuple(p) for p in seq]
        cur = self.raw.cursor()
        if seq:
            cur.executemany(dialect.postgres_sql(sql), seq)
        return cur


if psycopg is not None:
    class _Cursor(psycopg.Cursor):
        """Reads nothing, as sqlite3 does, from a statement that returns no rows."""

        def fetchone(self):
            return super().fetchone() if self.description is not None else None

        def fetchall(self):
            return super().fetchall() if self.description is not None else []

        def __iter__(self):
            return super().__iter__() if self.description is not None else iter(())


def _connection_trouble(e) -> bool:
    return psycopg is not None and isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError))


@implementer(IReconfigurable)
class Database:
    """A database on one dedicated thread; ``run(f, *args)`` = one transaction.

    ``path`` is a SQLite file, or a ``postgresql://`` URL (then the tables
    are in the schema ``namespace``).  ``migrations`` ((version, name,
    script), see :func:`migrate`) are applied when the connection opens;
    ``schema`` is a script run as it is (SQLite only, for tests);
    ``name`` names the thread (``dicomgw-<name>``).
    """

    def __init__(self, path: str, reactor, *, schema: str = "", name: str, durable: bool = True, pool=None,
                 reserve=None, migrations=(), namespace: str = "dicomgw"):
        self.path = path
        self.postgres = is_postgres_url(path)
        self.dialect = dialect.POSTGRESQL if self.postgres else dialect.SQLITE
        self.namespace = namespace
        # When a commit finds the disk full, this SpaceReserve's room is given
        # back and the commit tried again (gateway.store.reserve).
        self.reserve = reserve
        self.reactor = reactor
        self.schema = schema
        self.migrations = tuple(migrations)
        self.durable = durable
        # Why the last transaction failed to reach the database (None: it did).
        self.problem: str | None = None
        self.applied: list[int] = []  # the migrations the first connection applied
        # Called (on the reactor thread, no arguments) when ``problem`` changes.
        self.watchers: list = []
        # One thread owns the connection; tests may pass a pool of their own.
        self._own_pool = pool is None
        self.pool = pool if pool is not None else WorkerPool(1, f"dicomgw-{name}")
        self._conn = None
        self._batch: list = []  # (f, args, Deferred) waiting for the next shared transaction
        self._batch_running = False
        self._batch_timer = None
        self._stopped = False

    def _set_problem(self, problem):
        """On the database thread: record why it failed (None: it answers);
        a change is told to the watchers, on the reactor thread."""
        if problem == self.problem:
            return
        self.problem = problem
        for watcher in self.watchers:
            self.reactor.callFromThread(watcher)

    def describe(self) -> str:
        """Where the database is, without a password: the file, or the server and schema."""
        if not self.postgres:
            return self.path
        parts = urlsplit(self.path)
        host = parts.netloc.rsplit("@", 1)[-1]
        user = f"{parts.username}@" if parts.username else ""
        return f"PostgreSQL {parts.scheme}://{user}{host}{parts.path} schema {self.namespace}"

    def start(self):
        if self._own_pool:
            self.pool.start()
        return self.run(lambda conn: None)

    def reconfigure(self, config):
        """``[storage] fsync`` decides whether run_durable fsyncs, from the next commit on."""
        self.durable = config.storage.fsync

    def stop(self):
        if self._stopped:
            return succeed(None)
        self._stopped = True
        self.flush()  # queued ahead of the close

        d = deferToThreadPool(self.reactor, self.pool, self._close)
        if self._own_pool:
            d.addBoth(lambda r: (self.pool.stop(), r)[1])
        return d

    def _connect(self):
        if self.postgres:
            return self._connect_postgres()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        if self.schema:
            conn.executescript(self.schema)
        if self.migrations:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self.applied = migrate(conn, self.migrations)
            except BaseException:
                conn.rollback()
                conn.close()
                raise
            conn.commit()
        return conn

    def _connect_postgres(self):
        if psycopg is None:
            raise RuntimeError("[index] url names PostgreSQL, but psycopg is not installed")
        raw = psycopg.connect(self.path, autocommit=False, row_factory=_row_factory, cursor_factory=_Cursor,
                              connect_timeout=CONNECT_TIMEOUT, application_name="dicomgw",
                              keepalives=1, keepalives_idle=10, keepalives_interval=3, keepalives_count=3,
                              tcp_user_timeout=15000)
        conn = PostgresConnection(raw)
        try:
            ns = self.namespace
            quoted = '"' + ns.replace('"', '""') + '"'
            conn.execute(f"SET search_path TO {quoted}")
            dialect.lock(conn, "dicomgw-migrations")
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
            if self.migrations:
                self.applied = migrate(conn, self.migrations)
            raw.commit()
        except BaseException:
            raw.close()
            raise
        return conn

    def _close(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                (conn.raw if self.postgres else conn).close()
            except Exception:
                pass

    def _transaction(self, f, args, durable=False):
        if self.postgres:
            return self._pg_transaction(f, args)
        try:
            if self._conn is None:
                self._conn = self._connect()
            result = self._sqlite_transaction(f, args, durable)
        except sqlite3.OperationalError as e:
            self._set_problem(f"SQLite: {e}")
            raise
        self._set_problem(None)
        return result

    def _pg_transaction(self, f, args):
        try:
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            try:
                result = f(conn, *args)
                conn.raw.commit()
            except BaseException:
                if not conn.raw.closed:
                    try:
                        conn.raw.rollback()
                    except Exception:
                        self._close()
                raise
        except Exception as e:
            if _connection_trouble(e):
                # The connection is gone (or never came): the next
                # transaction connects again.
                self._set_problem(f"PostgreSQL: {str(e).strip() or type(e).__name__}")
                self._close()
            raise
        self._set_problem(None)
        return result

    def _sqlite_transaction(self, f, args, durable):
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


def migrate_now(path: str, migrations, namespace: str = "dicomgw") -> tuple[list[int], int]:
    """Apply ``migrations`` to the database at ``path`` (a file or a URL)
    now, in this thread (``dicomgw migrate``); return (versions applied,
    the version it is at)."""
    db = Database(path, None, migrations=migrations, name="migrate", namespace=namespace)
    conn = db._connect()
    try:
        version = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]
    finally:
        (conn.raw if db.postgres else conn).close()
    return db.applied, version


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
        conn.execute("BEGIN")  # SQLite; psycopg has begun one already
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

"""The instance index and the payload/job state: one SQLite database.

The database lives at ``<storage>/dicomgw.sqlite`` in WAL mode.  Every
access runs on one dedicated thread (``dicomgw-db``), so the reactor never
waits for SQLite and transactions never interleave: each call of
:meth:`Database.run` is one transaction, run in submission order.

Header attributes are picked out of the first bytes of the data set as
the writer kept them, or read from the file by pydicom without the pixel
data (:func:`header_attributes`); text is decoded with the dataset's
Specific Character Set (pydicom handles ISO-IR 6, ISO-IR 100, ISO 2022 IR 87,
ISO-IR 192 and the other PS3.5 character sets).  That runs in the disk
thread pool; the SHA-256 of the file is computed as it is written.

Schema (``SCHEMA`` below) and states:

- ``associations.state``: ``open`` until the association ends, then
  ``released``, ``aborted``, ``lost``, or ``broken`` (a crash ended it).
- ``instances.state``: ``received`` (its association is still open),
  ``payload`` (joined payload ``payload``), ``kept`` (released on an AE
  without pipelines: stored, never handed off), ``aborted`` (its association
  did not release; removed at ``discard_after``), ``replaced`` (a later
  copy of the same SOP Instance joined the same payload), ``missing`` (its
  file was gone when the payload closed), ``removed``.
- ``payloads.state``: ``open`` -> ``closing`` -> ``closed`` (jobs exist) ->
  ``done`` (every job done) or ``failed`` (every job ended, one failed) ->
  ``removed`` (the reclaimer freed its files).
- ``jobs.state``: ``pending`` -> ``running`` -> ``done`` | ``failed``
  (``pending`` again between retries); ``attempts`` counts every start.
"""

from __future__ import annotations

import os
import re
import sqlite3

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from gateway.dimse import sop
from gateway.part10 import read_elements
from gateway.threads import WorkerPool

DB_NAME = "dicomgw.sqlite"
#: run_coalesced: a batch waits at most this long (seconds) for company, and
#: goes at once with this many calls.
COALESCE_DELAY = 0.02
COALESCE_MAX = 256

SCHEMA = """
CREATE TABLE IF NOT EXISTS associations (
    id TEXT PRIMARY KEY,
    calling_ae TEXT, called_ae TEXT, peer TEXT,
    started REAL, ended REAL,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    association TEXT,
    ae TEXT NOT NULL,
    sop_class_uid TEXT, sop_instance_uid TEXT,
    patient_id TEXT, patient_name TEXT,
    study_uid TEXT, series_uid TEXT, modality TEXT,
    transfer_syntax TEXT,
    size INTEGER, sha256 TEXT, inode INTEGER,
    calling_ae TEXT, called_ae TEXT, peer TEXT,
    received REAL,
    path TEXT,
    group_key TEXT,
    state TEXT NOT NULL,
    payload TEXT,
    discard_after REAL
);
CREATE INDEX IF NOT EXISTS instances_association ON instances(association);
CREATE INDEX IF NOT EXISTS instances_payload ON instances(payload);
CREATE INDEX IF NOT EXISTS instances_state ON instances(state);
CREATE TABLE IF NOT EXISTS payloads (
    id TEXT PRIMARY KEY,
    ae TEXT NOT NULL, grouping TEXT NOT NULL, key TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL, updated REAL, closed REAL, finished REAL,
    path TEXT
);
CREATE INDEX IF NOT EXISTS payloads_open ON payloads(ae, key, state);
CREATE TABLE IF NOT EXISTS payload_associations (
    payload TEXT NOT NULL, association TEXT NOT NULL,
    PRIMARY KEY (payload, association)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    payload TEXT NOT NULL, pipeline TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL,
    created REAL, updated REAL,
    reason TEXT,
    outputs INTEGER NOT NULL DEFAULT 0,
    export_jobs TEXT NOT NULL DEFAULT '[]'  -- JSON list of IExportQueue job ids
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""


class Database:
    """SQLite on one dedicated thread; ``run(f, *args)`` = one transaction."""

    def __init__(self, path: str, reactor, durable: bool = True):
        self.path = path
        self.reactor = reactor
        self.durable = durable
        self.pool = WorkerPool(1, "dicomgw-db")
        self._conn: sqlite3.Connection | None = None
        self._batch: list = []  # (f, args, Deferred) waiting for the next shared transaction
        self._batch_running = False
        self._batch_timer = None

    def start(self):
        self.pool.start()
        return self.run(lambda conn: None)

    def stop(self):
        self.flush()  # queued ahead of the close

        def close(_conn):
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        d = deferToThreadPool(self.reactor, self.pool, close)
        d.addBoth(lambda r: self.pool.stop())
        return d

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        return conn

    def _transaction(self, f, args, durable=False):
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        if durable:
            conn.execute("PRAGMA synchronous=FULL")
        try:
            with conn:  # commit on return, roll back on an exception
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


# ---- header (disk pool) --------------------------------------------------

#: The indexed attributes: tag -> (pydicom keyword, key in the attributes).
_INDEXED = {0x00100020: ("PatientID", "patient_id"), 0x00100010: ("PatientName", "patient_name"),
            0x0020000D: ("StudyInstanceUID", "study_uid"), 0x0020000E: ("SeriesInstanceUID", "series_uid"),
            0x00080060: ("Modality", "modality")}
_SPECIFIC_CHARACTER_SET = 0x00080005
#: What either way of reading looks for (and, for the quick read, how far).
_HEADER_TAGS = [keyword for keyword, _key in _INDEXED.values()] + ["SpecificCharacterSet"]
_HEADER_TAG_NUMBERS = frozenset(_INDEXED) | {_SPECIFIC_CHARACTER_SET}
_LAST_HEADER_TAG = max(_HEADER_TAG_NUMBERS)
#: Transfer syntaxes whose data set is not plain little endian: their header
#: is read from the file by pydicom.
_NOT_LITTLE_ENDIAN = frozenset({sop.EXPLICIT_VR_BIG_ENDIAN, sop.DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
                                sop.JPIP_REFERENCED_DEFLATE})


def header_attributes(path: str, head: bytes | None = None, transfer_syntax: str = "",
                      complete: bool = False) -> dict:
    """The indexed attributes of a stored instance, from its header only.

    ``head`` may give the first bytes of the data set (all of them when
    ``complete``), as the writer kept them: the few indexed elements are
    then picked out of it (:func:`gateway.part10.read_elements`), and a
    value of plain ASCII is taken as it is, without its padding.  Any other
    value is decoded by pydicom with the data set's Specific Character Set
    (ISO-IR 6, ISO-IR 100, ISO 2022 IR 87, ISO-IR 192 and the rest of
    PS3.5), and when ``head`` ends too soon, is not little endian, or is not
    given, pydicom reads the file itself up to the pixel data.  Both ways
    give the same strings.  A data set that cannot be parsed gets empty
    attributes and ``header_error``: it is still stored as-is.  Blocking:
    the storage writer runs it in its own pool job, right after the file is
    in place (see ``Storage.after_write``).
    """
    try:
        attrs = None
        if head is not None and transfer_syntax not in _NOT_LITTLE_ENDIAN:
            attrs = _quick_header(head, transfer_syntax == sop.IMPLICIT_VR_LITTLE_ENDIAN, complete)
        if attrs is None:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            attrs = {key: str(ds.get(keyword, "") or "") for keyword, key in _INDEXED.values()}
        attrs["header_error"] = ""
    except Exception as e:  # a malformed dataset is still stored as-is
        attrs = {key: "" for _keyword, key in _INDEXED.values()}
        attrs["header_error"] = f"{type(e).__name__}: {e}"
    return attrs


_PLAIN = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII but the backslash (value separator)


def _quick_header(head: bytes, implicit: bool, complete: bool) -> dict | None:
    """The indexed attributes found in ``head``, or None when ``head`` does
    not settle them (the caller has pydicom read the file instead)."""
    try:
        found = read_elements(head, implicit=implicit, last_tag=_LAST_HEADER_TAG,
                              wanted=_HEADER_TAG_NUMBERS, complete=complete)
    except ValueError:  # Truncated, or not a data set: pydicom will say what it makes of it
        return None
    attrs, others = {}, {}
    for number, (keyword, key) in _INDEXED.items():
        vr, value = found.get(number, (None, b""))
        value = value.rstrip(b"\0 ")
        if _PLAIN.fullmatch(value):
            attrs[key] = value.decode("ascii")
        else:
            others[number] = (vr, value)
    if others:  # another character set, several values, control characters
        from pydicom.dataelem import RawDataElement
        from pydicom.dataset import Dataset
        from pydicom.tag import Tag

        if _SPECIFIC_CHARACTER_SET in found:
            others[_SPECIFIC_CHARACTER_SET] = found[_SPECIFIC_CHARACTER_SET]
        raw = {}
        for number, (vr, value) in others.items():
            tag = Tag(number)
            raw[tag] = RawDataElement(tag, vr.decode("ascii") if vr else None, len(value), value, 0,
                                      implicit, True)
        ds = Dataset(raw)
        for number in others.keys() & _INDEXED.keys():
            keyword, key = _INDEXED[number]
            attrs[key] = str(ds.get(keyword, "") or "")
    return attrs


def read_header(path: str, known: dict, attributes: dict | None = None) -> dict:
    """The index columns of a stored file: the header attributes plus the
    ``sha256``, ``size`` and ``inode`` in ``known`` (the writer computed them
    as it wrote the file).

    ``attributes`` gives the header attributes when the writer picked them
    out already (nearly always); otherwise :func:`header_attributes` reads
    them from the file.
    """
    attrs = dict(attributes) if attributes is not None else header_attributes(path)
    attrs.update(sha256=known["sha256"], size=known["size"], inode=known["inode"])
    return attrs


def remove_if_same(path: str, inode: int | None) -> int:
    """Unlink ``path`` if it is still the file we indexed; return bytes freed.

    A later copy of the same SOP Instance (a new file, a new inode) is never
    removed on behalf of an older one.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    if inode is not None and st.st_ino != inode:
        return 0
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return st.st_size if st.st_nlink <= 1 else 0

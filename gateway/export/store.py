"""Export jobs and their per-file states, kept durable for :mod:`gateway.export.jobs`.

The jobs live in a database of their own (``exports.sqlite`` under the
storage root, or the shared index's PostgreSQL schema on a cluster), a
:class:`~gateway.store.database.Database`, always off the reactor thread.
"""

from __future__ import annotations

import os

from twisted.internet import defer

from gateway.dimse import commands as C
from gateway.store import dialect
from gateway.store.database import Database

DB_NAME = "exports.sqlite"

FINAL_STATES = ("done", "partially_failed", "failed")
JOB_STATES = ("queued", "in_progress", "retrying") + FINAL_STATES
# File states: queued (not tried yet), retry (failed, will be tried again),
# sent, failed (for good).

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    origin TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS files (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    seq INTEGER NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    status INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    sop_instance_uid TEXT,
    PRIMARY KEY (job_id, seq)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""

# The cluster: the node that holds a job, until lease_until (the database's clock).
_CLUSTER = """
ALTER TABLE jobs ADD COLUMN node TEXT;
ALTER TABLE jobs ADD COLUMN lease_until REAL
"""

#: The export database's schema, as versioned migrations (gateway.store.database.migrate).
MIGRATIONS = ((1, "exports", _SCHEMA), (2, "cluster", _CLUSTER))


def expand_paths(paths) -> list[str]:
    """Files as given, directories walked in sorted order (blocking)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                out.extend(os.path.join(root, name) for name in sorted(files))
        else:
            out.append(p)
    return [os.path.abspath(p) for p in out]


def status_ok(status: int) -> bool:
    """Success and warnings: the destination has the instance."""
    return status == C.SUCCESS or status == 0x0001 or 0xB000 <= status <= 0xBFFF


def job_outcome(total: int, failed: int) -> str:
    if failed == 0:
        return "done"
    return "failed" if failed * 2 > total else "partially_failed"


# ---- SQLite, off the reactor thread ----------------------------------------


_JOB_COLUMNS = (
    "SELECT j.id, j.destination, j.state, j.origin, j.created, j.updated, j.attempts, j.next_attempt, "
    "j.reason, COUNT(f.seq) AS files, COALESCE(SUM(CASE WHEN f.state = 'sent' THEN 1 ELSE 0 END), 0) AS done, "
    "COALESCE(SUM(CASE WHEN f.state = 'failed' THEN 1 ELSE 0 END), 0) AS failed FROM jobs j LEFT JOIN files f ON f.job_id = j.id ")


def _add_jobs(conn, destinations, paths, origin, now, node="", lease=0.0):
    ids = []
    until = dialect.db_now(conn) + lease
    for dest in destinations:
        job_id = conn.execute(
            "INSERT INTO jobs (destination, origin, state, created, updated, node, lease_until) "
            "VALUES (?, ?, 'queued', ?, ?, ?, ?) RETURNING id", (dest, origin, now, now, node or None, until)
        ).fetchone()[0]
        conn.executemany("INSERT INTO files (job_id, seq, path, state) VALUES (?, ?, ?, 'queued')",
                         [(job_id, i, p) for i, p in enumerate(paths)])
        ids.append(job_id)
    return ids


_UNFINISHED = "('queued', 'in_progress', 'retrying')"


def _claim(conn, job_id, now, node, lease):
    """Start an attempt of the job on this node: the attempt's number, or
    None when it is finished or another node holds it (its lease runs)."""
    db_now = dialect.db_now(conn)
    row = conn.execute(
        "UPDATE jobs SET state = 'in_progress', attempts = attempts + 1, next_attempt = NULL, updated = ?, "
        f"node = ?, lease_until = ? WHERE id = ? AND state IN {_UNFINISHED} "
        "AND (node IS NULL OR node = ? OR lease_until IS NULL OR lease_until < ?) RETURNING attempts",
        (now, node or None, db_now + lease, job_id, node, db_now)).fetchone()
    return None if row is None else row[0]


def _renew_and_take(conn, node, lease):
    """Renew this node's leases; take the jobs whose lease expired (their
    node stopped): returns them as _unfinished does."""
    db_now = dialect.db_now(conn)
    conn.execute(f"UPDATE jobs SET lease_until = ? WHERE node = ? AND state IN {_UNFINISHED}", (db_now + lease, node))
    rows = conn.execute(
        f"UPDATE jobs SET node = ?, lease_until = ? WHERE state IN {_UNFINISHED} AND lease_until < ? "
        "AND (node IS NULL OR node != ?) RETURNING id, destination, state, next_attempt",
        (node, db_now + lease, db_now, node))
    return [dict(r) for r in rows]


def _set_job(conn, job_id, now, fields):
    fields = dict(fields, updated=now)
    names = ", ".join(f"{k} = ?" for k in fields)
    conn.execute(f"UPDATE jobs SET {names} WHERE id = ?", (*fields.values(), job_id))


def _set_file(conn, job_id, seq, fields):
    names = ", ".join(f"{k} = ?" for k in fields)
    conn.execute(f"UPDATE files SET {names} WHERE job_id = ? AND seq = ?", (*fields.values(), job_id, seq))


def _unfinished(conn):
    rows = conn.execute("SELECT id, destination, state, next_attempt FROM jobs "
                        "WHERE state IN ('queued', 'in_progress', 'retrying') ORDER BY id")
    return [dict(r) for r in rows]


def _pending_files(conn, job_id):
    rows = conn.execute("SELECT seq, path, attempts FROM files WHERE job_id = ? AND state IN ('queued', 'retry') "
                        "ORDER BY seq", (job_id,))
    return [dict(r) for r in rows]


def _counts(conn, job_id):
    row = conn.execute(
        "SELECT COUNT(*) AS files, SUM(CASE WHEN state = 'sent' THEN 1 ELSE 0 END) AS done, "
        "SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS failed, "
        "SUM(CASE WHEN state IN ('queued', 'retry') THEN 1 ELSE 0 END) AS pending FROM files WHERE job_id = ?", (job_id,)).fetchone()
    return {k: row[k] or 0 for k in ("files", "done", "failed", "pending")}


def _jobs(conn, limit, offset, state):
    where, args = ("WHERE j.state = ? ", (state,)) if state else ("", ())
    rows = conn.execute(_JOB_COLUMNS + where + "GROUP BY j.id ORDER BY j.id DESC LIMIT ? OFFSET ?",
                        (*args, int(limit), int(offset)))
    return [dict(r) for r in rows]


def _count(conn, state):
    where, args = ("WHERE state = ?", (state,)) if state else ("", ())
    return conn.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]


def _by_origin(conn, origin):
    return [r[0] for r in conn.execute("SELECT id FROM jobs WHERE origin = ? ORDER BY id", (origin,))]


def _job(conn, job_id):
    row = conn.execute(_JOB_COLUMNS + "WHERE j.id = ? GROUP BY j.id", (job_id,)).fetchone()
    if row is None:
        return None
    job = dict(row)
    job["file_statuses"] = [dict(r) for r in conn.execute(
        "SELECT path, state, status, attempts, reason, sop_instance_uid FROM files WHERE job_id = ? ORDER BY seq",
        (job_id,))]
    return job


class ExportStore:
    """Export jobs in their own database; every method returns a Deferred.

    Writes are durable commits (fsynced while ``[storage] fsync`` is on): a
    submitted job survives a power cut.
    """

    def __init__(self, path: str, reactor, pool=None, durable: bool = True, reserve=None, url: str = "",
                 namespace: str = "dicomgw"):
        # With [index] url, the jobs are in PostgreSQL, beside the index's schema.
        self.db = Database(url or path, reactor, migrations=MIGRATIONS, name="exportdb", durable=durable, pool=pool,
                           reserve=reserve, namespace=f"{namespace}_exports")
        self.path = path if not url else f"{self.db.namespace} on PostgreSQL"

    def start(self):
        return self.db.start()

    def stop(self):
        return self.db.stop()

    def add_jobs(self, destinations, paths, origin, now, node="", lease=0.0):
        return self.db.run_durable(_add_jobs, list(destinations), list(paths), origin, now, node, lease)

    def claim(self, job_id, now, node="", lease=0.0):
        return self.db.run_durable(_claim, job_id, now, node, lease)

    def renew_and_take(self, node, lease):
        return self.db.run_durable(_renew_and_take, node, lease)

    def set_job(self, job_id, now, **fields):
        return self.db.run_durable(_set_job, job_id, now, fields)

    def set_file(self, job_id, seq, **fields):
        return self.db.run_durable(_set_file, job_id, seq, fields)

    def unfinished(self):
        return self.db.run(_unfinished)

    def pending_files(self, job_id):
        return self.db.run(_pending_files, job_id)

    def counts(self, job_id):
        return self.db.run(_counts, job_id)

    def jobs(self, limit=100, offset=0, state=None):
        return self.db.run(_jobs, limit, offset, state)

    def count(self, state=None):
        return self.db.run(_count, state)

    def by_origin(self, origin):
        return self.db.run(_by_origin, origin)

    def job(self, job_id):
        try:
            job_id = int(job_id)  # the API hands over the id from a URL
        except (TypeError, ValueError):
            return defer.succeed(None)
        return self.db.run(_job, job_id)

"""The instance index: which instances the gateway holds, from which association.

One database (``<storage>/dicomgw.sqlite``, a :class:`~gateway.store.database.Database`)
holds the index and the workflow state built on it (payloads and their
pipeline jobs, :mod:`gateway.workflow`; the message broker's outbox and
export requests, :mod:`gateway.messaging`); the schema of all of it is here.
The functions below are transactions: each takes the connection first and
runs on the database thread.

States:

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
- ``outbox.state``: ``waiting`` (recorded, not confirmed by the broker) ->
  ``sent``; ``seq`` is the order of publication, ``payload`` the payload a
  workflow request announces.
- ``export_requests.state``: ``exporting`` (jobs submitted or about to be)
  -> ``complete``; ``key`` is the export task id, ``status`` the export
  complete's.
"""

from __future__ import annotations

import os

from gateway.store.database import Database

DB_NAME = "dicomgw.sqlite"

_BASE = """
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
    size INTEGER, digest TEXT, inode INTEGER,  -- digest: "<algorithm>:<hex>" of the file
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
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    routing_key TEXT NOT NULL,
    type TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    timestamp REAL NOT NULL,
    body BLOB NOT NULL,
    payload TEXT,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    sent REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox(state, seq);
CREATE INDEX IF NOT EXISTS outbox_payload ON outbox(payload);
CREATE TABLE IF NOT EXISTS export_requests (
    key TEXT PRIMARY KEY,
    message_id TEXT,
    workflow_instance_id TEXT,
    correlation_id TEXT,
    request TEXT NOT NULL,  -- JSON: files, destinations
    state TEXT NOT NULL,
    jobs TEXT NOT NULL DEFAULT '[]',  -- JSON list of IExportQueue job ids
    status TEXT,
    created REAL NOT NULL,
    completed REAL
);
CREATE INDEX IF NOT EXISTS export_requests_message ON export_requests(message_id);
"""

# The cluster: which node received what; leases on the work a node claims
# (lease_until, in the database's clock); a heartbeat row per node.
_CLUSTER = """
ALTER TABLE associations ADD COLUMN node TEXT;
ALTER TABLE instances ADD COLUMN node TEXT;
CREATE INDEX IF NOT EXISTS associations_state ON associations(state, node);
CREATE INDEX IF NOT EXISTS instances_group ON instances(ae, group_key, state);
ALTER TABLE payloads ADD COLUMN node TEXT;
ALTER TABLE payloads ADD COLUMN touches INTEGER NOT NULL DEFAULT 0;
ALTER TABLE payloads ADD COLUMN lease_until REAL;
ALTER TABLE jobs ADD COLUMN node TEXT;
ALTER TABLE jobs ADD COLUMN lease_until REAL;
ALTER TABLE outbox ADD COLUMN node TEXT;
ALTER TABLE outbox ADD COLUMN lease_until REAL;
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    started REAL, seen REAL,
    pid INTEGER, version TEXT
)
"""

#: The schema, as versioned migrations (gateway.store.database.migrate):
#: (version, name, script).  A new version is appended, never edited.
MIGRATIONS = ((1, "index", _BASE), (2, "cluster", _CLUSTER))


def open_index(root: str, reactor, durable: bool, reserve=None, url: str = "",
               namespace: str = "dicomgw") -> Database:
    """The index database (opened by ``start()``): ``url`` (``[index] url``),
    or, when that is "", SQLite under the storage root."""
    return Database(url or os.path.join(os.path.abspath(root), DB_NAME), reactor, migrations=MIGRATIONS,
                    name="db", durable=durable, reserve=reserve, namespace=namespace)


#: An instance row as :func:`record_instances` takes it: these columns, in this order.
INSTANCE_COLUMNS = ("association", "ae", "sop_class_uid", "sop_instance_uid", "patient_id", "patient_name",
                    "study_uid", "series_uid", "modality", "transfer_syntax", "size", "digest", "inode",
                    "calling_ae", "called_ae", "peer", "received", "path", "group_key", "node")
#: An association row as :func:`record_instances` takes it.
ASSOCIATION_COLUMNS = ("id", "calling_ae", "called_ae", "peer", "started", "node")
#: The columns that are not text (read from JSON through a cast).
_NUMERIC = {"size": "INTEGER", "inode": "INTEGER", "received": "REAL", "started": "REAL"}


def _json_values(columns) -> str:
    return ", ".join(f"CAST(value->>{i} AS {_NUMERIC[c]})" if c in _NUMERIC else f"value->>{i}"
                     for i, c in enumerate(columns))


_RECORD_ASSOCIATIONS = (
    f"INSERT OR IGNORE INTO associations ({', '.join(ASSOCIATION_COLUMNS)}, state) "
    f"SELECT {_json_values(ASSOCIATION_COLUMNS)}, 'open' FROM json_each(?)")
_RECORD_INSTANCES = (
    f"INSERT INTO instances ({', '.join(INSTANCE_COLUMNS)}, state) "
    f"SELECT {_json_values(INSTANCE_COLUMNS)}, "
    "CASE (SELECT state FROM associations WHERE id = value->>0) WHEN 'open' THEN 'received' ELSE 'aborted' END "
    "FROM json_each(?) ORDER BY key")


def record_instances(conn, associations: str, rows: str) -> None:
    """Record instances, in two statements however many there are.

    ``associations`` and ``rows`` are JSON arrays of arrays: the
    :data:`ASSOCIATION_COLUMNS` of the associations the instances came on
    (recorded open, unless they are there already) and the
    :data:`INSTANCE_COLUMNS` of each instance, in the order received.  An
    instance whose association has ended already is recorded aborted.  One
    statement per batch, not per row: the database thread takes the GIL
    back a few times per batch, not per instance (gateway.workflow.payloads).
    """
    conn.execute(_RECORD_ASSOCIATIONS, (associations,))
    conn.execute(_RECORD_INSTANCES, (rows,))


def _keep(conn, keep_aes, where, args):
    """Instances on AE titles without pipelines are kept whatever happens:
    nothing is handed on from there, and the SCP acknowledged them."""
    if keep_aes:
        conn.execute(f"UPDATE instances SET state = 'kept' WHERE {where} AND state = 'received' "
                     f"AND ae IN ({', '.join('?' * len(keep_aes))})", [*args, *keep_aes])


def end_association(conn, association_id, result, now, retention, keep_aes=()):
    """Mark the association ended without release; its instances are aborted."""
    conn.execute("UPDATE associations SET state = ?, ended = ? WHERE id = ? AND state = 'open'",
                 (result, now, association_id))
    _keep(conn, keep_aes, "association = ?", [association_id])
    cur = conn.execute("UPDATE instances SET state = 'aborted', discard_after = ? "
                       "WHERE association = ? AND state = 'received'", (now + retention, association_id))
    return cur.rowcount, due_aborted(conn, now, association_id)


def due_aborted(conn, now, association_id=None):
    # A row whose file was never examined (no inode: a crash came first) is
    # not removed while a live row shares its path: that file is a later copy.
    q = ("SELECT id, path, inode FROM instances i WHERE state = 'aborted' AND discard_after <= ? "
         "AND NOT (inode IS NULL AND EXISTS (SELECT 1 FROM instances o WHERE o.path = i.path "
         "AND o.id != i.id AND o.state IN ('received', 'payload', 'kept')))")
    args = [now]
    if association_id is not None:
        q += " AND association = ?"
        args.append(association_id)
    return [tuple(r) for r in conn.execute(q, args).fetchall()]


def mark_removed(conn, instance_ids):
    conn.executemany("UPDATE instances SET state = 'removed' WHERE id = ?", [(i,) for i in instance_ids])


def break_associations(conn, node, now, retention, keep_aes=()):
    """The open associations of ``node`` (None: of no node, from before the
    cluster) end ``broken``: a crash ended them; their instances are
    aborted.  Returns their ids."""
    if node is None:
        broken = [r[0] for r in conn.execute("SELECT id FROM associations WHERE state = 'open' AND node IS NULL")]
    else:
        broken = [r[0] for r in conn.execute("SELECT id FROM associations WHERE state = 'open' AND node = ?",
                                             (node,))]
    for a in broken:
        conn.execute("UPDATE associations SET state = 'broken', ended = ? WHERE id = ? AND state = 'open'", (now, a))
        _keep(conn, keep_aes, "association = ?", [a])
        conn.execute("UPDATE instances SET state = 'aborted', discard_after = ? "
                     "WHERE association = ? AND state = 'received'", (now + retention, a))
    return broken


def recover(conn, now, retention, instances_dir, started_before, keep_aes=(), handoff_aes=None, node=None,
            grace=0.0):
    """After a restart: end broken associations, adopt never-indexed files.

    ``node``: this node's name; only its own associations (and those of no
    node) are broken by its restart, and only files older than ``grace``
    seconds before ``started_before`` are adopted (on a shared root, a file
    another node has just written has its row on the way).  Returns (broken
    association ids, files adopted as aborted, files adopted as kept,
    aborted instances now due for removal)."""
    broken = break_associations(conn, None, now, retention, keep_aes)
    if node:
        broken += break_associations(conn, node, now, retention, keep_aes)
    started_before -= grace
    known = {r[0] for r in conn.execute(
        "SELECT path FROM instances WHERE state IN ('received', 'kept', 'aborted', 'payload')")}
    orphans = kept = 0
    if os.path.isdir(instances_dir):
        for ae in sorted(os.listdir(instances_dir)):
            directory = os.path.join(instances_dir, ae)
            if not os.path.isdir(directory):
                continue
            for name in sorted(os.listdir(directory)):
                path = os.path.join(directory, name)
                if path in known:
                    continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                if st.st_mtime >= started_before:
                    continue  # arrived since this start: its row is on the way
                # Stored but never indexed: the crash broke its association.  On an
                # AE title with pipelines it is treated like an aborted association's
                # instance; anywhere else (no pipelines, no longer configured, files
                # from before the index existed) it is kept, as the SCP keeps files.
                aborted = handoff_aes is None or ae in handoff_aes
                conn.execute(
                    "INSERT INTO instances (ae, sop_instance_uid, size, inode, received, path, state, "
                    "discard_after) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (ae, name[:-4] if name.endswith(".dcm") else name, st.st_size, st.st_ino,
                     st.st_mtime, path, "aborted" if aborted else "kept", now + retention))
                if aborted:
                    orphans += 1
                else:
                    kept += 1
    return broken, orphans, kept, due_aborted(conn, now)

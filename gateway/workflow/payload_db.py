"""The payload service's database and disk steps (:mod:`gateway.workflow.payloads`).

Each ``conn``-taking function runs in one transaction on the database
thread (``Database.run`` / ``run_durable``), on either back end of
:mod:`gateway.store.dialect`; :func:`build_payload_dir` runs in the disk pool.
"""

from __future__ import annotations

import json
import os
import secrets

from gateway.store import dialect, index
from gateway.store.files import fsync_dir
from gateway.store.header import header_attributes

MANIFEST = "manifest.json"
#: 2: instances carry "digest" ("<algorithm>:<hex>"; "sha256" too when that is the algorithm).
MANIFEST_VERSION = 2


def group_key(grouping: str, association_id: str, attrs: dict) -> str:
    if grouping == "association":
        return association_id
    if grouping == "patient":
        return attrs["patient_id"]
    if grouping == "series":
        return attrs["series_uid"]
    return attrs["study_uid"]


# ---- transactions (database thread) ------------------------------------------

def record_batch(conn, associations: str, segments: list, groupings: dict, node: str = ""):
    """Record a batch of stored instances, in the order received.

    ``associations``: the JSON rows of their associations.  ``segments``:
    JSON arrays of instance rows read on the reactor, and between them
    lists of (StoredInstance, AssociationInfo, time received) whose
    attributes the reactor could not settle from the first bytes: those are
    read here, from the file.  Returns [(group key, header error)] for the
    latter, in order.  (index.record_instances: a few statements a batch.)"""
    index.record_instances(conn, associations, "[]")
    read = []
    for segment in segments:
        if isinstance(segment, str):
            index.record_instances(conn, "[]", segment)
            continue
        rows = []
        for instance, association, received in segment:
            attrs = header_attributes(instance.path, instance.head, instance.transfer_syntax_uid,
                                      instance.dataset_size <= len(instance.head))
            key = group_key(groupings.get(association.called_ae, "study"), association.id, attrs)
            rows.append(instance_row(instance, association, received, attrs, key, node))
            read.append((key, attrs["header_error"]))
        index.record_instances(conn, "[]", json.dumps(rows))
    return read


def instance_row(instance, association, received, attrs, key, node="") -> list:
    """An instance's row, as index.INSTANCE_COLUMNS."""
    return [association.id, association.called_ae, instance.sop_class_uid, instance.sop_instance_uid,
            attrs["patient_id"], attrs["patient_name"], attrs["study_uid"], attrs["series_uid"], attrs["modality"],
            instance.transfer_syntax_uid, instance.size, instance.digest, instance.inode, association.calling_ae,
            association.called_ae, association.peer, received, instance.path, key, node or None]


def release(conn, info, now, aes: dict, node: str = ""):
    """Join the association's instances to payloads; return the open payloads touched.

    ``aes``: the AE titles that form payloads (PayloadService._handoff_aes)."""
    conn.execute(
        "INSERT OR IGNORE INTO associations (id, calling_ae, called_ae, peer, started, node, state) "
        "VALUES (?, ?, ?, ?, ?, ?, 'open')",
        (info.id, info.calling_ae, info.called_ae, info.peer, info.started, node or None))
    cur = conn.execute("UPDATE associations SET state = 'released', ended = ? WHERE id = ? AND state = 'open'",
                       (now, info.id))
    if cur.rowcount == 0:
        # Another node took it for broken (this node's heartbeat stopped for
        # longer than the lease): its instances are aborted already.
        raise RuntimeError(f"association {info.id} was ended meanwhile (by another node)")
    handoff = sorted(aes)
    marks = ", ".join("?" * len(handoff))
    # Instances on AE titles that form no payloads are kept as they are.
    conn.execute("UPDATE instances SET state = 'kept' WHERE association = ? AND state = 'received'"
                 + (f" AND ae NOT IN ({marks})" if handoff else ""), (info.id, *handoff))
    groups = [tuple(g) for g in conn.execute(
        "SELECT ae, COALESCE(group_key, '') AS k, MAX(received) AS received FROM instances "
        "WHERE association = ? AND state = 'received' GROUP BY ae, k ORDER BY ae, k", (info.id,))]
    # A group's open payload is found (or made) and joined under its lock, so
    # that nodes releasing at once make one payload; always in the same
    # order, so that two releases never wait for each other.
    for ae_title, key, _received in groups:
        dialect.lock(conn, group_lock(ae_title, key))
    touched = {}
    for ae_title, key, received in groups:
        p = conn.execute("SELECT id, updated FROM payloads WHERE ae = ? AND key = ? AND state = 'open'",
                         (ae_title, key)).fetchone()
        if p is None:
            pid = f"{int(now):d}-{secrets.token_hex(6)}"
            conn.execute("INSERT INTO payloads (id, ae, grouping, key, state, created, updated, node, touches) "
                         "VALUES (?, ?, ?, ?, 'open', ?, ?, ?, 1)",
                         (pid, ae_title, aes[ae_title].grouping, key, now, received, node or None))
            updated, touches = received, 1
        else:
            pid, updated = p["id"], max(p["updated"] or 0, received or 0)
            # The quiet timer of the payload runs on the node that joined it last.
            touches = conn.execute("UPDATE payloads SET updated = ?, node = ?, touches = touches + 1 WHERE id = ? "
                                   "RETURNING touches", (updated, node or None, pid)).fetchone()[0]
        conn.execute("UPDATE instances SET state = 'payload', payload = ? WHERE association = ? "
                     "AND state = 'received' AND ae = ? AND COALESCE(group_key, '') = ?",
                     (pid, info.id, ae_title, key))
        # An instance received again for the same payload: the latest copy wins.
        conn.execute("UPDATE instances SET state = 'replaced' WHERE payload = ? AND state = 'payload' "
                     "AND id NOT IN (SELECT MAX(id) FROM instances WHERE payload = ? AND state = 'payload' "
                     "GROUP BY sop_instance_uid)", (pid, pid))
        conn.execute("INSERT OR IGNORE INTO payload_associations (payload, association) VALUES (?, ?)",
                     (pid, info.id))
        touched[pid] = (ae_title, key, updated, touches)
    return touched


def group_lock(ae, key) -> str:
    return f"dicomgw-payload:{ae}:{key}"


def recover(conn, now, retention, instances_dir, started_before, keep_aes, handoff_aes, node="", grace=0.0):
    """After a restart: the index's own recovery, then jobs this node was
    running run again, and its open and closing payloads are found (those of
    other nodes are theirs, or taken over when their leases expire:
    gateway.workflow.cluster)."""
    broken, orphans, kept, due = index.recover(conn, now, retention, instances_dir, started_before,
                                               keep_aes, handoff_aes, node or None, grace)
    mine = "(node = ? OR node IS NULL)"
    conn.execute("UPDATE jobs SET state = 'pending', reason = 'interrupted by a restart', next_attempt = ? "
                 f"WHERE state = 'running' AND {mine}", (now, node))
    opened = [tuple(r) for r in conn.execute(
        f"SELECT id, ae, key, updated, touches FROM payloads WHERE state = 'open' AND {mine}", (node,))]
    closing = [r[0] for r in conn.execute(f"SELECT id FROM payloads WHERE state = 'closing' AND {mine}", (node,))]
    return broken, orphans, kept, due, opened, closing


#: begin_close: the payload is not this node's to close now.
NOT_MINE = "not mine"
#: begin_close: an open association (of another node) still brings instances for it.
BUSY = "busy"


def begin_close(conn, pid, node="", touches=None):
    """Mark the payload closing and read it, or say why not (None: not open
    or closing any more; NOT_MINE: another node joined it since ``touches``
    and runs its timer, or closes it; BUSY: an open association has
    instances of its group not released yet)."""
    row = conn.execute("SELECT ae, key FROM payloads WHERE id = ?", (pid,)).fetchone()
    if row is None:
        return None
    dialect.lock(conn, group_lock(row["ae"], row["key"]))
    p = conn.execute("SELECT state, node, touches FROM payloads WHERE id = ?", (pid,)).fetchone()
    if p["state"] not in ("open", "closing"):
        return None
    if node and p["node"] not in (None, node):
        return NOT_MINE
    if p["state"] == "open":
        if touches is not None and p["touches"] != touches:
            return NOT_MINE
        if conn.execute("SELECT 1 FROM instances i JOIN associations a ON a.id = i.association "
                        "WHERE i.ae = ? AND i.group_key = ? AND i.state = 'received' AND a.state = 'open' LIMIT 1",
                        (row["ae"], row["key"])).fetchone():
            return BUSY
    conn.execute("UPDATE payloads SET state = 'closing', node = ? WHERE id = ?", (node or p["node"], pid))
    payload = dict(conn.execute("SELECT * FROM payloads WHERE id = ?", (pid,)).fetchone())
    instances = [dict(r) for r in conn.execute(
        "SELECT * FROM instances WHERE payload = ? AND state = 'payload' ORDER BY id", (pid,))]
    associations = [dict(r) for r in conn.execute(
        "SELECT a.* FROM associations a JOIN payload_associations pa ON pa.association = a.id "
        "WHERE pa.payload = ? ORDER BY a.started", (pid,))]
    return payload, instances, associations


def finish_close(conn, pid, directory, moved, missing, pipelines, now, participants=(), node="", lease=0.0):
    for instance_id, path in moved:
        conn.execute("UPDATE instances SET path = ? WHERE id = ?", (path, instance_id))
    for instance_id in missing:
        conn.execute("UPDATE instances SET state = 'missing' WHERE id = ?", (instance_id,))
    conn.execute("UPDATE payloads SET state = 'closed', closed = ?, path = ? WHERE id = ?",
                 (now, directory, pid))
    ids = []
    for name in pipelines:
        if conn.execute("SELECT 1 FROM jobs WHERE payload = ? AND pipeline = ?", (pid, name)).fetchone():
            continue
        # The closing node holds the new jobs (gateway.workflow.cluster renews them).
        ids.append(conn.execute("INSERT INTO jobs (payload, pipeline, state, created, updated, next_attempt, node, "
                                "lease_until) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?) RETURNING id",
                                (pid, name, now, now, now, node or None, dialect.db_now(conn) + lease)
                                ).fetchone()[0])
    # Participants (the broker's outbox) record their part in this same transaction.
    held = [p.close_transaction(conn, pid, now) for p in participants]
    if not pipelines and not any(held):
        conn.execute("UPDATE payloads SET state = 'done', finished = ? WHERE id = ?", (now, pid))
    return ids


def list_payloads(conn, limit, offset, state):
    q = "SELECT * FROM payloads"
    args: list = []
    if state is not None:
        q += " WHERE state = ?"
        args.append(state)
    q += " ORDER BY created DESC, id DESC LIMIT ? OFFSET ?"
    args += [limit, offset]
    out = []
    for p in conn.execute(q, args).fetchall():
        d = {k: p[k] for k in ("id", "ae", "key", "state", "created", "closed")}
        # An instance received again counts once: its earlier copies are 'replaced'.
        d["instances"] = conn.execute("SELECT COUNT(*) FROM instances WHERE payload = ? AND state != 'replaced'",
                                      (p["id"],)).fetchone()[0]
        d["pipelines"] = {j["pipeline"]: {"state": j["state"], "attempts": j["attempts"], "reason": j["reason"]}
                          for j in conn.execute("SELECT * FROM jobs WHERE payload = ? ORDER BY id", (p["id"],))}
        out.append(d)
    return out


def count_payloads(conn, state):
    where, args = ("WHERE state = ?", (state,)) if state is not None else ("", ())
    return conn.execute(f"SELECT COUNT(*) FROM payloads {where}", args).fetchone()[0]


# ---- files (disk pool) ---------------------------------------------------------

def build_payload_dir(root, payload, instances, associations, pipelines, fsync):
    """Link the files into ``payloads/<id>/`` and write the manifest; idempotent."""
    directory = os.path.join(root, payload["id"])
    os.makedirs(directory, exist_ok=True)
    moved, entries, missing = [], [], []
    for inst in instances:
        name = os.path.basename(inst["path"])
        target = os.path.join(directory, name)
        if inst["path"] != target:
            if not os.path.exists(inst["path"]) and os.path.exists(target):
                pass  # linked before a crash; the inbox link is already gone
            elif not os.path.exists(inst["path"]):
                missing.append(inst["id"])  # gone from the disk: never blocks the payload
                continue
            else:
                tmp = target + ".link"
                if os.path.lexists(tmp):
                    os.unlink(tmp)
                os.link(inst["path"], tmp)
                os.replace(tmp, target)
            moved.append((inst["id"], target, inst["path"], inst["inode"]))
        entries.append({
            "sop_class_uid": inst["sop_class_uid"], "sop_instance_uid": inst["sop_instance_uid"],
            "patient_id": inst["patient_id"], "patient_name": inst["patient_name"],
            "study_instance_uid": inst["study_uid"], "series_instance_uid": inst["series_uid"],
            "modality": inst["modality"], "transfer_syntax_uid": inst["transfer_syntax"],
            "path": name, "size": inst["size"], "digest": inst["digest"] or "",
            "association": inst["association"], "received": inst["received"],
        })
        if (inst["digest"] or "").startswith("sha256:"):
            entries[-1]["sha256"] = inst["digest"][len("sha256:"):]
    manifest = {
        "version": MANIFEST_VERSION,
        "payload": payload["id"], "ae": payload["ae"], "grouping": payload["grouping"],
        "key": payload["key"], "pipelines": list(pipelines),
        "created": payload["created"], "updated": payload["updated"],
        "associations": [{
            "id": a["id"], "calling_ae": a["calling_ae"], "called_ae": a["called_ae"],
            "peer": a["peer"], "started": a["started"], "ended": a["ended"], "result": a["state"],
        } for a in associations],
        "instances": entries,
    }
    path = os.path.join(directory, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(directory)
    return directory, moved, missing

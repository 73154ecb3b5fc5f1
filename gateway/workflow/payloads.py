"""Payloads: received instances gathered per AE title and handed to pipelines.

:class:`PayloadService` is an :class:`IInstanceStoredObserver` of the SCP:

- ``instance_stored``: the writer's record of the instance is indexed
  (state ``received``) in the background: the C-STORE is answered at once.
  Rows wait, at most :data:`INDEX_DELAY` seconds or :data:`INDEX_BATCH`
  rows, to be written together by one database job, which also reads each
  instance's indexed attributes from its first bytes and its group key
  (per ``[[ae]] grouping``: the association id, Patient ID, Study or Series
  Instance UID), remembered per AE title.  Nothing of it costs the
  association a Deferred, a thread hand-off or a commit per instance.
- ``association_released``: once all its instances are indexed, the
  association's instances join the open payload of their (AE, key), or a
  new one, in one durable transaction, before the A-RELEASE-RP goes out.
  An AE without pipelines keeps its instances (state ``kept``) and forms no
  payloads, unless a close participant (the message broker's outbox) is
  there: then every AE title forms payloads.
- ``association_ended`` (aborted or lost): its instances never reach a
  payload; they are removed at once, or after ``[storage] aborted_retention``.

A payload closes when ``timeout`` seconds passed since the last instance of
its group arrived and no open association has instances for the group.
Closing links its files into ``payloads/<id>/``, writes ``manifest.json``
(atomically), records one job per pipeline (and, in the same transaction,
whatever each :class:`~gateway.interfaces.IPayloadCloseParticipant`
records) and only then removes the inbox links; the jobs go to the
:class:`~gateway.workflow.pipelines.PipelineRunner`.

At start (:meth:`recover`): associations a crash broke are treated as
aborted, files in ``instances/`` that were never indexed (never
acknowledged) likewise, payloads caught closing are closed again (every step
is idempotent), open payloads get their timers, and unfinished jobs run.
"""

from __future__ import annotations

import json
import os
import secrets

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.interfaces import IInstanceStoredObserver, IPayloadQuery, IReconfigurable
from gateway.store import dialect, index
from gateway.store.files import fsync_dir, remove_all
from gateway.store.header import header_attributes, quick_attributes

MANIFEST = "manifest.json"
#: 2: instances carry "digest" ("<algorithm>:<hex>"; "sha256" too when that is the algorithm).
MANIFEST_VERSION = 2
#: Index rows wait at most this long (seconds) for company, and go at once
#: when this many wait (see instance_stored).
INDEX_DELAY = 0.25
INDEX_BATCH = 256
#: An association the index could not record ended is tried again this often, this many times.
DISCARD_RETRY = 2.0
DISCARD_TRIES = 300
#: The states a payload goes through (gateway.store.index says what each means).
PAYLOAD_STATES = ("open", "closing", "closed", "done", "failed", "removed")


def group_key(grouping: str, association_id: str, attrs: dict) -> str:
    if grouping == "association":
        return association_id
    if grouping == "patient":
        return attrs["patient_id"]
    if grouping == "series":
        return attrs["series_uid"]
    return attrs["study_uid"]


# ---- transactions (database thread) ------------------------------------------

def _db_index(conn, associations: str, segments: list, groupings: dict, node: str = ""):
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


def _db_release(conn, info, now, aes: dict, node: str = ""):
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
    rows = conn.execute("SELECT id, ae, group_key, received, sop_instance_uid FROM instances "
                        "WHERE association = ? AND state = 'received' ORDER BY id", (info.id,)).fetchall()
    # A group's open payload is found (or made) and joined under its lock, so
    # that nodes releasing at once make one payload; always in the same
    # order, so that two releases never wait for each other.
    for ae_title, key in sorted({(r["ae"], r["group_key"] or "") for r in rows if r["ae"] in aes}):
        dialect.lock(conn, _group_lock(ae_title, key))
    touched = {}
    for r in rows:
        ae = aes.get(r["ae"])
        if ae is None:
            conn.execute("UPDATE instances SET state = 'kept' WHERE id = ?", (r["id"],))
            continue
        key = r["group_key"] or ""
        p = conn.execute("SELECT id, updated FROM payloads WHERE ae = ? AND key = ? AND state = 'open'",
                         (r["ae"], key)).fetchone()
        if p is None:
            pid = f"{int(now):d}-{secrets.token_hex(6)}"
            conn.execute("INSERT INTO payloads (id, ae, grouping, key, state, created, updated, node, touches) "
                         "VALUES (?, ?, ?, ?, 'open', ?, ?, ?, 1)",
                         (pid, r["ae"], ae.grouping, key, now, r["received"], node or None))
            updated, touches = r["received"], 1
        else:
            pid, updated = p["id"], max(p["updated"] or 0, r["received"] or 0)
            # The quiet timer of the payload runs on the node that joined it last.
            touches = conn.execute("UPDATE payloads SET updated = ?, node = ?, touches = touches + 1 WHERE id = ? "
                                   "RETURNING touches", (updated, node or None, pid)).fetchone()[0]
        conn.execute("UPDATE instances SET state = 'payload', payload = ? WHERE id = ?", (pid, r["id"]))
        # The same instance received again for the same payload: latest wins.
        conn.execute("UPDATE instances SET state = 'replaced' WHERE payload = ? AND state = 'payload' "
                     "AND sop_instance_uid = ? AND id < ?", (pid, r["sop_instance_uid"], r["id"]))
        conn.execute("INSERT OR IGNORE INTO payload_associations (payload, association) VALUES (?, ?)",
                     (pid, info.id))
        touched[pid] = (r["ae"], key, updated, touches)
    return touched


def _group_lock(ae, key) -> str:
    return f"dicomgw-payload:{ae}:{key}"


def _db_recover(conn, now, retention, instances_dir, started_before, keep_aes, handoff_aes, node="", grace=0.0):
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


#: _db_begin_close: the payload is not this node's to close now.
NOT_MINE = "not mine"
#: _db_begin_close: an open association (of another node) still brings instances for it.
BUSY = "busy"


def _db_begin_close(conn, pid, node="", touches=None):
    """Mark the payload closing and read it, or say why not (None: not open
    or closing any more; NOT_MINE: another node joined it since ``touches``
    and runs its timer, or closes it; BUSY: an open association has
    instances of its group not released yet)."""
    row = conn.execute("SELECT ae, key FROM payloads WHERE id = ?", (pid,)).fetchone()
    if row is None:
        return None
    dialect.lock(conn, _group_lock(row["ae"], row["key"]))
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


def _db_finish_close(conn, pid, directory, moved, missing, pipelines, now, participants=(), node="", lease=0.0):
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


def _db_payloads(conn, limit, offset, state):
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
        d["instances"] = conn.execute("SELECT COUNT(*) FROM instances WHERE payload = ?", (p["id"],)).fetchone()[0]
        d["pipelines"] = {j["pipeline"]: {"state": j["state"], "attempts": j["attempts"], "reason": j["reason"]}
                          for j in conn.execute("SELECT * FROM jobs WHERE payload = ? ORDER BY id", (p["id"],))}
        out.append(d)
    return out


def _db_count(conn, state):
    where, args = ("WHERE state = ?", (state,)) if state is not None else ("", ())
    return conn.execute(f"SELECT COUNT(*) FROM payloads {where}", args).fetchone()[0]


# ---- files (disk pool) ---------------------------------------------------------

def _build_payload_dir(root, payload, instances, associations, pipelines, fsync):
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


@implementer(IInstanceStoredObserver, IPayloadQuery, IReconfigurable)
class PayloadService(Service):
    """The service "payloads"; see the module docstring."""

    log = Logger()
    name = "payloads"

    def __init__(self, config, storage, db, reactor, runner=None, participants=()):
        self.config = config
        self.storage = storage
        self.db = db
        self.reactor = reactor
        self.runner = runner
        # IPayloadCloseParticipant providers; with one, every AE title forms
        # payloads, with or without pipelines.
        self.participants = tuple(participants)
        self.aes = {ae.title: ae for ae in config.ae}
        self.node = config.gateway.node
        self.open_keys: dict[str, set] = {}      # association id -> {(ae, key)}
        self.last_seen: dict[tuple, float] = {}  # (ae, key) -> time of the last instance
        self.open_payloads: dict[tuple, list] = {}  # (ae, key) -> [payload id, updated]
        self.timers: dict[str, object] = {}
        self._arrived: list = []  # (instance, association, received) not examined yet
        # For the next index job, in order: (association id, JSON row), or
        # (association id, None, (instance, association, received)) for the
        # job to read (_examine).
        self._rows: list = []
        self._associations: dict = {}  # the JSON rows of their associations, by id
        self._rows_timer = None
        self._indexing = False  # an index job is under way
        self._urgent = False  # the next rows go without waiting for company
        # association id -> [rows not yet committed, AE title], and who waits for them
        self.unindexed: dict[str, list] = {}
        self._settling: dict[str, list] = {}
        self.failed: set[str] = set()  # associations with an instance that could not be indexed
        self.recorded: set[str] = set()  # open associations whose first row has gone to the database
        self.started_at = None
        self.recovered = None

    def reconfigure(self, config):
        """New instances use the new grouping and timeout; payloads closing from
        now on get the new pipelines.  An open payload keeps its group key."""
        self.config = config
        self.aes = {ae.title: ae for ae in config.ae}
        if self.runner is not None:
            self.runner.reconfigure(config)

    # ---- service -------------------------------------------------------------

    def startService(self):
        super().startService()
        self.started_at = self.reactor.seconds()
        self.recovered = self.recover()
        self.recovered.addErrback(lambda f: self.log.failure("payload recovery failed", f))

    def stopService(self):
        super().stopService()
        for t in list(self.timers.values()):
            if t.active():
                t.cancel()
        self.timers.clear()

    def _disk(self, f, *args):
        return deferToThreadPool(self.reactor, self.storage.pool, f, *args)

    # ---- observer ------------------------------------------------------------

    def instance_stored(self, instance, association):
        """Index the instance in the background; the C-STORE is answered at once.

        ``instance`` is the writer's record (path, size, digest, first
        bytes).  On the reactor's next turn, once the response has gone
        (:meth:`_examine`), its indexed attributes are picked out of its
        first bytes and its row goes to the database with others
        (:meth:`_index`).  None of it is needed before the association
        releases, and the release waits for them (and makes them durable)
        before the A-RELEASE-RP.  An acknowledged instance whose row a crash
        prevented belongs to an association that never released: at restart
        its file is adopted as such (aborted, or kept on an AE title without
        pipelines).
        """
        if not self._arrived:
            self.reactor.callLater(0, self._examine)
        self._arrived.append((instance, association, self.reactor.seconds()))
        pending = self.unindexed.get(association.id)
        if pending is None:
            self.unindexed[association.id] = [1, association.called_ae]
        else:
            pending[0] += 1

    def _examine(self):
        """The attributes and group key of the instances that arrived, then
        their rows; the database job reads those the first bytes do not settle."""
        arrived, self._arrived = self._arrived, []
        first = False
        for instance, association, received in arrived:
            aid = association.id
            if aid not in self.recorded:
                # A new association's first row goes at once, so that a crash
                # finds its record (and calls it broken); the rest may wait.
                self.recorded.add(aid)
                first = True
                self._associations[aid] = [aid, association.calling_ae, association.called_ae, association.peer,
                                           association.started, self.node]
            try:
                attrs = quick_attributes(instance.head, instance.transfer_syntax_uid,
                                         instance.dataset_size <= len(instance.head))
            except Exception:  # pure and total, but no bug of it stops a row: the job reads the file
                attrs = None
            if attrs is None:
                self._rows.append((aid, None, (instance, association, received)))
                continue
            ae = self.aes.get(association.called_ae)
            key = group_key(ae.grouping if ae else "study", aid, attrs)
            self._seen(association, key, received)
            self._rows.append((aid, json.dumps(instance_row(instance, association, received, attrs, key, self.node)), None))
        if first:
            self._urgent = True
        self._index_soon()

    def _index_soon(self):
        """Index now when someone waits or a batch is full, else within INDEX_DELAY."""
        if self._urgent or len(self._rows) >= INDEX_BATCH:
            self._index()
        elif self._rows_timer is None and self._rows:
            self._rows_timer = self.reactor.callLater(INDEX_DELAY, self._index)

    def _seen(self, association, key, received):
        k = (association.called_ae, key)
        self.open_keys.setdefault(association.id, set()).add(k)
        self.last_seen[k] = max(self.last_seen.get(k, 0), received)

    def _index(self):
        """Write the rows waiting now in one database job (one at a time)."""
        timer, self._rows_timer = self._rows_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._indexing or not self._rows:
            return
        self._urgent = False
        rows, self._rows = self._rows, []
        associations, self._associations = self._associations, {}
        segments: list = []  # consecutive JSON rows make one JSON array; rows to read, a list
        texts: list = []
        for _aid, text, unread in rows:
            if text is not None:
                texts.append(text)
                continue
            if texts:
                segments.append("[" + ",".join(texts) + "]")
                texts = []
            if not segments or isinstance(segments[-1], str):
                segments.append([])
            segments[-1].append(unread)
        if texts:
            segments.append("[" + ",".join(texts) + "]")
        self._indexing = True
        groupings = {title: ae.grouping for title, ae in self.aes.items()}
        d = self.db.run(_db_index, json.dumps(list(associations.values())), segments, groupings, self.node)
        d.addBoth(self._indexed, rows)

    def _indexed(self, result, rows):
        self._indexing = False
        if isinstance(result, Failure):
            # Their associations will not hand off: their releases fail.
            self.log.failure("could not index {count} instance(s); their associations count as aborted and the "
                             "next start adopts their files", result, count=len(rows))
            self.failed.update(aid for aid, _text, _unread in rows)
        else:
            read = [unread for _aid, text, unread in rows if text is None]
            for (instance, association, received), (key, header_error) in zip(read, result):
                if header_error:
                    self.log.warn("{path}: header not readable ({error}); indexed without attributes",
                                  path=instance.path, error=header_error)
                self._seen(association, key, received)
        for aid, _text, _unread in rows:
            self._row_done(aid)
        self._index_soon()

    def _row_done(self, association_id):
        pending = self.unindexed[association_id]
        pending[0] -= 1
        if not pending[0]:
            del self.unindexed[association_id]
            for d in self._settling.pop(association_id, ()):
                d.callback(None)

    def _settled(self, association_id):
        """Fire once every row of the association is committed (or failed)."""
        if association_id not in self.unindexed:
            return succeed(None)
        d = Deferred()
        self._settling.setdefault(association_id, []).append(d)
        self._urgent = True  # someone waits for these rows now: no waiting for company
        if self._arrived:
            self._examine()
        else:
            self._index_soon()
        return d

    @inlineCallbacks
    def association_released(self, association):
        yield self._settled(association.id)
        self.recorded.discard(association.id)
        if association.id in self.failed:
            # Not every instance is indexed: the release fails (the SCP aborts)
            # and the association counts as aborted.
            self.failed.discard(association.id)
            self.open_keys.pop(association.id, None)
            yield self._discard_or_later(association.id, "aborted")
            raise RuntimeError(f"association {association.id}: instances could not be indexed")
        now = self.reactor.seconds()
        try:
            touched = yield self.db.run_durable(_db_release, association, now, self._handoff_aes(), self.node)
        except Exception:
            # Not released (the SCP aborts): the association ends aborted,
            # now or, should the index be unreachable, once it answers again.
            self.open_keys.pop(association.id, None)
            self._discard_or_later(association.id, "aborted")
            raise
        keys = self.open_keys.pop(association.id, set())
        keys.update((ae, key) for ae, key, _u, _t in touched.values())
        for pid, (ae, key, updated, touches) in touched.items():
            self.open_payloads[(ae, key)] = [pid, updated, touches]
        for k in keys:
            self._check_key(k)

    @inlineCallbacks
    def association_ended(self, association, result):
        yield self._settled(association.id)
        self.recorded.discard(association.id)
        self.failed.discard(association.id)
        keys = self.open_keys.pop(association.id, set())
        yield self._discard_or_later(association.id, result)
        for k in keys:
            self._check_key(k)

    def _discard_or_later(self, association_id, result, tries=DISCARD_TRIES):
        """End the association (:meth:`_discard`); while the index cannot be
        reached, try again every DISCARD_RETRY seconds (an association left
        open in the index would hold its groups' payloads open)."""
        d = self._discard(association_id, result)

        def failed(failure):
            if tries <= 1 or not self.running:
                self.log.failure("association {association}: could not be recorded {result}; the next start "
                                 "ends it", failure, association=association_id, result=result)
                return None
            self.log.warn("association {association}: could not be recorded {result} ({why}); trying again",
                          association=association_id, result=result, why=failure.getErrorMessage())
            self.reactor.callLater(DISCARD_RETRY, self._discard_or_later, association_id, result, tries - 1)
            return None

        return d.addErrback(failed)

    @inlineCallbacks
    def _discard(self, association_id, result):
        retention = self.config.storage.aborted_retention
        count, due = yield self.db.run(index.end_association, association_id, result, self.reactor.seconds(),
                                       retention, self._keep_aes())
        freed = yield self._disk(remove_all, due)
        if due:
            yield self.db.run(index.mark_removed, [i for i, _p, _n in due])
        if count or due:
            self.log.info("association {association} ended {result}: {count} instance(s) discarded "
                          "({what})", event="instances.discarded", association=association_id,
                          result=result, count=max(count, len(due)), freed=freed, retained=retention,
                          what=f"kept for {retention:g} s" if retention else f"{freed} bytes freed")

    def _handoff_aes(self) -> dict:
        """The AE titles whose instances form payloads."""
        return {title: ae for title, ae in self.aes.items() if ae.pipelines or self.participants}

    def keep_aes(self):
        """The AE titles whose instances are kept, never handed off."""
        return self._keep_aes()

    def _keep_aes(self):
        handoff = self._handoff_aes()
        return tuple(title for title in self.aes if title not in handoff)

    # ---- timers --------------------------------------------------------------

    def _check_key(self, k):
        entry = self.open_payloads.get(k)
        if entry is None:
            if not any(k in keys for keys in self.open_keys.values()):
                self.last_seen.pop(k, None)  # nothing waits for this group
            return
        pid, updated, touches = entry
        ae = self.aes.get(k[0])
        timeout = ae.timeout if ae else 5.0
        last = max(updated or 0, self.last_seen.get(k, 0))
        delay = last + timeout - self.reactor.seconds()
        old = self.timers.pop(pid, None)
        if old is not None and old.active():
            old.cancel()
        if delay > 0:
            self.timers[pid] = self.reactor.callLater(delay, self._check_key, k)
            return
        if any(k in keys for keys in self.open_keys.values()):
            return  # an open association still brings instances; checked again when it ends
        if any(ae == k[0] for _n, ae in self.unindexed.values()):
            # Instances of this AE title whose group is not known yet: look
            # again once their rows are in.
            self._index()
            self.timers[pid] = self.reactor.callLater(INDEX_DELAY, self._check_key, k)
            return
        del self.open_payloads[k]
        self.last_seen.pop(k, None)
        d = self.close(pid, touches)
        d.addCallback(self._closed_or_not, k, entry)
        d.addErrback(self._close_failed, pid)

    def _closed_or_not(self, outcome, k, entry):
        """A payload another node's open association still feeds waits one
        more timeout (that association's release joins it and restarts the
        timer; its end lets it close)."""
        if outcome == BUSY and k not in self.open_payloads:
            self.open_payloads[k] = entry
            ae = self.aes.get(k[0])
            self.timers[entry[0]] = self.reactor.callLater(ae.timeout if ae else 5.0, self._check_key, k)

    def _close_failed(self, failure, pid):
        self.log.failure("payload {payload}: closing failed; trying again in 30 s", failure, payload=pid)
        self.timers[pid] = self.reactor.callLater(30, self._retry_close, pid)

    def _retry_close(self, pid):
        self.timers.pop(pid, None)
        self.close(pid).addErrback(self._close_failed, pid)

    @inlineCallbacks
    def close(self, pid, touches=None):
        """Close payload ``pid``: directory, manifest, jobs; hand it off.

        ``touches``: how many joins this node saw; should another node have
        joined it since, that node closes it.  Returns its directory, or
        None, NOT_MINE or BUSY when it is not closed (_db_begin_close)."""
        self.timers.pop(pid, None)
        found = yield self.db.run(_db_begin_close, pid, self.node, touches)
        if found in (None, NOT_MINE, BUSY):
            return found
        payload, instances, associations = found
        ae = self.aes.get(payload["ae"])
        pipelines = ae.pipelines if ae else ()
        directory, moved, missing = yield self._disk(_build_payload_dir, self.storage.payloads_dir, payload,
                                                     instances, associations, pipelines, self.storage.fsync)
        if missing:
            self.log.warn("payload {payload}: {count} instance file(s) were no longer on disk; "
                          "left out of the payload", payload=pid, count=len(missing))
        job_ids = yield self.db.run_durable(_db_finish_close, pid, directory,
                                    [(i, target) for i, target, _src, _ino in moved], missing,
                                    pipelines, self.reactor.seconds(), self.participants, self.node,
                                    self.config.cluster.lease)
        # The payload directory holds its own links now: drop the inbox ones
        # (only if no later copy of the same instance replaced them).
        yield self._disk(remove_all, [(i, src, ino) for i, _t, src, ino in moved])
        self.log.info("payload {payload} of {ae} ({key}) closed: {instances} instance(s) to {pipelines}",
                      event="payload.closed", payload=pid, ae=payload["ae"], key=payload["key"],
                      instances=len(instances) - len(missing), pipelines=list(pipelines), path=directory)
        if self.runner is not None and job_ids:
            self.runner.submit(job_ids)
        for participant in self.participants:
            participant.payload_closed(pid)
        return directory

    # ---- recovery ------------------------------------------------------------

    @inlineCallbacks
    def recover(self):
        now = self.reactor.seconds()
        retention = self.config.storage.aborted_retention
        broken, orphans, kept, due, opened, closing = yield self.db.run(
            _db_recover, now, retention, self.storage.instances_dir, now, self._keep_aes(),
            tuple(self._handoff_aes()), self.node, self.config.cluster.lease if self.config.index.shared else 0.0)
        if kept:
            self.log.info("recovery: {kept} file(s) not in the index were indexed as kept", kept=kept)
        if broken or orphans:
            self.log.info("recovery: {associations} association(s) broken by a restart and {orphans} "
                          "file(s) the index had no row for (received on associations that never released) "
                          "are treated as aborted",
                          event="instances.discarded", association=None, count=len(broken) + orphans,
                          associations=len(broken), orphans=orphans, retained=retention)
        if due:
            yield self._disk(remove_all, due)
            yield self.db.run(index.mark_removed, [i for i, _p, _n in due])
        for pid, ae, key, updated, touches in opened:
            self.adopt(pid, ae, key, updated, touches)
        for pid in closing:
            try:
                yield self.close(pid)
            except Exception:
                self.log.failure("payload {payload}: closing after restart failed", payload=pid)
        if self.runner is not None:
            yield self.runner.recover()

    def adopt(self, pid, ae, key, updated, touches):
        """Run the quiet timer of an open payload (found at start, or taken
        over from a node that stopped)."""
        self.open_payloads[(ae, key)] = [pid, updated, touches]
        self._check_key((ae, key))

    # ---- IPayloadQuery -------------------------------------------------------

    def payloads(self, limit=100, offset=0, state=None):
        return self.db.run(_db_payloads, limit, offset, state)

    def count(self, state=None):
        return self.db.run(_db_count, state)

"""The nodes of a cluster: heartbeats, leases, and taking over a dead node's work.

Several gateway processes (nodes, ``[gateway] node``) may share one index
(``[index] url``, PostgreSQL) and one storage root.  Each runs a
:class:`ClusterService`: every third of ``[cluster] lease`` seconds, one
transaction

- records the node's heartbeat (the ``nodes`` row: ``seen``, in the
  database's clock, the one clock the nodes share);
- renews the leases of the pipeline jobs and payloads the node holds;
- finds the nodes not seen for a lease: their open associations end
  ``broken`` (their instances are aborted, as a crash's are), their open
  and closing payloads become this node's (it runs their quiet timers, or
  closes them again: every step of a close is idempotent);
- takes over the jobs whose lease expired: a running one becomes pending
  again (its next start is a new counted attempt), and they run here.

A job is started by one node only (``UPDATE ... WHERE state = 'pending'``
decides), and an attempt whose lease was lost cannot record its outcome
(:func:`gateway.workflow.pipelines._db_end` checks the node and attempt).
With SQLite (one node) the same heartbeat runs; there is no one else to
take anything over.
"""

from __future__ import annotations

import os

from twisted.application.service import Service
from twisted.internet.defer import succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from gateway import __version__
from gateway.interfaces import IHealthCheck, IStatusReport
from gateway.logs import iso_time
from gateway.store import dialect, index

#: Nodes seen within this many leases are listed by /status.
LISTED_LEASES = 10
#: Seconds between heartbeats while the index cannot be reached (to notice soon that it is back).
TROUBLE_INTERVAL = 1.0


def _db_beat(conn, node, lease, started, pid, now, retention, keep_aes):
    """One heartbeat; returns what this node took over."""
    db_now = dialect.db_now(conn)
    conn.execute("INSERT INTO nodes (name, started, seen, pid, version) VALUES (?, ?, ?, ?, ?) "
                 "ON CONFLICT (name) DO UPDATE SET started = excluded.started, seen = excluded.seen, "
                 "pid = excluded.pid, version = excluded.version", (node, started, db_now, pid, __version__))
    until = db_now + lease
    conn.execute("UPDATE jobs SET lease_until = ? WHERE node = ? AND state IN ('pending', 'running')", (until, node))
    conn.execute("UPDATE payloads SET lease_until = ? WHERE node = ? AND state IN ('open', 'closing')",
                 (until, node))
    conn.execute("UPDATE outbox SET lease_until = ? WHERE node = ? AND state = 'waiting'", (until, node))
    broken, adopted = [], []
    for (dead,) in conn.execute("SELECT name FROM nodes WHERE seen < ? AND name != ?",
                                (db_now - lease, node)).fetchall():
        if not dialect.try_lock(conn, f"dicomgw-node:{dead}"):
            continue  # another node is taking it over now
        broken += index.break_associations(conn, dead, now, retention, keep_aes)
        adopted += [tuple(r) for r in conn.execute(
            "UPDATE payloads SET node = ?, lease_until = ? WHERE state IN ('open', 'closing') AND node = ? "
            "RETURNING id, ae, key, updated, touches, state", (node, until, dead))]
    # Jobs whose holder stopped renewing them, whoever it was.
    taken = [tuple(r) for r in conn.execute(
        "UPDATE jobs SET state = 'pending', next_attempt = ?, "
        "reason = 'its node (' || COALESCE(node, '?') || ') stopped renewing its lease', "
        "node = ?, lease_until = ? WHERE state = 'running' AND lease_until < ? RETURNING id, next_attempt, node",
        (now, node, until, db_now))]
    taken += [tuple(r) for r in conn.execute(
        "UPDATE jobs SET node = ?, lease_until = ? WHERE state = 'pending' AND (lease_until IS NULL OR lease_until < ?) "
        "AND (node IS NULL OR node != ?) RETURNING id, next_attempt, node", (node, until, db_now, node))]
    return broken, adopted, taken


def _db_nodes(conn, lease):
    db_now = dialect.db_now(conn)
    rows = conn.execute("SELECT name, started, seen, pid, version FROM nodes WHERE seen >= ? ORDER BY name",
                        (db_now - LISTED_LEASES * lease,)).fetchall()
    return [{"node": r["name"], "seen_ago": round(db_now - r["seen"], 3), "alive": db_now - r["seen"] < lease,
             "pid": r["pid"], "version": r["version"]} for r in rows]


def _db_associations(conn, limit, offset):
    total = conn.execute("SELECT COUNT(*) FROM associations").fetchone()[0]
    rows = conn.execute(
        "SELECT a.id, a.node, a.calling_ae, a.called_ae, a.peer, a.started, a.ended, a.state, "
        "(SELECT COUNT(*) FROM instances i WHERE i.association = a.id) AS instances "
        "FROM associations a ORDER BY a.started DESC, a.id DESC LIMIT ? OFFSET ?", (limit, offset)).fetchall()
    return total, [{"time": iso_time(r["ended"] or r["started"]) if (r["ended"] or r["started"]) else "", "association": r["id"], "node": r["node"],
                    "calling_ae": r["calling_ae"],
                    "called_ae": r["called_ae"], "peer": r["peer"], "started": r["started"], "ended": r["ended"],
                    "result": r["state"], "instances": r["instances"]} for r in rows]


class IndexAssociations:
    """``GET /associations`` of a cluster: the associations of every node, from the shared index."""

    def __init__(self, db):
        self.db = db

    def page(self, limit: int, offset: int):
        """Deferred (total, up to ``limit`` newest first from ``offset``)."""
        return self.db.run(_db_associations, int(limit), int(offset))


@implementer(IHealthCheck, IStatusReport)
class ClusterService(Service):
    """The service "cluster"; see the module docstring.

    It also watches the index: while a transaction (a heartbeat, or any
    other) finds the database unreachable, ``scp.index_trouble`` says why,
    so that new associations are refused transient, and ``/health`` fails
    with the reason; the next successful heartbeat clears it.  ``dbs``: the
    databases watched (the index, the export jobs')."""

    log = Logger()
    name = "cluster"

    def __init__(self, config, db, reactor, payloads, runner=None, scp=None, dbs=()):
        self.scp = scp
        self.dbs = tuple(dbs) or (db,)
        self.config = config
        self.db = db
        self.reactor = reactor
        self.payloads = payloads
        self.runner = runner
        self.node = config.gateway.node
        self.lease = config.cluster.lease
        self.started = None
        self.beats = 0
        self._loop = None
        self._trouble = None  # the last heartbeat's error, logged once

    def startService(self):
        super().startService()
        self.started = self.reactor.seconds()
        # Any transaction that finds a database unreachable (or back) is
        # seen at once, not at the next heartbeat.
        for db in self.dbs:
            if self._watch not in db.watchers:
                db.watchers.append(self._watch)
        self._loop = LoopingCall(self.beat)
        self._loop.clock = self.reactor
        # The first beat waits for the payload service's recovery, so that
        # this node's own leftovers are its own before anything is taken over.
        recovered = self.payloads.recovered
        if recovered is not None:
            recovered.addBoth(lambda r: (self._start_loop(), r)[1])
        else:
            self._start_loop()

    def _start_loop(self):
        if self.running and not self._loop.running:
            self._loop.start(self.lease / 3, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def beat(self):
        """One heartbeat (its errors are logged: the loop goes on)."""
        d = self.db.run(_db_beat, self.node, self.lease, self.started, os.getpid(), self.reactor.seconds(),
                        self.config.storage.aborted_retention, tuple(self.payloads.keep_aes()))
        d.addCallbacks(self._beaten, self._failed)
        return d

    def problems(self) -> list[str]:
        """Why a database cannot be reached now (the last transaction's error)."""
        return [db.problem for db in self.dbs if db.problem]

    def _watch(self):
        trouble = "; ".join(self.problems()) or None
        if self.scp is not None:
            self.scp.index_trouble = trouble
        if self._loop is not None and self._loop.running:
            interval = TROUBLE_INTERVAL if trouble else self.lease / 3
            if self._loop.interval != interval:
                self._loop.interval = interval
                self._loop.reset()  # the next beat after the new interval, not the old one

    def _beaten(self, result):
        broken, adopted, taken = result
        self.beats += 1
        self._watch()
        if self._trouble is not None:
            self.log.info("cluster heartbeat: the index answers again", event="cluster.heartbeat", ok=True)
            self._trouble = None
        if broken:
            self.log.warn("{count} open association(s) of node(s) that stopped are broken: their instances are "
                          "aborted", event="cluster.associations_broken", count=len(broken), associations=broken)
        for pid, ae, key, updated, touches, state in adopted:
            self.log.info("payload {payload} taken over from a node that stopped", event="cluster.payload_taken",
                          payload=pid, state=state)
            if state == "closing":
                d = self.payloads.close(pid)
                d.addErrback(lambda f, pid=pid: self.log.failure("payload {payload}: closing failed", f, payload=pid))
            else:
                self.payloads.adopt(pid, ae, key, updated, touches)
        if taken and self.runner is not None:
            for job_id, _next, _old in taken:
                self.log.warn("pipeline job {job} taken over: its lease expired", event="cluster.job_taken",
                              job=job_id)
            self.runner.submit_due([(job_id, next_attempt) for job_id, next_attempt, _old in taken])

    def _failed(self, failure):
        self._watch()
        why = str(failure.value).strip() or type(failure.value).__name__
        if why != self._trouble:
            self.log.warn("cluster heartbeat failed: {why}", event="cluster.heartbeat", ok=False, why=why)
            self._trouble = why

    def nodes(self):
        """The nodes seen recently (a Deferred list of dicts)."""
        return self.db.run(_db_nodes, self.lease)

    # ---- IHealthCheck, IStatusReport ----------------------------------------------

    def health_problems(self):
        return [f"index database unreachable: {p}" for p in self.problems()]

    def status_report(self):
        section = {"node": self.node,
                   "index": self.config.index.safe_url() if self.config.index.shared else "sqlite",
                   "lease_seconds": self.lease, "problems": self.problems()}
        d = self.nodes()

        def listed(nodes):
            section["nodes"] = nodes
            return "cluster", section

        def unknown(failure):
            section["nodes"] = None
            section["error"] = str(failure.value).strip()
            return "cluster", section

        return d.addCallbacks(listed, unknown)

    def metric_gauges(self):
        return succeed([("dicomgw_index_reachable", "1 while the index database answers, else 0.",
                         [({}, 0 if self.problems() else 1)])])

"""The reclaimer: frees what no pipeline or export needs any more.

Every ``[reclaimer] interval`` seconds (a ``LoopingCall`` through the
injected reactor) it removes

- the files of payloads whose every job is ``done``, ``[storage] retention``
  seconds after the last one finished, together with the pipelines' output
  directories once every export job made from them has ended;
- instances of aborted (or crash-broken) associations whose
  ``aborted_retention`` has passed.

Failed payloads are kept (visible, for an operator).  Open, closing and
closed payloads are never touched, nor those an
:class:`~gateway.interfaces.IPayloadHold` still needs.  A run that fails is logged and the
next one runs as usual.
"""

from __future__ import annotations

import json
import os
import shutil

from twisted.application.internet import TimerService
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from gateway.interfaces import IReconfigurable
from gateway.export.store import FINAL_STATES
from gateway.store import index
from gateway.store.files import remove_all

# Export job states after which nobody needs the job's files.
EXPORT_FINISHED = frozenset(FINAL_STATES)


def _db_candidates(conn, now, retention, holds=()):
    payloads = [dict(r) for r in conn.execute(
        "SELECT id, path FROM payloads WHERE state = 'done' AND finished <= ?", (now - retention,))]
    for hold in holds:
        held = hold.held_payloads(conn, [p["id"] for p in payloads])
        payloads = [p for p in payloads if p["id"] not in held]
    for p in payloads:
        # Export job ids are whatever the export queue gave (numbers or strings).
        p["export_jobs"] = [x for r in conn.execute("SELECT export_jobs FROM jobs WHERE payload = ?",
                                                    (p["id"],)) for x in json.loads(r[0] or "[]")]
    return payloads, index.due_aborted(conn, now)


def _db_payload_removed(conn, pids):
    for pid in pids:
        conn.execute("UPDATE payloads SET state = 'removed' WHERE id = ?", (pid,))
        conn.execute("UPDATE instances SET state = 'removed' WHERE payload = ?", (pid,))


def _tree_size(path):
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if st.st_nlink <= 1:  # a file still linked elsewhere frees nothing
                total += st.st_size
    return total


def _gone_already(function, path, excinfo):
    """Nodes sharing a storage root may reclaim the same payload at once:
    what the other removed first is not an error."""
    if not isinstance(excinfo[1], FileNotFoundError):
        raise excinfo[1]


def _remove_trees(paths):
    freed = 0
    for path in paths:
        if path and os.path.isdir(path):
            freed += _tree_size(path)
            shutil.rmtree(path, onerror=_gone_already)
    return freed


@implementer(IReconfigurable)
class Reclaimer(TimerService):
    log = Logger()
    name = "reclaimer"

    def __init__(self, config, storage, db, reactor, export_queue=None, holds=()):
        super().__init__(config.reclaimer.interval, self.run)
        self.clock = reactor
        self.config = config
        self.storage = storage
        self.db = db
        self.reactor = reactor
        self.export_queue = export_queue
        # IPayloadHold providers: payloads they still need are not removed.
        self.holds = tuple(holds)

    def reconfigure(self, config):
        """New retention times apply from the next pass; the interval needs a restart."""
        self.config = config

    def run(self):
        """One pass; never fails (the LoopingCall would stop for good)."""
        d = self._run()
        d.addErrback(lambda f: self.log.failure("reclaimer pass failed; trying again next time", f))
        return d

    @inlineCallbacks
    def _exports_finished(self, ids):
        if not ids:
            return True
        if self.export_queue is None:
            return False
        for job_id in ids:
            job = yield self.export_queue.job(job_id)
            if job is not None and job.get("state") not in EXPORT_FINISHED:
                return False
        return True

    @inlineCallbacks
    def _run(self):
        now = self.reactor.seconds()
        payloads, aborted = yield self.db.run(_db_candidates, now, self.config.storage.retention, self.holds)
        done = []
        for p in payloads:
            if (yield self._exports_finished(p["export_jobs"])):
                done.append(p)
        trees = []
        for p in done:
            trees.append(p["path"])
            trees.append(os.path.join(self.storage.outputs_dir, p["id"]))
        freed = 0
        if trees:
            freed += yield deferToThreadPool(self.reactor, self.storage.pool, _remove_trees, trees)
            yield self.db.run(_db_payload_removed, [p["id"] for p in done])
        if aborted:
            freed += yield deferToThreadPool(self.reactor, self.storage.pool, remove_all, aborted)
            yield self.db.run(index.mark_removed, [i for i, _p, _n in aborted])
        if done or aborted:
            self.log.info("reclaimer freed {bytes} bytes: {payloads} payload(s), {instances} aborted instance(s)",
                          event="reclaimer.freed", payloads=len(done), instances=len(aborted), bytes=freed)
        return freed

"""Export requests in, export jobs, export complete out.

Each message on an agent's queue (``<export_request_prefix>.<agent>``) is
handled by :class:`ExportRequestHandler`:

1. Parsed and checked (:func:`gateway.messaging.monai.parse_export_request`):
   the fields MONAI Deploy requires, ``destinations`` that are configured
   ``[[destination]]`` names, ``files`` relative to the storage root that stay
   inside it and exist.  A message that fails any of these is *poison*: it is
   rejected without requeue (dead-lettered if the queue has a dead-letter
   exchange, by policy; dropped otherwise), an export complete ``Failure`` is
   published when its export task id is known, and the log says why.  It is
   never redelivered by us, so it cannot loop.
2. Recorded in ``export_requests`` (index database, durable) under its export
   task id, then submitted as one export job per destination to the export
   queue (``origin`` = ``export-request:<task id>``).  After a crash between
   the two, the redelivered message finds its jobs by that origin instead of
   submitting them again.
3. When every job has ended, the export complete (per-file statuses, the
   overall status) is recorded in the outbox and the request marked
   ``complete`` in one durable transaction; only then is the message acked.
   A redelivery of a request that is complete is acked at once: nothing is
   exported twice.

``export_requests.state``: ``exporting`` (jobs submitted or about to be) ->
``complete``; ``status`` is the export complete's.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from gateway.messaging import monai
from gateway.messaging.outbox import db_record

#: Seconds before a message we could not handle (our fault) goes back to its queue.
REQUEUE_DELAY = 10.0


# ---- transactions (database thread) ---------------------------------------------


def db_lookup(conn, key):
    row = conn.execute("SELECT key, state, jobs, status FROM export_requests WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    return {"key": row[0], "state": row[1], "jobs": json.loads(row[2] or "[]"), "status": row[3]}


def db_begin(conn, request: monai.ExportRequest, now):
    conn.execute(
        "INSERT OR IGNORE INTO export_requests (key, message_id, workflow_instance_id, correlation_id, request, "
        "state, created) VALUES (?, ?, ?, ?, ?, 'exporting', ?)",
        (request.key, request.message_id, request.workflow_instance_id, request.correlation_id,
         json.dumps({"files": list(request.files), "destinations": list(request.destinations)}), now))


def db_jobs(conn, key, jobs):
    conn.execute("UPDATE export_requests SET jobs = ? WHERE key = ?", (json.dumps(list(jobs)), key))


def db_complete(conn, request: monai.ExportRequest, message: monai.Message, status, now):
    """Record the export complete and settle the request, once."""
    db_begin(conn, request, now)
    cur = conn.execute("UPDATE export_requests SET state = 'complete', status = ?, completed = ? "
                       "WHERE key = ? AND state != 'complete'", (status, now, request.key))
    if cur.rowcount:
        db_record(conn, message, now)
    return bool(cur.rowcount)


# ---- files (disk pool) ------------------------------------------------------------


def check_files(names, root):
    """(name -> absolute path, name -> MONAI file status of the fault)."""
    paths, faults = {}, {}
    for name in names:
        path = monai.resolve_file(name, root)
        if path is None:
            faults[name] = monai.CONFIGURATION_ERROR
        elif not os.path.isfile(path):
            faults[name] = monai.DOWNLOAD_ERROR
        else:
            paths[name] = path
    return paths, faults


class ExportRequestHandler:
    """Called with each :class:`gateway.messaging.broker.Delivery`."""

    log = Logger()

    def __init__(self, settings, root, db, exports, destinations, outbox, reactor, pool):
        self.settings = settings
        self.root = root
        self.db = db
        self.exports = exports  # IExportQueue
        self.destinations = destinations  # IDestinations
        self.outbox = outbox
        self.reactor = reactor
        self.pool = pool
        self.inflight: dict[str, defer.Deferred] = {}
        self.handled = 0

    def __call__(self, delivery):
        d = defer.Deferred.fromCoroutine(self._handle(delivery))
        d.addErrback(self._trouble, delivery)
        return d

    def _trouble(self, failure, delivery):
        self.log.failure("export request {message_id}: could not be handled; back to its queue in "
                         "{delay:g} s", failure, message_id=delivery.message_id, delay=REQUEUE_DELAY)
        self.reactor.callLater(REQUEUE_DELAY, delivery.requeue)

    async def _handle(self, delivery):
        try:
            request = monai.parse_export_request(delivery.body, delivery.message_id)
            unknown = [d for d in request.destinations if d not in set(self.destinations.names())]
            if unknown:
                raise monai.PoisonMessage(f"unknown destination {unknown[0]!r} (not a [[destination]] name)",
                                          request, {f: monai.CONFIGURATION_ERROR for f in request.files})
        except monai.PoisonMessage as e:
            await self._poison(delivery, e)
            return
        key = request.key
        running = self.inflight.get(key)
        if running is not None:
            # The same task again (a redelivery while the first is still
            # exporting): settled when the first is.
            await _wait(running)
            self._duplicate(delivery, request, "it was being exported")
            delivery.ack()
            return
        mine = defer.Deferred()
        self.inflight[key] = mine
        try:
            await self._export(delivery, request)
        finally:
            del self.inflight[key]
            mine.callback(None)

    async def _export(self, delivery, request):
        key = request.key
        row = await self.db.run(db_lookup, key)
        if row is not None and row["state"] == "complete":
            self._duplicate(delivery, request, "it is complete already")
            delivery.ack()
            return
        origin = f"export-request:{key}"
        jobs = row["jobs"] if row is not None else []
        if not jobs:
            paths, faults = await deferToThreadPool(self.reactor, self.pool, check_files, request.files, self.root)
            if faults:
                name, status = next(iter(faults.items()))
                why = "is outside the storage root" if status == monai.CONFIGURATION_ERROR else "does not exist"
                statuses = {f: faults.get(f, monai.UNKNOWN) for f in request.files}
                raise_poison = monai.PoisonMessage(f"file {name!r} {why}"
                                                   + (f" (and {len(faults) - 1} more)" if len(faults) > 1 else ""),
                                                   request, statuses)
                await self._poison(delivery, raise_poison)
                return
            await self.db.run_durable(db_begin, request, self.reactor.seconds())
            jobs = await self.exports.find(origin)
            if not jobs:
                jobs = await self.exports.submit(list(request.destinations),
                                                 [paths[f] for f in request.files], origin)
            await self.db.run_durable(db_jobs, key, jobs)
        await defer.DeferredList([self.exports.wait(j) for j in jobs], consumeErrors=True)
        details = [await self.exports.job(j) for j in jobs]
        outcome = self._outcome(request, details)
        message = monai.export_complete(request, outcome, routing_key=self.settings.export_complete,
                                        now=self.reactor.seconds())
        await self.db.run_durable(db_complete, request, message, outcome.status, self.reactor.seconds())
        self.outbox.kick()
        delivery.ack()
        self.handled += 1
        failed = sum(1 for s in outcome.file_statuses.values() if s != monai.FILE_SUCCESS)
        (self.log.info if outcome.status == monai.SUCCESS else self.log.warn)(
            "export request {key} ({message_id}): {status}, {files} file(s) to {destinations}, {failed} failed",
            event="export_request", outcome="exported", key=request.key, message_id=delivery.message_id,
            status=outcome.status, reason=outcome.message, files=len(request.files), failed=failed,
            destinations=", ".join(request.destinations))

    def _outcome(self, request, jobs) -> monai.ExportOutcome:
        by_path = {}
        for name in request.files:
            path = monai.resolve_file(name, self.root)
            if path is not None:
                by_path[os.path.abspath(path)] = name
        per_destination, reasons = [], []
        for job in jobs:
            statuses = {name: monai.UNKNOWN for name in request.files}
            for f in (job or {}).get("file_statuses", []):
                name = by_path.get(f["path"])
                if name is None:
                    continue
                statuses[name] = monai.file_status(f["state"], f.get("reason"))
                if f["state"] != "sent" and f.get("reason"):
                    reasons.append(f"{name} to {job['destination']}: {f['reason']}")
            per_destination.append(statuses)
        file_statuses = monai.combine(per_destination)
        status = monai.overall_status(file_statuses.values())
        ok = sum(1 for s in file_statuses.values() if s == monai.FILE_SUCCESS)
        message = f"{ok} of {len(file_statuses)} file(s) exported to {', '.join(request.destinations)}"
        if reasons:
            message += "; " + "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
        return monai.ExportOutcome(status, message, file_statuses)

    def _duplicate(self, delivery, request, why):
        self.log.info("export request {key} ({message_id}) received again; not exported again: {why}",
                      event="export_request", outcome="duplicate", key=request.key,
                      message_id=delivery.message_id, why=why, status=None, reason=why, files=len(request.files))

    async def _poison(self, delivery, e: monai.PoisonMessage):
        task = e.task
        published = False
        if task is not None:
            row = await self.db.run(db_lookup, task.key)
            if row is None:
                statuses = e.file_statuses or {f: monai.UNKNOWN for f in task.files}
                outcome = monai.ExportOutcome(monai.FAILURE, f"export request rejected: {e.reason}", statuses)
                message = monai.export_complete(task, outcome, routing_key=self.settings.export_complete,
                                                now=self.reactor.seconds())
                published = await self.db.run_durable(db_complete, task, message, monai.FAILURE,
                                                       self.reactor.seconds())
                self.outbox.kick()
        self.log.warn("export request {message_id} on {queue} rejected: {reason}{answer}", event="export_request",
                      outcome="rejected", key=task.key if task else None, message_id=delivery.message_id,
                      queue=delivery.routing_key, reason=e.reason, status=monai.FAILURE if published else None,
                      files=len(task.files) if task else 0,
                      answer="; export complete Failure published" if published else
                      ("" if task is None else "; its task was answered before"))
        delivery.reject()


async def _wait(d):
    done = defer.Deferred()
    d.addBoth(lambda r: (done.callback(None), r)[1])
    await done

"""Export: durable jobs that send Part 10 files to configured destinations.

- :class:`~gateway.export.store.ExportStore` keeps jobs and per-file state
  durable, always off the reactor thread.
- :class:`ExportService` implements :class:`~gateway.interfaces.IExportQueue`:
  it runs jobs, at most ``[scu] max_associations`` associations at once over
  all destinations and at most one per destination (so a destination that is
  down never holds every slot), all files of a job over one association (a
  DIMSE destination) or one keep-alive connection (a DICOMweb destination,
  by STOW-RS: :mod:`gateway.export.dicomweb`).  Both kinds share the jobs,
  the retries and the per-file statuses; only the sending differs.

A job tries every file that has not been sent yet.  Files the destination
answered with a failure status, and files that could not be tried because
the association failed, are retried up to ``retries`` times, after
``retry_delay`` seconds, doubled each time.  Files that can never succeed
(not a Part 10 file, transfer syntax refused) fail at once.  At the end a job
is ``done`` (every file sent), ``partially_failed``, or ``failed`` (more than
half of its files failed).  States on the way: ``queued``, ``in_progress``,
``retrying`` (waiting for its next attempt).  A restart resumes every job
that was not finished.
"""

from __future__ import annotations

import os

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from gateway.export.destinations import Destinations
from gateway.export.dicomweb import StowClient
from gateway.export.scu import MAX_CONTEXTS, ContextNotAccepted, SCUError
from gateway.interfaces import IExportQueue, IReconfigurable
from gateway.part10 import read_meta
from gateway.export.store import DB_NAME, FINAL_STATES, ExportStore, job_outcome, status_ok

# ---- the queue and its scheduler ------------------------------------------


def describe_destination(d, scu) -> str:
    """Where a destination is and how we reach it, for the start-up line."""
    if d.dicomweb is not None:
        where = f"STOW-RS to {d.dicomweb}"
    else:
        where = f"C-STORE to {d.ae_title} at {d.host}:{d.port}"
    if d.tls or d.https:
        client = d.certificate or scu.certificate
        where += f" over TLS (client certificate {client})" if client else " over TLS (no client certificate)"
    return where


@implementer(IExportQueue, IReconfigurable)
class ExportService(Service):
    """Runs export jobs (the service "export"); see the module docstring for the rules."""

    log = Logger()
    name = "export"

    def __init__(self, config, reactor, read_pool, *, db_path=None, destinations=None, resume=True,
                 db_pool=None, reserve=None):
        self.config = config
        self.reactor = reactor
        self.read_pool = read_pool
        self.store = ExportStore(db_path or os.path.join(config.gateway.storage, DB_NAME), reactor, db_pool,
                                 durable=config.storage.fsync, reserve=reserve, url=config.index.url,
                                 namespace=config.index.schema)
        self.destinations = destinations or Destinations(config, reactor, read_pool)
        self.resume = resume
        self._ready: list[tuple[int, str]] = []  # (job id, destination), FIFO
        self._running: dict[str, int] = {}  # destination -> job id
        self._timers: dict[int, object] = {}  # job id -> DelayedCall (retry)
        self._running_d: dict[str, defer.Deferred] = {}  # destination -> the job's run
        self._assocs: dict[str, object] = {}  # destination -> its open association
        self._finished: dict[int, list[defer.Deferred]] = {}
        self._started: defer.Deferred | None = None
        self._start_error: BaseException | None = None
        self._stopping = False
        self._lease_loop = None
        self.max_running = 0  # the most associations we ever had at once

    # ---- service ----------------------------------------------------------

    def startService(self):
        super().startService()
        for d in self.config.destination:
            self.log.info("destination {destination}: {what}", event="destination.loaded", destination=d.name,
                          what=describe_destination(d, self.config.scu))
        self._stopping = False
        self._started = self.store.start()
        if self.resume:
            self._started.addCallback(lambda _: self._resume())
        if self.config.index.shared:
            # Nodes share the jobs: this one renews the leases of those it
            # holds and takes over those whose node stopped renewing them.
            self._lease_loop = LoopingCall(self._lease_beat)
            self._lease_loop.clock = self.reactor
            self._started.addCallback(self._start_leases)
        self._started.addErrback(self._start_failed)

    def _start_leases(self, result):
        if self.running and not self._lease_loop.running:
            self._lease_loop.start(self.config.cluster.lease / 3, now=False)  # errors are caught in the beat
        return result

    @defer.inlineCallbacks
    def _lease_beat(self):
        try:
            taken = yield self.store.renew_and_take(self.config.gateway.node, self.config.cluster.lease)
        except Exception as e:
            self.log.warn("export jobs: leases not renewed: {error}", error=e)
            return
        for job in taken:
            self.log.warn("export job {job} to {destination} taken over: its node stopped renewing its lease",
                          job=job["id"], destination=job["destination"])
            if job["state"] == "retrying" and job["next_attempt"]:
                self._schedule(job["id"], job["destination"], max(0.0, job["next_attempt"] - self.reactor.seconds()))
            else:
                self._ready.append((job["id"], job["destination"]))
        if taken:
            self._pump()

    def _start_failed(self, failure):
        self._start_error = failure.value
        self.log.error("export queue cannot use {path}: {error}", path=self.store.path, error=failure.value)

    @defer.inlineCallbacks
    def _resume(self):
        for job in (yield self.store.unfinished()):
            if job["state"] == "retrying" and job["next_attempt"]:
                self._schedule(job["id"], job["destination"], max(0.0, job["next_attempt"] - self.reactor.seconds()))
            else:
                if job["state"] == "in_progress":
                    self.log.info("export job {job} to {destination} was interrupted; resuming it",
                                  job=job["id"], destination=job["destination"])
                self._ready.append((job["id"], job["destination"]))
        self._pump()

    def stopService(self):
        if not self.running:
            return defer.succeed(None)
        super().stopService()
        self._stopping = True
        if self._lease_loop is not None and self._lease_loop.running:
            self._lease_loop.stop()
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        self._ready.clear()
        # Running jobs end their association now; their unsent files stay
        # pending and the job is resumed at the next start.
        for assoc in list(self._assocs.values()):
            assoc.abort("the gateway is stopping")
        running = list(self._running_d.values())
        d = self._when_started()
        d.addBoth(lambda _: defer.DeferredList(running))
        d.addBoth(lambda _: self.store.stop())
        return d

    def _when_started(self) -> defer.Deferred:
        d = defer.Deferred()
        if self._started is None:
            d.callback(None)
        else:
            self._started.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    def reconfigure(self, config):
        """SIGHUP: new destinations and [scu] settings apply to the next
        association; a job already sending keeps its association."""
        self.config = config
        self.store.db.reconfigure(config)
        if isinstance(self.destinations, Destinations):
            self.destinations.config = config
        self._pump()

    # ---- IExportQueue ---------------------------------------------------

    def submit(self, destinations, paths, origin):
        destinations = list(destinations)
        for name in destinations:
            self.destinations.get(name)  # KeyError for an unknown name
        paths = [os.path.abspath(p) for p in paths]
        return defer.Deferred.fromCoroutine(self._submit(destinations, paths, origin))

    async def _submit(self, destinations, paths, origin):
        await self._when_started()
        if self._start_error is not None:
            raise self._start_error
        ids = await self.store.add_jobs(destinations, paths, origin, self.reactor.seconds(),
                                        self.config.gateway.node, self.config.cluster.lease)
        for job_id, name in zip(ids, destinations):
            self.log.info("export job {job} to {destination}: {files} file(s) queued from {origin}",
                          event="export.job", job=job_id, destination=name, state="queued",
                          files=len(paths), done=0, failed=0, origin=origin)
            self._ready.append((job_id, name))
        self._pump()
        return ids

    def jobs(self, limit=100, offset=0, state=None):
        return self.store.jobs(limit, offset, state)

    def count(self, state=None):
        return self.store.count(state)

    def job(self, job_id):
        return self.store.job(job_id)

    def find(self, origin):
        return self._when_started().addCallback(lambda _: self.store.by_origin(origin))

    def wait(self, job_id) -> defer.Deferred:
        """Fires with the job's final state."""
        d = defer.Deferred()
        self._finished.setdefault(job_id, []).append(d)

        def check(job):
            # Finished before we asked: answer from the database.
            if job is not None and job["state"] in FINAL_STATES and not d.called:
                waiters = self._finished.get(job_id, [])
                if d in waiters:
                    waiters.remove(d)
                d.callback(job["state"])

        self._when_started().addCallback(lambda _: self.store.job(job_id)).addCallback(check)
        return d

    # ---- scheduling -----------------------------------------------------

    def _pump(self):
        if self._stopping:
            return
        limit = self.config.scu.max_associations
        i = 0
        while len(self._running) < limit and i < len(self._ready):
            job_id, name = self._ready[i]
            if name in self._running:
                i += 1
                continue
            del self._ready[i]
            self._running[name] = job_id
            self.max_running = max(self.max_running, len(self._running))
            d = defer.Deferred.fromCoroutine(self._run_job(job_id, name))
            d.addErrback(lambda f, j=job_id: self.log.failure("export job {job} crashed", f, job=j))
            d.addBoth(self._job_ended, name)
            if name in self._running:
                self._running_d[name] = d

    def _job_ended(self, _, name):
        self._running.pop(name, None)
        self._running_d.pop(name, None)
        self._pump()

    def _schedule(self, job_id, name, delay):
        def due():
            self._timers.pop(job_id, None)
            self._ready.append((job_id, name))
            self._pump()
        self._timers[job_id] = self.reactor.callLater(delay, due)

    # ---- one attempt of one job -------------------------------------------

    async def _run_job(self, job_id, name):
        store = self.store
        job = await store.job(job_id)
        if job is None or job["state"] in FINAL_STATES:
            return
        attempt = await store.claim(job_id, self.reactor.seconds(), self.config.gateway.node,
                                    self.config.cluster.lease)
        if attempt is None:
            return  # another node holds it
        files = await store.pending_files(job_id)
        if name not in self.destinations.names():
            for f in files:
                await self._file_result(job_id, name, f, "failed", None, f"destination {name!r} is no longer configured", attempt)
            await self._finish(job_id, name, attempt, "destination no longer configured")
            return

        # Headers first (in a thread): they give the presentation contexts
        # and the SOP Instance UIDs, and say which files cannot be sent at all.
        sendable = []
        for f in files:
            try:
                f["header"] = await deferToThreadPool(self.reactor, self.read_pool, read_meta, f["path"])
                sendable.append(f)
            except (OSError, ValueError) as e:
                await self._file_result(job_id, name, f, "failed", None, f"cannot read: {e}", attempt)

        def record(f, state, status, reason):
            return self._file_result(job_id, name, f, state, status, reason, attempt, f["header"][1])

        dest = self.config.destination_named(name)
        send = self._send_stow if dest is not None and dest.dicomweb is not None else self._send_dimse
        reason = await send(name, dest, sendable, record)
        await self._finish(job_id, name, attempt, reason)

    async def _send_dimse(self, name, dest, sendable, record):
        """C-STORE the files over one association, unless they need more
        presentation contexts than one association can carry: then one
        association per batch of contexts, one after the other.  Returns
        why the last attempt failed as a whole, or None."""
        contexts = list(dict.fromkeys((f["header"][0], f["header"][2]) for f in sendable))
        batches = [contexts[i:i + MAX_CONTEXTS] for i in range(0, len(contexts), MAX_CONTEXTS)]
        reason = None
        for n, batch in enumerate(batches):
            wanted = set(batch)
            files = [f for f in sendable if (f["header"][0], f["header"][2]) in wanted]
            try:
                assoc = await self.destinations.connect(name, batch)
            except SCUError as e:
                # The destination is not there: the rest waits for the next attempt.
                reason = str(e)
                later = set().union(*batches[n:])
                for f in sendable:
                    if (f["header"][0], f["header"][2]) in later:
                        await record(f, "retry", None, reason)
                break
            self._assocs[name] = assoc
            try:
                reason = await self._send_files(assoc, files, record) or reason
            finally:
                self._assocs.pop(name, None)
                await assoc.release()
            if self._stopping:
                break
        return reason

    async def _send_files(self, assoc, files, record):
        for i, f in enumerate(files):
            sop_class, sop_instance, ts, offset, size = f["header"]
            try:
                rsp = await assoc.store(f["path"], offset, size, sop_class, sop_instance, ts)
            except ContextNotAccepted as e:
                await record(f, "failed", None, str(e))
                continue
            except OSError as e:
                await record(f, "retry", None, f"cannot read: {e}")
                return f"cannot read {f['path']}"
            except SCUError as e:
                # The association is gone: this file and the rest wait for
                # the next attempt.
                for g in files[i:]:
                    await record(g, "retry", None, str(e))
                return str(e)
            status = rsp.status if rsp.status is not None else 0xFFFF
            if status_ok(status):
                await record(f, "sent", status, rsp.error_comment)
            else:
                why = f"destination answered 0x{status:04X}" + (f": {rsp.error_comment}" if rsp.error_comment else "")
                await record(f, "retry", status, why)
        return None

    async def _send_stow(self, name, dest, sendable, record):
        """POST the files to a DICOMweb destination (:mod:`gateway.export.dicomweb`)."""
        client = StowClient(dest, self.config, self.reactor, self.read_pool)
        self._assocs[name] = client  # stopService aborts it as it does an association
        try:
            return await client.send(sendable, record)
        finally:
            self._assocs.pop(name, None)

    async def _file_result(self, job_id, name, f, state, status, reason, attempt, sop_instance=None):
        retries = self.config.scu.retries
        # A file cut off by our own shutdown is not a failed attempt's end:
        # it stays pending for the next start.
        if state == "retry" and attempt > retries and not self._stopping:
            state = "failed"
        await self.store.set_file(job_id, f["seq"], state=state, status=status, reason=reason,
                                  attempts=f["attempts"] + 1, sop_instance_uid=sop_instance)
        level = self.log.info if state == "sent" else self.log.warn
        final = state in ("sent", "failed")
        level("export job {job} to {destination}: {path} {state}{detail}",
              event="export.file.finished" if final else "export.file", outcome=state, job=job_id, destination=name, path=f["path"], state=state,
              status=status, reason=reason, attempt=attempt, sop_instance_uid=sop_instance,
              detail=f" (status 0x{status:04X})" if status is not None and state == "sent"
              else (f": {reason}" if reason else ""))

    async def _finish(self, job_id, name, attempt, reason):
        counts = await self.store.counts(job_id)
        if counts["pending"] and attempt <= self.config.scu.retries and not self._stopping:
            delay = self.config.scu.retry_delay * (2 ** (attempt - 1))
            await self.store.set_job(job_id, self.reactor.seconds(), state="retrying", reason=reason,
                                     next_attempt=self.reactor.seconds() + delay)
            self.log.warn("export job {job} to {destination}: {pending} file(s) to retry in {delay:g} s "
                          "(attempt {attempt} of {attempts}){why}",
                          event="export.job", job=job_id, destination=name, state="retrying",
                          pending=counts["pending"], delay=delay, attempt=attempt, attempts=self.config.scu.retries + 1,
                          files=counts["files"], done=counts["done"], failed=counts["failed"],
                          why=f": {reason}" if reason else "")
            self._schedule(job_id, name, delay)
            return
        if counts["pending"] and self._stopping:
            return  # stays in progress; resumed at the next start
        state = job_outcome(counts["files"], counts["failed"])
        await self.store.set_job(job_id, self.reactor.seconds(), state=state, reason=reason)
        self.log.info("export job {job} to {destination}: {state}, {done} of {files} file(s) sent, {failed} failed",
                      event="export.job.finished", outcome=state, job=job_id, destination=name, state=state,
                      files=counts["files"], done=counts["done"], failed=counts["failed"])
        for d in self._finished.pop(job_id, []):
            d.callback(state)

"""Pipeline jobs: one per (closed payload, pipeline), run and retried.

A job is recorded in the database before it starts (state ``running``,
``attempts`` + 1), so a run is never repeated without being counted.  Each
pipeline runs at most ``concurrency`` jobs at a time.

- ``command``: spawned with ``reactor.spawnProcess`` (never blocking the
  reactor).  Placeholders ``{payload}``, ``{manifest}``, ``{output}``,
  ``{payload_id}``, ``{pipeline}``, ``{ae}`` in its arguments are replaced,
  and the environment names them too (``DICOMGW_*``, see README).  Exit
  status 0 is success; anything else, or running longer than ``timeout``
  seconds (the process gets SIGTERM, then SIGKILL 5 s later), is a failure.
- ``webhook``: the manifest is POSTed as JSON; a 2xx answer within
  ``timeout`` seconds is success.

A failure is retried ``retries`` times, ``backoff`` * 2^(n-1) seconds after
the n-th attempt, then the job is left ``failed`` with its reason (an
operator may run it again: :meth:`PipelineRunner.retry`).  After a
successful command, Part 10 files in its output directory become an export
job to the pipeline's ``export`` destinations (an :class:`IExportQueue`).
"""

from __future__ import annotations

import json
import os
import shutil

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredSemaphore, inlineCallbacks, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from gateway.interfaces import IPipelineJobs, JobNotFailed
from gateway.store import dialect
from gateway.workflow.payload_db import MANIFEST

KILL_GRACE = 5.0
TAIL = 2048


def _db_job(conn, job_id):
    r = conn.execute("SELECT j.*, p.ae AS ae, p.path AS path FROM jobs j JOIN payloads p ON p.id = j.payload "
                     "WHERE j.id = ?", (job_id,)).fetchone()
    return dict(r) if r is not None else None


def _db_start(conn, job_id, now, node="", lease=0.0):
    """Claim the job for this node (one attempt more), or None when another
    node (or an earlier call) has it.  The lease is renewed while it runs
    (gateway.workflow.cluster); should it expire, another node takes the
    job over."""
    row = conn.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, updated = ?, node = ?, "
                       "lease_until = ? WHERE id = ? AND state = 'pending' RETURNING attempts",
                       (now, node or None, dialect.db_now(conn) + lease, job_id)).fetchone()
    return None if row is None else row[0]


def _db_end(conn, job_id, state, reason, now, next_attempt, outputs, export_jobs, node="", attempt=None):
    """Record the attempt's outcome; False when the job is no longer this
    node's attempt (its lease expired and another node took it over)."""
    if node and attempt is not None:
        held = conn.execute("SELECT 1 FROM jobs WHERE id = ? AND node = ? AND attempts = ? AND state = 'running'",
                            (job_id, node, attempt)).fetchone()
        if held is None:
            return False
    conn.execute("UPDATE jobs SET state = ?, reason = ?, updated = ?, next_attempt = ?, outputs = ?, "
                 "export_jobs = ? WHERE id = ?",
                 (state, reason, now, next_attempt, outputs, json.dumps(list(export_jobs)), job_id))
    pid = conn.execute("SELECT payload FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
    states = [r[0] for r in conn.execute("SELECT state FROM jobs WHERE payload = ?", (pid,))]
    if all(s in ("done", "failed") for s in states):
        final = "done" if all(s == "done" for s in states) else "failed"
        conn.execute("UPDATE payloads SET state = ?, finished = ? WHERE id = ? AND state = 'closed'",
                     (final, now, pid))
    return True


def _db_retry(conn, payload_id, pipeline, now):
    """Make a failed job pending again, and its payload closed (no longer
    failed: the reclaimer and the API see it as in progress); None when
    there is no such job, else (job id, its state before, its job row)."""
    row = conn.execute("SELECT id, state FROM jobs WHERE payload = ? AND pipeline = ?",
                       (payload_id, pipeline)).fetchone()
    if row is None:
        return None
    job_id, state = row[0], row[1]
    if state == "failed":
        conn.execute("UPDATE jobs SET state = 'pending', next_attempt = ?, updated = ? WHERE id = ?",
                     (now, now, job_id))
        conn.execute("UPDATE payloads SET state = 'closed', finished = NULL WHERE id = ? AND state = 'failed'",
                     (payload_id,))
    job = conn.execute("SELECT payload, pipeline, state, attempts, reason FROM jobs WHERE id = ?",
                       (job_id,)).fetchone()
    return job_id, state, dict(job)


def _db_pending(conn):
    return [tuple(r) for r in conn.execute("SELECT id, next_attempt FROM jobs WHERE state = 'pending'")]


def _fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


def _dicom_files(directory):
    """Part 10 files (``DICM`` at offset 128) under ``directory``, sorted."""
    found = []
    for dirpath, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    head = f.read(132)
            except OSError:
                continue
            if len(head) == 132 and head[128:] == b"DICM":
                found.append(path)
    return sorted(found)


class _Process(ProcessProtocol):
    def __init__(self):
        self.ended = Deferred()
        self.tail = bytearray()

    def connectionMade(self):
        self.transport.closeStdin()

    def outReceived(self, data):
        self._keep(data)

    def errReceived(self, data):
        self._keep(data)

    def _keep(self, data):
        self.tail += data
        del self.tail[:-TAIL]

    def processEnded(self, reason):
        self.ended.callback(reason.value)


class _Discard(Protocol):
    """Reads a response body to its end and forgets it."""

    def __init__(self, done: Deferred):
        self.done = done

    def connectionLost(self, reason):
        self.done.callback(None)


@implementer(IBodyProducer)
class _Bytes:
    def __init__(self, data: bytes):
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self):
        pass

    def stopProducing(self):
        pass


@implementer(IPipelineJobs)
class PipelineRunner(Service):
    """Runs pipeline jobs (the service "pipelines"); its payload service
    hands it new jobs and passes on reloads.  Stopping it kills the
    programs that run (their jobs run again after the restart)."""

    log = Logger()
    name = "pipelines"

    def __init__(self, config, db, storage, reactor, export_queue=None):
        self.config = config
        self.db = db
        self.storage = storage
        self.reactor = reactor
        self.export_queue = export_queue
        self.semaphores = {p.name: DeferredSemaphore(p.concurrency) for p in config.pipeline}
        self.scheduled: dict[int, object] = {}
        self.jobs_running: set[int] = set()
        self.processes: set = set()
        self.stopped = False

    def _disk(self, f, *args):
        return deferToThreadPool(self.reactor, self.storage.pool, f, *args)

    def reconfigure(self, config):
        """Attempts that start from now on use the new pipeline settings."""
        self.config = config
        for p in config.pipeline:
            current = self.semaphores.get(p.name)
            if current is None or current.limit != p.concurrency:
                # Jobs running now release the semaphore they acquired.
                self.semaphores[p.name] = DeferredSemaphore(p.concurrency)

    def startService(self):
        super().startService()
        for p in self.config.pipeline:
            aes = [a.title for a in self.config.ae if p.name in a.pipelines]
            what = f"command {' '.join(p.command)}" if p.command else f"webhook {p.webhook}"
            self.log.info("pipeline {pipeline}: {what} (for AE titles {aes}; concurrency {concurrency}, timeout "
                          "{timeout:g} s, retries {retries}{export})", event="pipeline.loaded", pipeline=p.name,
                          what=what, aes=", ".join(aes) or "none", concurrency=p.concurrency, timeout=p.timeout,
                          retries=p.retries, export=f"; results to {', '.join(p.export)}" if p.export else "")

    def submit(self, job_ids):
        for job_id in job_ids:
            self._schedule(job_id, 0)

    def submit_due(self, jobs):
        """Schedule (job id, next attempt time) pairs (jobs taken over from another node)."""
        for job_id, next_attempt in jobs:
            self._schedule(job_id, max(0.0, (next_attempt or 0) - self.reactor.seconds()))

    @inlineCallbacks
    def retry(self, payload_id, pipeline):
        """IPipelineJobs: one more attempt of a failed job, now.  Its
        ``attempts`` go on counting; a failure of this attempt leaves it
        failed again (the retries of ``[pipeline.NAME]`` were spent)."""
        found = yield self.db.run_durable(_db_retry, payload_id, pipeline, self.reactor.seconds())
        if found is None:
            return None
        job_id, before, job = found
        if before != "failed":
            raise JobNotFailed(before)
        self.log.info("payload {payload}: pipeline {pipeline} runs again (attempt {attempt} next), "
                      "as asked", event="pipeline.retry", payload=payload_id, pipeline=pipeline, job=job_id,
                      attempt=job["attempts"] + 1)
        self.submit([job_id])
        return job

    @inlineCallbacks
    def recover(self):
        for job_id, next_attempt in (yield self.db.run(_db_pending)):
            self._schedule(job_id, max(0.0, (next_attempt or 0) - self.reactor.seconds()))

    def stopService(self):
        super().stopService()
        self.stop()

    def stop(self):
        self.stopped = True
        for call in self.scheduled.values():
            if call.active():
                call.cancel()
        self.scheduled.clear()
        for proc in list(self.processes):
            try:
                proc.transport.signalProcess("KILL")
            except Exception:
                pass

    def _schedule(self, job_id, delay):
        if self.stopped or job_id in self.scheduled or job_id in self.jobs_running:
            return
        self.scheduled[job_id] = self.reactor.callLater(delay, self._go, job_id)

    def _go(self, job_id):
        self.scheduled.pop(job_id, None)
        self.jobs_running.add(job_id)
        d = self._run(job_id)
        d.addErrback(lambda f: self.log.failure("job {job} could not run", f, job=job_id))

        def finished(retry_in):
            self.jobs_running.discard(job_id)
            if retry_in is not None:
                self._schedule(job_id, retry_in)

        d.addCallback(finished)

    @inlineCallbacks
    def _run(self, job_id):
        job = yield self.db.run(_db_job, job_id)
        if job is None or job["state"] != "pending":
            return
        pipeline = self.config.pipeline_named(job["pipeline"])
        if pipeline is None:
            yield self.db.run(_db_end, job_id, "failed", "the pipeline is no longer configured",
                              self.reactor.seconds(), None, 0, [])
            return
        semaphore = self.semaphores[pipeline.name]
        yield semaphore.acquire()
        try:
            if not self.stopped:
                return (yield self._attempt(job, pipeline))
        finally:
            semaphore.release()

    @inlineCallbacks
    def _attempt(self, job, pipeline):
        job_id = job["id"]
        attempt = yield self.db.run_durable(_db_start, job_id, self.reactor.seconds(), self.config.gateway.node,
                                            self.config.cluster.lease)
        if attempt is None:
            return
        started = self.reactor.seconds()
        payload_dir = job["path"]
        manifest = os.path.join(payload_dir, MANIFEST)
        output = os.path.join(self.storage.outputs_dir, job["payload"], pipeline.name)
        outputs, export_ids = 0, []
        try:
            yield self._disk(_fresh_dir, output)
            if pipeline.command:
                reason = yield self._command(pipeline, job, attempt, payload_dir, manifest, output)
            else:
                reason = yield self._webhook(pipeline, job, attempt, manifest)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
        if reason is None:
            files = yield self._disk(_dicom_files, output)
            outputs = len(files)
            if files and pipeline.export:
                try:
                    if self.export_queue is None:
                        raise RuntimeError("no export queue")
                    origin = f"pipeline:{pipeline.name} payload:{job['payload']}"
                    export_ids = list((yield self.export_queue.submit(list(pipeline.export), files, origin)))
                    self.log.info("payload {payload}: {files} result file(s) of {pipeline} queued for "
                                  "{destinations}", event="export.submitted", payload=job["payload"],
                                  pipeline=pipeline.name, job=job_id, destinations=list(pipeline.export),
                                  files=len(files), export_jobs=export_ids)
                except Exception as e:
                    reason = f"export: {type(e).__name__}: {e}"
        now = self.reactor.seconds()
        next_attempt = None
        if reason is None:
            outcome, state = "done", "done"
        elif attempt <= pipeline.retries:
            outcome, state = "retry", "pending"
            next_attempt = now + pipeline.backoff * 2 ** (attempt - 1)
        else:
            outcome, state = "failed", "failed"
        held = yield self.db.run_durable(_db_end, job_id, state, reason, now, next_attempt, outputs, export_ids,
                                         self.config.gateway.node, attempt)
        if not held:
            self.log.warn("payload {payload}: pipeline {pipeline} attempt {attempt} ended ({outcome}) after its "
                          "lease was lost; another node runs the job now", payload=job["payload"],
                          pipeline=pipeline.name, job=job_id, attempt=attempt, outcome=outcome)
            return None
        log = self.log.info if outcome == "done" else self.log.warn
        log("payload {payload}: pipeline {pipeline} attempt {attempt}: {outcome}{why}",
            event="pipeline.run", payload=job["payload"], pipeline=pipeline.name, job=job_id,
            attempt=attempt, outcome=outcome, reason=reason, why=f" ({reason})" if reason else "",
            duration=now - started, outputs=outputs)
        return next_attempt - now if outcome == "retry" else None

    def _command(self, pipeline, job, attempt, payload_dir, manifest, output):
        values = {"{payload}": payload_dir, "{manifest}": manifest, "{output}": output,
                  "{payload_id}": job["payload"], "{pipeline}": pipeline.name, "{ae}": job["ae"]}
        argv = []
        for arg in pipeline.command:
            for k, v in values.items():
                arg = arg.replace(k, v)
            argv.append(arg)
        executable = argv[0] if os.sep in argv[0] else shutil.which(argv[0])
        if executable is None:
            return succeed(f"{argv[0]}: not found")
        env = dict(os.environ)
        env.update({
            "DICOMGW_PAYLOAD_ID": job["payload"], "DICOMGW_PAYLOAD_DIR": payload_dir,
            "DICOMGW_MANIFEST": manifest, "DICOMGW_OUTPUT_DIR": output,
            "DICOMGW_PIPELINE": pipeline.name, "DICOMGW_AE": job["ae"], "DICOMGW_ATTEMPT": str(attempt),
        })
        proto = _Process()
        self.reactor.spawnProcess(proto, executable, argv, env=env)
        self.processes.add(proto)
        timed_out = []

        def kill(sig):
            timed_out.append(sig)
            try:
                proto.transport.signalProcess(sig)
            except Exception:
                return
            if sig == "TERM":
                calls.append(self.reactor.callLater(KILL_GRACE, kill, "KILL"))

        calls = [self.reactor.callLater(pipeline.timeout, kill, "TERM")]

        def ended(value):
            self.processes.discard(proto)
            for c in calls:
                if c.active():
                    c.cancel()
            if timed_out:
                return f"timed out after {pipeline.timeout:g} s"
            if isinstance(value, ProcessDone):
                return None
            tail = bytes(proto.tail).decode("utf-8", "replace").strip().splitlines()
            last = tail[-1][:200] if tail else ""
            code = getattr(value, "exitCode", None)
            what = f"exit status {code}" if code is not None else f"signal {getattr(value, 'signal', '?')}"
            return what + (f": {last}" if last else "")

        return proto.ended.addCallback(ended)

    @inlineCallbacks
    def _webhook(self, pipeline, job, attempt, manifest):
        body = yield self._disk(FilePath(manifest).getContent)
        agent = Agent(self.reactor)
        headers = Headers({b"Content-Type": [b"application/json"], b"User-Agent": [b"dicomgw"],
                           b"X-Dicomgw-Payload": [job["payload"].encode()],
                           b"X-Dicomgw-Pipeline": [pipeline.name.encode()],
                           b"X-Dicomgw-Attempt": [str(attempt).encode()]})
        d = agent.request(b"POST", pipeline.webhook.encode(), headers, _Bytes(body))
        d.addTimeout(pipeline.timeout, self.reactor)
        response = yield d
        rd = Deferred()
        response.deliverBody(_Discard(rd))
        rd.addTimeout(pipeline.timeout, self.reactor)
        yield rd
        if 200 <= response.code < 300:
            return None
        return f"HTTP {response.code}"


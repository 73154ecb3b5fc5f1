"""STOW-RS export: Part 10 files POSTed to a DICOMweb origin server.

A ``[[destination]]`` with ``dicomweb = "https://host/dicom-web"`` (instead
of ``ae_title``/``host``/``port``) is sent to over HTTP: the export service
(:mod:`gateway.export.jobs`) hands a job's files to a
:class:`StowClient`, which POSTs them to ``{dicomweb}/studies`` as
``multipart/related; type="application/dicom"``, several per request
(:data:`BATCH_FILES`, :data:`BATCH_BYTES`), the files as stored, streamed
from disk in :data:`CHUNK` pieces read in the disk pool (bounded memory
whatever the size).  Each file's outcome comes from the store response:
listed in ReferencedSOPSequence (0008,1199): sent; in FailedSOPSequence
(0008,1198): failed with its Failure Reason (0008,1197) as the status, tried
again as a DIMSE failure status is, except "SOP class" and "transfer syntax
not supported", which never change.  Any other answer (a 4xx or 5xx
without a store response, a refused or broken connection, a timeout) puts
every file of the request up for a retry.

``token_file`` adds ``Authorization: Bearer``; an https:// URL is verified
as a DIMSE destination with ``tls = true`` is
(:func:`gateway.net.tls.client_options`): against the destination's
``ca_certificates`` or ``[tls] ca_certificates`` (else the system's CAs),
with the destination's client certificate, else ``[scu] certificate``.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from gateway.config import ConfigError
from gateway.export.scu import describe_connect_failure
from gateway.net.tls import client_options

#: Files and bytes per request at most (a single bigger file goes alone).
BATCH_FILES = 50
BATCH_BYTES = 256 << 20
#: Bytes read from a file at a time.
CHUNK = 1 << 20
#: A store response longer than this is not read.
MAX_RESPONSE = 16 << 20
# Failure Reasons that a retry cannot change.
PERMANENT = (0x0122, 0xC122)


# ---- the request body ------------------------------------------------------------


class _Stopped(Exception):
    pass


@implementer(IBodyProducer)
class MultipartFiles:
    """An IBodyProducer: the multipart/related body of some Part 10 files,
    read from disk as the connection takes it (one :data:`CHUNK` in memory)."""

    def __init__(self, files: list[tuple[str, int]], reactor, pool, *, progress=None):
        self.files = files
        self.reactor = reactor
        self.pool = pool
        self.progress = progress  # called with each chunk's size as it goes out
        self.boundary = secrets.token_hex(16)
        self._paused: defer.Deferred | None = None
        self._stopped = False
        self._heads = [self._head(i, size) for i, (_path, size) in enumerate(files)]
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.length = sum(len(h) + size for h, (_p, size) in zip(self._heads, files)) + len(self._tail)

    @property
    def content_type(self) -> bytes:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'.encode()

    def _head(self, index: int, size: int) -> bytes:
        lead = "" if index == 0 else "\r\n"
        return (f"{lead}--{self.boundary}\r\nContent-Type: application/dicom\r\n"
                f"Content-Length: {size}\r\n\r\n").encode()

    def startProducing(self, consumer):
        # After stopProducing the returned Deferred must never fire
        # (IBodyProducer): the connection's owner has given up on the body.
        done = defer.Deferred()

        def finished(result):
            if not self._stopped:
                done.callback(None) if not isinstance(result, Failure) else done.errback(result)

        defer.Deferred.fromCoroutine(self._produce(consumer)).addBoth(finished)
        return done

    async def _produce(self, consumer):
        run = lambda f, *a: deferToThreadPool(self.reactor, self.pool, f, *a)  # noqa: E731
        for head, (path, size) in zip(self._heads, self.files):
            consumer.write(head)
            handle = await run(open, path, "rb")
            try:
                left = size
                while left:
                    while self._paused is not None:
                        await self._paused
                    if self._stopped:
                        raise _Stopped()
                    chunk = await run(handle.read, min(CHUNK, left))
                    if not chunk:
                        raise OSError(f"{path} is shorter than when it was queued")
                    if self._stopped:
                        raise _Stopped()
                    consumer.write(chunk)
                    left -= len(chunk)
                    if self.progress is not None:
                        self.progress(len(chunk))
            finally:
                await run(handle.close)
        consumer.write(self._tail)

    def pauseProducing(self):
        if self._paused is None:
            self._paused = defer.Deferred()

    def resumeProducing(self):
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self):
        self._stopped = True
        self.resumeProducing()


class _Collect(Protocol):
    """Gathers a response body up to :data:`MAX_RESPONSE` bytes."""

    def __init__(self, done: defer.Deferred):
        self.done = done
        self.data = bytearray()
        self.too_long = False

    def dataReceived(self, data):
        if len(self.data) + len(data) > MAX_RESPONSE:
            self.too_long = True
            self.transport.stopProducing()
            return
        self.data += data

    def connectionLost(self, reason):
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss) or self.too_long:
            self.done.callback(bytes(self.data))
        else:
            self.done.errback(reason)


# ---- the store response -------------------------------------------------------------


def _sequence(body: dict, tag: str) -> list[dict]:
    value = body.get(tag)
    if not isinstance(value, dict) or not isinstance(value.get("Value"), list):
        return []
    return [item for item in value["Value"] if isinstance(item, dict)]


def _first(item: dict, tag: str):
    value = item.get(tag)
    if isinstance(value, dict) and isinstance(value.get("Value"), list) and value["Value"]:
        return value["Value"][0]
    return None


def file_outcomes(status: int, body: bytes, sop_instances: list[str]) -> list[tuple[str, int | None, str]]:
    """(state, status, reason) per SOP Instance UID, in order, from one
    STOW-RS answer: state ``sent``, ``retry`` or ``failed``."""
    parsed: dict = {}
    if body:
        try:
            loaded = json.loads(body)
            parsed = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            parsed = {}
    stored = {_first(item, "00081155") for item in _sequence(parsed, "00081199")}
    failed = {}
    for item in _sequence(parsed, "00081198"):
        uid = _first(item, "00081155")
        reason = _first(item, "00081197")
        failed[uid] = reason if isinstance(reason, int) else None
    out = []
    for uid in sop_instances:
        if uid in failed:
            code = failed[uid]
            state = "failed" if code in PERMANENT else "retry"
            text = f"destination answered Failure Reason 0x{code:04X}" if code is not None \
                else "destination listed it as failed"
            out.append((state, code, text))
        elif uid in stored or (status == 200 and not failed):
            out.append(("sent", None, None))
        elif status in (200, 202, 409):
            out.append(("retry", None, f"HTTP {status}: the store response does not list it"))
        else:
            snippet = body[:200].decode("utf-8", "replace").strip()
            state = "failed" if status == 415 else "retry"
            out.append((state, None, f"HTTP {status}" + (f": {snippet}" if snippet else "")))
    return out


# ---- the client ------------------------------------------------------------------------


@implementer(IPolicyForHTTPS)
@dataclass
class _Policy:
    """IPolicyForHTTPS: the destination's TLS options for its one host."""

    options: object

    def creatorForNetloc(self, hostname, port):
        return self.options


class StowClient:
    """Sends one job's files to one DICOMweb destination (see the module docstring).

    ``destination`` is its ``[[destination]]`` table, ``config`` the gateway
    configuration (``[tls]``, ``[scu] connect_timeout``, ``[timeouts]
    dimse`` for each answer), ``pool`` the disk pool the files are read in.
    """

    log = Logger()

    def __init__(self, destination, config, reactor, pool):
        self.destination = destination
        self.config = config
        self.reactor = reactor
        self.pool = pool
        self._request: defer.Deferred | None = None
        self._aborted: str | None = None

    def abort(self, why: str) -> None:
        """Stop at once (the gateway is stopping): the request in flight is cancelled."""
        self._aborted = why
        self.abort_request()

    def abort_request(self):
        if self._request is not None and not self._request.called:
            self._request.cancel()

    async def send(self, files: list[dict], record) -> str | None:
        """POST ``files`` (the export service's rows, with ``header`` from
        :func:`gateway.part10.read_meta`) in batches; ``record(file, state,
        status, reason)`` is awaited for each.  Returns the last
        request-level failure reason, or None."""
        from twisted.web.client import Agent, HTTPConnectionPool

        kw = {"connectTimeout": self.config.scu.connect_timeout}
        if self.destination.https:
            try:
                options = await deferToThreadPool(self.reactor, self.pool, client_options, self.destination,
                                                  self.config)
            except Exception as e:
                reason = "TLS set-up failed: " + ("; ".join(e.problems) if isinstance(e, ConfigError) else str(e))
                for f in files:
                    await record(f, "retry", None, reason)
                return reason
            kw["contextFactory"] = _Policy(options)
        http_pool = HTTPConnectionPool(self.reactor, persistent=True)
        http_pool.maxPersistentPerHost = 1
        agent = Agent(self.reactor, pool=http_pool, **kw)
        reason = None
        try:
            for batch in _batches(files):
                if self._aborted:
                    for f in batch:
                        await record(f, "retry", None, self._aborted)
                    reason = self._aborted
                    continue
                reason = await self._post(agent, batch, record) or reason
        finally:
            await http_pool.closeCachedConnections()
        return reason

    async def _post(self, agent, batch: list[dict], record) -> str | None:
        from twisted.web.http_headers import Headers

        body = MultipartFiles([(f["path"], f["header"][3] + f["header"][4]) for f in batch], self.reactor,
                              self.pool)
        headers = Headers({b"Content-Type": [body.content_type], b"Accept": [b"application/dicom+json"],
                           b"User-Agent": [b"dicomgw"]})
        if self.destination.token:
            headers.addRawHeader(b"Authorization", f"Bearer {self.destination.token}".encode())
        url = f"{self.destination.dicomweb}/studies".encode()
        watch = _Progress(self.reactor, self.config.timeouts.dimse, self.abort_request)
        body.progress = watch.tick
        try:
            self._request = agent.request(b"POST", url, headers, body)
            response = await self._request
            watch.tick(0)
            done = defer.Deferred()
            response.deliverBody(_Collect(done))
            self._request = done
            data = await done
            outcomes = file_outcomes(response.code, data, [f["header"][1] for f in batch])
        except Exception as e:
            why = self._aborted or _describe(e, watch)
            for f in batch:
                await record(f, "retry", None, why)
            return why
        finally:
            watch.stop()
            self._request = None
        for f, (state, status, why) in zip(batch, outcomes):
            await record(f, state, status, why)
        if response.code not in (200, 202, 409):
            return outcomes[0][2]
        return None


class _Progress:
    """Cancels a request when nothing went out or came back for ``timeout`` s."""

    def __init__(self, clock, timeout, expire):
        self.clock = clock
        self.timeout = timeout
        self.expire = expire
        self.fired = False
        self.call = clock.callLater(timeout, self._fire)

    def tick(self, _n):
        if self.call is not None and self.call.active():
            self.call.reset(self.timeout)

    def _fire(self):
        self.fired = True
        self.call = None
        self.expire()

    def stop(self):
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None


def _describe(error: Exception, watch: _Progress) -> str:
    """Why a request failed, in the words the DIMSE export uses
    (:func:`gateway.export.scu.describe_connect_failure`)."""
    from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived

    if watch.fired:
        return f"timeout: no progress for {watch.timeout:g} s"
    if isinstance(error, (ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed)):
        inner = "; ".join(str(describe_connect_failure(r)) for r in error.reasons) or str(error)
        return f"connection failed: {inner}"
    return str(describe_connect_failure(Failure(error)))


def _batches(files: list[dict]):
    batch, size = [], 0
    for f in files:
        n = f["header"][3] + f["header"][4]
        if batch and (len(batch) >= BATCH_FILES or size + n > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += n
    if batch:
        yield batch

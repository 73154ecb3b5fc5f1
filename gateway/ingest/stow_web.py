"""STOW-RS on twisted.web, with the request body streamed, never buffered.

twisted.web's :class:`~twisted.web.http.Request` gathers the whole body in
``request.content`` (memory, or a temporary file past 100 KB) before any
resource runs.  A STOW-RS body may be gigabytes, so :class:`StowRequest`
overrides the two hooks the channel calls while the body arrives:

- ``gotLength`` runs once the headers are in, before any body byte: the
  request is authenticated, routed and checked here (token, method, path,
  AE title, media type, length, storage watermark) and either refused at
  once (the body is then read and dropped for a moment, so the client sees
  the answer, and the connection closed) or given a
  :class:`~gateway.ingest.stow_receiver.StowReceiver`;
- ``handleContentChunk`` hands each piece of the body to that receiver,
  which parses the multipart stream and writes each instance as it comes.

When the body is complete the channel calls ``requestReceived`` as for any
request, and :class:`StowResource` answers once every instance is durable.

``gotLength`` is told the length only, not the method or path (the channel
keeps those privately until the body is complete), so :class:`StowChannel`
notes each request's first line as ``lineReceived`` sees it: a public
method of the channel, and nothing private of Twisted is read.  HTTP/1.1
only; the site offers no HTTP/2.

Timeouts: the request line and headers must be complete within
``[dicomweb] timeout`` seconds of the first byte, and while the body
arrives, every such period must bring at least :data:`PROGRESS_BYTES` (or
the end of the body): a client that stalls or trickles is cut off.  Time
during which we stop reading because the disk is behind does not count.
Between requests the channel's own idle timeout (the same value) applies.
"""

from __future__ import annotations

import hmac
import io
import json
import re

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

from gateway.interfaces import IReconfigurable
from gateway.ingest.scp import AssociationInfo, new_association_id
from gateway.ingest.stow import Refusal, check_media_type, route, store_response
from gateway.ingest.stow_receiver import StowReceiver

#: While its body arrives, each ``timeout`` seconds must bring this much of it.
PROGRESS_BYTES = 64 << 10
#: After a refusal, how long the rest of the body is read and dropped before
#: the connection is closed (so the client reads the answer, not a reset).
LINGER = 2.0
DICOM_JSON = b"application/dicom+json"
_HOST = re.compile(rb"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


class _Watchdog:
    """Cuts off a body that stalls or trickles (see the module docstring)."""

    def __init__(self, clock, timeout: float, expire):
        self.clock = clock
        self.timeout = timeout
        self.expire = expire
        self.window = 0
        self.call = None
        self._arm()

    def _arm(self):
        self.window = 0
        self.call = self.clock.callLater(self.timeout, self._check)

    def received(self, n: int):
        self.window += n

    def _check(self):
        self.call = None
        if self.window < PROGRESS_BYTES:
            self.expire(f"less than {PROGRESS_BYTES} bytes of the body in {self.timeout:g} s")
        else:
            self._arm()

    def pause(self):
        self.stop()

    def resume(self):
        if self.call is None:
            self._arm()

    def stop(self):
        if self.call is not None:
            if self.call.active():
                self.call.cancel()
            self.call = None


class StowChannel(http.HTTPChannel):
    """HTTP/1.1 for STOW-RS: notes each request line; bounds the headers' time."""

    maxHeaders = 64
    totalHeadersSize = 16384
    log = Logger()

    request_line: bytes | None = None
    _header_deadline = None
    _saved_timeout = None

    def lineReceived(self, line):
        if self.request_line is None and line:
            self.request_line = line
            self._header_deadline = self.callLater(self.site.stow.settings.timeout, self._headers_too_slow)
        super().lineReceived(line)

    def allHeadersReceived(self):
        self._cancel_header_deadline()
        super().allHeadersReceived()

    def allContentReceived(self):
        self.request_line = None
        if not self.requests:
            return  # answered and finished before its body ended; the connection is closing
        if self._saved_timeout:
            # StowRequest turned the idle timeout off while the body came;
            # the channel turns it off and on again around the answer.
            self.setTimeout(self._saved_timeout)
            self._saved_timeout = None
        super().allContentReceived()

    def body_started(self):
        """The body is the request's business now: no idle timeout meanwhile."""
        self._saved_timeout = self.setTimeout(None)

    def _headers_too_slow(self):
        self._header_deadline = None
        self.log.info("DICOMweb client {peer}: request headers not complete within {timeout:g} s; cut off",
                      peer=_peer(self.transport), timeout=self.site.stow.settings.timeout)
        self.transport.abortConnection()

    def _cancel_header_deadline(self):
        if self._header_deadline is not None:
            if self._header_deadline.active():
                self._header_deadline.cancel()
            self._header_deadline = None

    def connectionMade(self):
        super().connectionMade()
        self.site.stow.channels.add(self)

    def connectionLost(self, reason):
        self._cancel_header_deadline()
        self.site.stow.channels.discard(self)
        super().connectionLost(reason)


def _quoted(text: str) -> str:
    """Text for a quoted-string of a header: printable ASCII, no quote or backslash."""
    return "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "?" for c in text)[:200]


def _peer(transport) -> str:
    try:
        address = transport.getPeer()
        return f"{address.host}:{address.port}"
    except Exception:
        return "?"


class StowRequest(server.Request):
    """A request whose body goes to a STOW-RS receiver as it arrives."""

    log = Logger()

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.receiver: StowReceiver | None = None
        self.refused = False  # answered before the end of the body
        self.body_done = False
        self.watchdog: _Watchdog | None = None
        self.received = 0
        self.limit = 0
        self.started = 0.0
        self.service: StowService | None = None  # set once the headers are in
        self.gone = False  # the connection is lost
        self._linger = None

    # ---- called by the channel -----------------------------------------------

    def gotLength(self, length):
        self.content = io.BytesIO()  # stays empty: the body goes to the receiver
        channel = self.channel
        service = self.service = channel.site.stow
        parts = (channel.request_line or b"").split(b" ")
        method, target, version = parts if len(parts) == 3 else (b"", b"/", b"HTTP/1.1")
        # What requestReceived sets at the end of the body is wanted now, to
        # answer before it.
        self.method, self.uri, self.clientproto = method, target, version
        self.path = target.split(b"?", 1)[0]
        self.started = service.reactor.seconds()
        channel.body_started()
        try:
            self.receiver = service.admit(self, method, target, length)
        except Refusal as e:
            self.refuse(e)
            return
        self.limit = service.settings.max_request_bytes
        self.watchdog = _Watchdog(service.reactor, service.settings.timeout, self._too_slow)

    def handleContentChunk(self, data):
        receiver = self.receiver
        if receiver is None or self.refused:
            return  # refused: read and dropped
        self.received += len(data)
        self.watchdog.received(len(data))
        if self.received > self.limit:
            receiver.fail(Refusal(413, f"the body is larger than {self.limit} bytes (dicomweb.max_request_bytes)"))
        else:
            receiver.feed(data)
        if receiver.error is not None:
            self._body_failed()

    def requestReceived(self, command, path, version):
        self.body_done = True
        if self.refused:
            if self.startedWriting:  # else the answer is on its way (see _body_failed)
                self._end_refused()
            return
        self.watchdog.stop()
        super().requestReceived(command, path, version)

    def connectionLost(self, reason):
        self.gone = True
        if self.watchdog is not None:
            self.watchdog.stop()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        if self.receiver is not None and not self.finished:
            self.receiver.abort(f"connection lost: {reason.getErrorMessage()}")
            self.service.request_ended(self, None)
        super().connectionLost(reason)

    # ---- for the receiver ---------------------------------------------------------

    def pause_reading(self):
        self.transport.pauseProducing()
        if self.watchdog is not None:
            self.watchdog.pause()

    def resume_reading(self):
        if self.gone:
            return
        self.transport.resumeProducing()
        if self.watchdog is not None and not self.body_done and not self.refused:
            self.watchdog.resume()

    # ---- answers -------------------------------------------------------------------

    def answer(self, status: int, payload: dict, *, dicom: bool = False, headers=None, close=False):
        """Write the whole answer: ``payload`` is a store response (DICOM
        JSON, ``dicom``) or ``{"error": why}`` (JSON)."""
        if self.gone or self.startedWriting:
            return
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.setResponseCode(status)
        self.setHeader(b"Content-Type", DICOM_JSON if dicom else b"application/json")
        self.setHeader(b"Content-Length", str(len(body)).encode())
        for name, value in (headers or {}).items():
            self.setHeader(name.encode(), value.encode("latin-1", "replace"))
        if close:
            self.setHeader(b"Connection", b"close")
        self.write(body)

    def refuse(self, error: Refusal):
        """Answer now, before (the rest of) the body; the connection closes."""
        self.refused = True
        self.requestHeaders.removeHeader(b"Expect")  # no "100 Continue" for a body we do not want
        self.channel.persistent = False
        self.answer(error.status, {"error": error.why}, headers=error.headers, close=True)
        self._start_linger()

    def _start_linger(self):
        if self.body_done:
            self._end_refused()
        else:
            self._linger = self.service.reactor.callLater(LINGER, self._end_refused)

    def _end_refused(self):
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        if not self.finished and not self.gone:
            self.finish()  # non-persistent: the channel closes the connection

    def _body_failed(self):
        """The body broke half-way (400, 413): answer with what was stored."""
        if self.refused:
            return
        self.refused = True
        self.watchdog.stop()
        self.requestHeaders.removeHeader(b"Expect")
        self.channel.persistent = False
        d = self.receiver.close()
        d.addCallback(self._answer_result, close=True)

    def _too_slow(self, why: str):
        self.log.info("STOW-RS from {peer}: {why}; cut off", peer=_peer(self.transport), why=why)
        if self.receiver is not None:
            self.receiver.abort(f"cut off: {why}")
            self.service.request_ended(self, None)
            self.receiver = None
        self.transport.abortConnection()

    def complete(self):
        """The body is complete: answer once every instance is durable."""
        d = self.receiver.close()
        d.addCallback(self._answer_result)
        return server.NOT_DONE_YET

    def _answer_result(self, result, close=False):
        service = self.service
        service.request_ended(self, result)
        if self.gone:
            return
        status = result.status
        if result.error is not None and not result.outcomes:
            self.answer(status, {"error": result.error.why}, close=close)
        else:
            # Why the request as a whole failed goes in a Warning header
            # (PS3.18 allows one), the store response lists what was stored.
            why = result.error.why if result.error is not None else None
            self.answer(status, store_response(result, service.base_url(self)), dicom=True, close=close,
                        headers={"Warning": f'299 dicomgw "{_quoted(why)}"'} if why else None)
        if close:
            self._start_linger()
        else:
            self.finish()


class StowResource(Resource):
    """The one resource: every request that reaches it was admitted by
    :meth:`StowService.admit` (a POST to a STOW-RS path) and has its body
    stored already."""

    isLeaf = True

    def render_POST(self, request):
        return request.complete()


class StowSite(server.Site):
    protocol = StowChannel

    noisy = False

    def __init__(self, stow: "StowService", reactor):
        super().__init__(StowResource(), requestFactory=StowRequest, reactor=reactor,
                         timeout=stow.settings.timeout)
        self.stow = stow

    def buildProtocol(self, addr):
        self.timeOut = self.stow.settings.timeout  # a reload's value, for new connections
        return super().buildProtocol(addr)

    def log(self, request):
        pass  # each request is logged once, with its outcome, by StowService


@implementer(IReconfigurable)
class StowService(Service):
    """What every STOW-RS request shares: the configuration and the ingest
    seam (:class:`gateway.interfaces.IIngest`: storage, watermark, observers).
    Stopping it closes the connections that are still open (the listener,
    stopped first, takes no new ones).  The service "stow"; ``tls`` says its
    listener is TLS (the scheme of the Retrieve URLs, ``tls_only`` AE titles)."""

    log = Logger()
    name = "stow"

    def __init__(self, config, ingest, reactor, *, tls: bool = False):
        self.config = config
        self.ingest = ingest
        self.reactor = reactor
        self.tls = tls
        self.active: set[StowRequest] = set()
        self.channels: set[StowChannel] = set()

    def stopService(self):
        super().stopService()
        for channel in list(self.channels):
            channel.transport.abortConnection()

    @property
    def settings(self):
        return self.config.dicomweb

    def reconfigure(self, config):
        """New requests use ``config`` (token, AE titles, limits); the
        listener and its TLS stay as they were started (their options say
        so: a reload reports them as needing a restart)."""
        self.config = config

    def site(self) -> StowSite:
        return StowSite(self, self.reactor)

    # ---- admission --------------------------------------------------------------

    def admit(self, request: StowRequest, method: bytes, target: bytes, length) -> StowReceiver:
        """A receiver for the request's body, or :class:`Refusal`."""
        settings = self.settings
        headers = request.requestHeaders
        if settings.token:
            given = (headers.getRawHeaders(b"Authorization") or [b""])[0]
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), settings.token.encode()):
                raise Refusal(401, "a valid bearer token is required (Authorization: Bearer <token>)",
                              {"WWW-Authenticate": 'Bearer realm="dicomgw"'})
        if method != b"POST":
            raise Refusal(405, "STOW-RS takes POST only", {"Allow": "POST"})
        where = route(target)
        ae = self.config.ae_named(where.ae) if where.ae else self.config.dicomweb_ae()
        if ae is None or (ae.tls_only and not self.tls):
            raise Refusal(404, f"no AE title {(where.ae or settings.ae)[:64]!r} here")
        boundary = check_media_type((headers.getRawHeaders(b"Content-Type") or [None])[0])
        if length is not None and length > settings.max_request_bytes:
            raise Refusal(413, f"the body ({length} bytes) is larger than {settings.max_request_bytes} "
                               "bytes (dicomweb.max_request_bytes)")
        if self.ingest.congestion:
            raise Refusal(503, f"storage is congested: {self.ingest.congestion}", {"Retry-After": "60"})
        if self.ingest.index_trouble:
            raise Refusal(503, f"the index cannot be reached: {self.ingest.index_trouble}", {"Retry-After": "30"})
        info = AssociationInfo(new_association_id("w"), "", ae.title, _peer(request.transport),
                               self.reactor.seconds())
        receiver = StowReceiver(self.ingest, ae, where, boundary, info, max_parts=settings.max_parts,
                                pause=request.pause_reading, resume=request.resume_reading,
                                reactor=self.reactor)
        self.active.add(request)
        return receiver

    def base_url(self, request: StowRequest) -> str:
        """scheme://host/dicomweb[/vae/AE] of the request, for Retrieve URLs."""
        host = (request.requestHeaders.getRawHeaders(b"Host") or [b""])[0]
        if not _HOST.match(host):
            address = request.getHost()
            host = f"{address.host}:{address.port}".encode()
        scheme = "https" if (self.tls or request.isSecure()) else "http"
        return f"{scheme}://{host.decode('ascii')}{request.receiver.route.prefix}"

    def request_ended(self, request: StowRequest, result) -> None:
        """Log the request once, as one association (``association.closed``)."""
        if request not in self.active:
            return
        self.active.discard(request)
        receiver = request.receiver
        info = receiver.info
        outcomes = receiver.outcomes
        stored = sum(1 for o in outcomes if o.stored)
        failed = sum(1 for o in outcomes if not o.ok)
        duration = self.reactor.seconds() - request.started
        if result is None:
            status, outcome, kind = None, receiver.error.why if receiver.error else "connection lost", "lost"
        else:
            status = result.status
            outcome = f"answered {status}" + (f": {result.error.why}" if result.error is not None else "")
            kind = "released"
        self.log.info(
            "STOW-RS {association} -> {called_ae} from {peer}: {instances} instance(s), {bytes} bytes, "
            "{failures} failure(s), {ignored} ignored in {duration:.3f} s; {outcome}",
            event="association.closed", service="stow-rs", result=kind, http_status=status,
            association=info.id, calling_ae="-", called_ae=info.called_ae, peer=info.peer,
            instances=stored, bytes=receiver.stored_bytes, failures=failed, ignored=receiver.ignored,
            duration=duration, outcome=outcome, tls=self.tls or request.isSecure(), tls_subject=None,
        )

"""The requestor side: SCU associations to remote SCPs (C-ECHO, C-STORE).

:class:`SCUAssociation` is the service user of one outgoing association,
driven by :class:`gateway.net.protocol.DicomProtocol` with
``requestor=True``.  :func:`connect` opens the transport (plain TCP, or TLS
verified with service-identity through ``optionsForClientTLS``) and fires
once the association is accepted.  Every failure is an :class:`SCUError`
whose text says what went wrong: refused, rejected (with result, source and
reason), TLS failure, timeout, abort.

Data sets are streamed from disk: a Part 10 file is read in bounded chunks in
a thread pool, cut into P-DATA-TF PDUs that respect the peer's maximum length,
and the next chunk is read only when the transport is not asking us to pause
(we register as its streaming producer).

Timeouts: the connect timeout (endpoint), the A-ASSOCIATE response and
A-RELEASE response timeout (``artim``: PS3.8 gives the requestor no timer
there, so we keep our own), and the DIMSE timeout (no byte from the peer for
``dimse`` seconds while we wait for a response) in the Protocol.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from gateway import IMPLEMENTATION_CLASS_UID
from gateway.dimse import commands as C
from gateway.dimse.message import CONTROL_LAST, pdv_data_limit
from gateway.dimse.sop import IMPLICIT_VR_LITTLE_ENDIAN, VERIFICATION
from gateway.dimse.user import DIMSEUser
from gateway.net.protocol import DicomProtocol
from gateway.net.tls import DicomClientTLSEndpoint
from gateway import ul as P

# Presentation contexts one A-ASSOCIATE-RQ may carry (odd ids 1..255).
MAX_CONTEXTS = 128
# Bytes read from disk at a time while streaming a data set.
READ_CHUNK = 1 << 20

_RESULT = {P.RJ_PERMANENT: "permanent", P.RJ_TRANSIENT: "transient"}
_SOURCE = {
    P.RJ_SOURCE_USER: "service-user",
    P.RJ_SOURCE_ACSE: "service-provider (ACSE)",
    P.RJ_SOURCE_PRESENTATION: "service-provider (presentation)",
}
_USER_REASON = {
    P.RJ_USER_NO_REASON: "no reason given",
    P.RJ_USER_APP_CONTEXT_NOT_SUPPORTED: "application context name not supported",
    P.RJ_USER_CALLING_AE_NOT_RECOGNIZED: "calling AE title not recognized",
    P.RJ_USER_CALLED_AE_NOT_RECOGNIZED: "called AE title not recognized",
}
_ACSE_REASON = {
    P.RJ_ACSE_NO_REASON: "no reason given",
    P.RJ_ACSE_PROTOCOL_VERSION_NOT_SUPPORTED: "protocol version not supported",
}
_PRES_REASON = {
    P.RJ_PRES_TEMPORARY_CONGESTION: "temporary congestion",
    P.RJ_PRES_LOCAL_LIMIT_EXCEEDED: "local limit exceeded",
}
PC_RESULT_TEXT = {
    P.PC_USER_REJECTION: "user rejection",
    P.PC_NO_REASON: "no reason",
    P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED: "abstract syntax not supported",
    P.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED: "transfer syntax not supported",
}


class SCUError(Exception):
    """An outgoing association failed; ``str()`` says why, for people."""

    kind = "error"


class ConnectFailed(SCUError):
    kind = "refused"


class SCUTimeout(SCUError):
    kind = "timeout"


class TLSFailed(SCUError):
    kind = "tls"


class AssociationRejected(SCUError):
    kind = "rejected"

    def __init__(self, rj: P.AssociateRJ):
        self.result, self.source, self.reason = rj.result, rj.source, rj.reason
        if rj.source == P.RJ_SOURCE_USER:
            text = _USER_REASON.get(rj.reason, "unknown reason")
        elif rj.source == P.RJ_SOURCE_ACSE:
            text = _ACSE_REASON.get(rj.reason, "unknown reason")
        else:
            text = _PRES_REASON.get(rj.reason, "unknown reason")
        super().__init__(
            f"association rejected: result {rj.result} ({_RESULT.get(rj.result, '?')}), "
            f"source {rj.source} ({_SOURCE.get(rj.source, '?')}), reason {rj.reason} ({text})"
        )


class AssociationLost(SCUError):
    """Aborted (by the peer or by us) or the connection closed."""

    kind = "aborted"


class ContextNotAccepted(SCUError):
    """The destination did not accept a presentation context we need."""

    kind = "not-accepted"


def describe_connect_failure(failure) -> SCUError:
    """Turn what the endpoint or the connection failed with into an SCUError."""
    e = failure.value
    if isinstance(e, SCUError):
        return e
    if isinstance(e, (error.TimeoutError, defer.TimeoutError)):
        return SCUTimeout(f"connect timed out: {e}")
    if isinstance(e, error.ConnectionRefusedError):
        return ConnectFailed("connection refused")
    if isinstance(e, error.DNSLookupError):
        return ConnectFailed(f"host not found: {e}")
    if _is_tls_error(e):
        return TLSFailed(f"TLS failure: {_tls_text(e)}")
    if isinstance(e, error.ConnectError):
        return ConnectFailed(f"cannot connect: {e}")
    return SCUError(f"{type(e).__name__}: {e}")


def _is_tls_error(e) -> bool:
    from OpenSSL import SSL
    from service_identity.exceptions import CertificateError, VerificationError

    return isinstance(e, (SSL.Error, VerificationError, CertificateError))


def _tls_text(e, verify_error: str | None = None) -> str:
    """A TLS failure in words: the peer's certificate not naming the host we
    called, OpenSSL's reasons, and why the certificate did not verify."""
    from service_identity.exceptions import VerificationError

    if isinstance(e, VerificationError):
        names = []
        for mismatch in e.errors:
            wanted = mismatch.mismatched_id
            names.append(str(getattr(wanted, "hostname", None) or getattr(wanted, "ip", None) or wanted))
        return f"the peer's certificate is not for {', '.join(names)} (host name or IP address mismatch)"
    args = getattr(e, "args", ())
    text = str(e) or type(e).__name__
    if args and isinstance(args[0], list):
        parts = [item[2] for item in args[0] if isinstance(item, tuple) and len(item) == 3]
        text = "; ".join(parts) or text
    if verify_error and "certificate verify failed" in text:
        return f"{text}: {verify_error}"
    return text


@dataclass(frozen=True)
class Peer:
    """Where to connect and whom to call."""

    host: str
    port: int
    called_ae: str
    calling_ae: str
    name: str = ""


@implementer(IPushProducer)
class SCUAssociation(DIMSEUser):
    """The service user of one outgoing association (an IAssociationUser).

    ``contexts`` is a sequence of (abstract syntax, transfer syntax) pairs;
    each becomes its own presentation context proposing exactly that one
    transfer syntax, so nothing the peer accepts needs converting.
    """

    log = Logger()

    def __init__(self, peer: Peer, contexts, reactor, read_pool, *, max_pdu_length: int,
                 implementation_version_name: str, artim_timeout: float):
        contexts = list(dict.fromkeys(contexts))
        if not contexts or len(contexts) > MAX_CONTEXTS:
            raise ValueError(f"{len(contexts)} presentation contexts (1..{MAX_CONTEXTS} allowed)")
        self.proposed = {2 * i + 1: pair for i, pair in enumerate(contexts)}
        super().__init__(self.proposed)
        self.peer = peer
        self.reactor = reactor
        self.read_pool = read_pool
        self.max_pdu_length = max_pdu_length
        self.implementation_version_name = implementation_version_name
        self.artim_timeout = artim_timeout
        self.accepted: dict[tuple[str, str], int] = {}
        self.refused: dict[tuple[str, str], int] = {}  # pair -> PC result
        self.established: defer.Deferred = defer.Deferred()
        self._ids = itertools.count(1)
        self._waiting: dict[int, defer.Deferred] = {}  # message id -> response
        self._release: defer.Deferred | None = None
        self._timer = None
        self._sending = False
        self._paused: defer.Deferred | None = None
        self._error: SCUError | None = None
        self.closed_d: defer.Deferred = defer.Deferred()

    # ---- driven by DicomProtocol -------------------------------------------

    def association_request(self) -> P.AssociateRQ:
        self._start_timer("no A-ASSOCIATE response")
        return P.AssociateRQ(
            called_ae=self.peer.called_ae,
            calling_ae=self.peer.calling_ae,
            presentation_contexts=tuple(
                P.PresentationContextRQ(cid, abstract, (ts,))
                for cid, (abstract, ts) in self.proposed.items()
            ),
            user_information=P.UserInformation(
                max_length=self.max_pdu_length,
                implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                implementation_version_name=self.implementation_version_name,
            ),
        )

    def associate_accepted(self, ac: P.AssociateAC):
        self._stop_timer()
        for pc in ac.presentation_contexts:
            pair = self.proposed.get(pc.id)
            if pair is None:
                continue
            # We proposed one transfer syntax per context: anything else
            # accepted would be a peer error, and not what the file holds.
            if pc.result == P.PC_ACCEPTANCE and pc.transfer_syntax == pair[1]:
                self.accepted[pair] = pc.id
            else:
                self.refused[pair] = pc.result if pc.result != P.PC_ACCEPTANCE else P.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED
        self.provider.register_producer(self)
        self.established.callback(self)

    def associate_rejected(self, rj: P.AssociateRJ):
        self._stop_timer()
        self._fail(AssociationRejected(rj))

    def command_received(self, cmd: C.Command, context_id: int):
        # A data set after a response is not something C-ECHO or C-STORE
        # have: the assembler keeps the framing, and data_received ignores it.
        if not cmd.is_response:
            # We provide no service on our own associations: refuse on the
            # context the request came on (a data set that follows is dropped).
            rsp = C.failure_response(cmd, C.UNRECOGNIZED_OPERATION)
            if rsp is not None:
                self.send_command(context_id, rsp)
            return
        if cmd.status is not None and cmd.status in (C.PENDING, C.PENDING_WARNING):
            return
        d = self._waiting.pop(cmd.message_id_being_responded_to, None)
        if d is None:
            self.dimse_error(f"response to message {cmd.message_id_being_responded_to}, which we never sent")
            return
        d.callback(cmd)

    # release_indication: the acceptor asking to release is unusual but legal;
    # DIMSEUser agrees, and requests still outstanding die with the association.

    def release_confirmation(self):
        self._stop_timer()
        d, self._release = self._release, None
        if d is not None:
            d.callback(None)

    def aborted(self, indication):
        if self.provider.closed:
            return  # the connection went away: closed() knows why (TLS...)
        if indication.local:
            why = f"aborted by us: {indication.detail or 'protocol error'}"
        elif indication.provider:
            why = f"connection lost: {indication.detail or 'provider abort'}"
        else:
            why = f"aborted by the peer (source {indication.source}, reason {indication.reason})"
        self._fail(AssociationLost(why))

    def closed(self, reason):
        self._stop_timer()
        self._resume()
        e = reason.value if reason is not None else None
        if _is_tls_error(e):
            err = TLSFailed(f"TLS failure: {_tls_text(e, self.provider.peer_verify_error())}")
        elif self.provider.disconnect_reason:
            err = AssociationLost(self.provider.disconnect_reason)
        else:
            err = AssociationLost("connection closed by the peer")
        self._fail(err)
        if not self.closed_d.called:
            self.closed_d.callback(None)

    def owes_response(self) -> bool:
        # While we stream a data set the peer has nothing to say.
        return self._sending

    # ---- producer (transport backpressure) --------------------------------

    def pauseProducing(self):
        if self._paused is None:
            self._paused = defer.Deferred()

    def resumeProducing(self):
        self._resume()

    def stopProducing(self):
        self._resume()

    def _resume(self):
        d, self._paused = self._paused, None
        if d is not None:
            d.callback(None)

    # ---- services ---------------------------------------------------------

    def context_for(self, abstract: str, ts: str) -> int:
        cid = self.accepted.get((abstract, ts))
        if cid is None:
            result = self.refused.get((abstract, ts), P.PC_NO_REASON)
            raise ContextNotAccepted(
                f"destination did not accept {abstract} in transfer syntax {ts}: "
                f"{PC_RESULT_TEXT.get(result, f'result {result}')}"
            )
        return cid

    def echo(self) -> defer.Deferred:
        """C-ECHO; fires with the response status."""
        try:
            cid = self.context_for(VERIFICATION, _ts_of(self.proposed, VERIFICATION))
        except SCUError as e:
            return defer.fail(e)
        mid = self._next_id()
        d = self._expect(mid)
        self.send_command(cid, C.c_echo_rq(mid))
        return d.addCallback(lambda rsp: rsp.status)

    @defer.inlineCallbacks
    def store(self, path: str, offset: int, size: int, sop_class: str, sop_instance: str, ts: str):
        """C-STORE the data set at ``path[offset:offset+size]``; fires with
        the response Command (its ``status`` and ``error_comment``)."""
        cid = self.context_for(sop_class, ts)
        self._check()
        mid = self._next_id()
        d = self._expect(mid)
        self.send_command(cid, C.c_store_rq(mid, sop_class, sop_instance))
        limit = pdv_data_limit(self.provider.peer_max_pdu)
        chunk = limit * max(1, READ_CHUNK // limit)
        fd = yield deferToThreadPool(self.reactor, self.read_pool, os.open, path, os.O_RDONLY)
        self._sending = True
        try:
            pos, end = offset, offset + size
            while True:
                want = min(chunk, end - pos)
                data = yield deferToThreadPool(self.reactor, self.read_pool, os.pread, fd, want, pos)
                if len(data) != want:
                    raise OSError(f"{path}: file shrank while being sent")
                pos += want
                self._check()
                self._send_data(cid, data, limit, last=pos >= end)
                if pos >= end:
                    break
                while self._paused is not None:
                    yield self._paused
                    self._check()
        except BaseException:
            if not d.called:
                # The message is incomplete: the association cannot go on.
                self.abort("could not finish sending a data set")
            d.addErrback(lambda _: None)  # the error we raise says it all
            raise
        finally:
            self._sending = False
            yield deferToThreadPool(self.reactor, self.read_pool, os.close, fd)
        rsp = yield d
        return rsp

    def release(self) -> defer.Deferred:
        """A-RELEASE; fires once the peer confirmed (or the link went away)."""
        if self.provider is None or not self.provider.can_request_release:
            return defer.succeed(None)
        self._release = defer.Deferred()
        self._start_timer("no A-RELEASE response")
        self.provider.release_request()
        return self._release

    def abort(self, why: str = "aborted by the user"):
        if self.provider is not None:
            self.provider.abort(why=why)

    # ---- helpers -----------------------------------------------------------

    def _next_id(self) -> int:
        mid = next(self._ids)
        if mid > 0xFFFF:
            self._ids = itertools.count(2)
            mid = 1
        return mid

    def _expect(self, mid) -> defer.Deferred:
        d = defer.Deferred()
        self._waiting[mid] = d
        return d

    def _check(self):
        if self._error is not None:
            raise self._error

    def _send_data(self, cid, data: bytes, limit: int, last: bool):
        view = memoryview(data)
        size = len(view)
        start = 0
        send = self.provider.send_pdata
        while True:
            stop = start + limit
            if stop >= size:
                send(P.encode_pdata(cid, CONTROL_LAST if last else 0, view[start:]))
                return
            send(P.encode_pdata(cid, 0, view[start:stop]))
            start = stop

    def _start_timer(self, what):
        self._stop_timer()
        self._timer = self.reactor.callLater(self.artim_timeout, self._expired, what)

    def _stop_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self, what):
        self._timer = None
        err = SCUTimeout(f"timeout: {what} within {self.artim_timeout:g} s")
        self._fail(err)
        if self.provider is not None:
            self.provider.abort(why=str(err), now=True)

    def dimse_error(self, detail):
        self.log.warn("association to {destination}: {detail}; aborting",
                      destination=self.peer.name or self.peer.called_ae, detail=detail)
        self._fail(AssociationLost(f"aborted by us: {detail}"))
        super().dimse_error(detail)

    def _fail(self, err: SCUError):
        if self._error is None:
            self._error = err
        if not self.established.called:
            self.established.errback(err)
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(err)
        d, self._release = self._release, None
        if d is not None:
            d.callback(None)  # released or not, the association is gone


def _ts_of(proposed, abstract) -> str:
    for a, ts in proposed.values():
        if a == abstract:
            return ts
    return ""


def verification_contexts():
    return [(VERIFICATION, IMPLICIT_VR_LITTLE_ENDIAN)]


def connect(reactor, peer: Peer, contexts, *, read_pool, max_pdu_length: int,
            implementation_version_name: str, connect_timeout: float, artim_timeout: float,
            dimse_timeout: float, tls_options=None) -> defer.Deferred:
    """Open an association; fires with the established :class:`SCUAssociation`.

    ``tls_options`` is an ``IOpenSSLClientConnectionCreator`` (from
    ``optionsForClientTLS``) or None for plain TCP.  Fails with an
    :class:`SCUError`.
    """
    user = SCUAssociation(peer, contexts, reactor, read_pool, max_pdu_length=max_pdu_length,
                          implementation_version_name=implementation_version_name,
                          artim_timeout=artim_timeout)
    protocol = DicomProtocol(user, reactor, requestor=True, max_pdu_length=max_pdu_length,
                             artim_timeout=artim_timeout, dimse_timeout=dimse_timeout)
    endpoint = HostnameEndpoint(reactor, peer.host, peer.port, timeout=connect_timeout)
    if tls_options is not None:
        endpoint = DicomClientTLSEndpoint(tls_options, endpoint)
    d = connectProtocol(endpoint, protocol)

    def connected(_):
        return user.established

    d.addCallback(connected)
    d.addErrback(lambda f: defer.fail(describe_connect_failure(f)))
    return d

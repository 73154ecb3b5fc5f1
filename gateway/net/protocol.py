"""The Twisted adapter around the sans-I/O association core.

:class:`DicomProtocol` feeds received bytes to :class:`~gateway.ul.Association`,
carries out the effects it returns (write bytes, ARTIM, close) and hands
indications to its *user*, the SCP or SCU logic of one association
(an :class:`~gateway.interfaces.IAssociationUser`).  It is what the user
asks things of (:class:`~gateway.interfaces.IAssociationProvider`).  It owns
the timers, all through the injected reactor so tests can use a ``Clock``:

- ARTIM (PS3.8 9.1.5): waiting for an A-ASSOCIATE-RQ, and after a reject,
  release or abort until the peer closes;
- the DIMSE timeout: no byte from the peer for ``dimse`` seconds while the
  association is up (not counted while we ourselves hold the peer back, or
  while the user owes the peer an answer);
- the PDU deadline: once the first byte of a PDU has arrived, the rest must
  arrive within ``pdu_timeout`` seconds (again not counted while we hold the
  peer back).  The DIMSE timer restarts on every byte, so without this a
  peer trickling a byte a second would never be cut off.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from gateway.interfaces import IAssociationProvider
from gateway.net.tls import DicomTLSProtocol, describe_peer_certificate
from gateway import ul

#: Bytes read from a TCP socket at a time (see connectionMade).
READ_SIZE = 256 << 10


class DirectWriter:
    """Writes to a transport, straight to the socket where that is safe.

    ``transport.write`` queues the bytes and sends them on the reactor's next
    turn, after registering for writability (and unregistering after): two
    ``epoll_ctl`` calls and a reactor iteration per response, about 7% of the
    reactor's CPU for a stream of small instances.  On a plain TCP connection
    the bytes go to the socket (``getHandle()``) at once instead.  The first
    time the socket does not take all of them, the rest goes to
    ``transport.write`` and so does everything after it, so their order is
    kept: Twisted's queue is never bypassed once it holds anything.  TLS
    connections (and test transports) always take the ordinary path.
    """

    __slots__ = ("transport", "_socket")

    def __init__(self, transport):
        self.transport = transport
        self._socket = transport.getHandle() if isinstance(transport, tcp.Connection) else None

    def write(self, data: bytes) -> None:
        sock = self._socket
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:  # EAGAIN, or a broken connection that write() will find out about
                sent = 0
            if sent == len(data):
                return
            self._socket = None
            data = data[sent:]
        self.transport.write(data)


@implementer(IAssociationProvider)
class DicomProtocol(Protocol):
    log = Logger()

    def __init__(self, user, reactor, *, requestor: bool, max_pdu_length: int,
                 artim_timeout: float, dimse_timeout: float, pdu_timeout: float = 0):
        self.user = user
        self.reactor = reactor
        self.core = ul.Association(requestor, max_pdu_length, sink=user.pdv_received)
        self.artim_timeout = artim_timeout
        self.dimse_timeout = dimse_timeout
        self.pdu_timeout = pdu_timeout
        self._artim = None
        self._dimse = None
        self._pdu = None
        self._writer: DirectWriter | None = None
        #: Over TLS, the records decrypted from one socket read (see dataReceived).
        self._records: list | None = None
        self._paused = False
        self.closed = False
        self.disconnect_reason = None  # why we closed, if we did

    # ---- transport events ----------------------------------------------

    def connectionMade(self):
        transport = self.transport
        if isinstance(transport, DicomTLSProtocol):
            self._records = []
            transport = transport.transport
        if isinstance(transport, tcp.Connection):
            # Read up to READ_SIZE bytes at a time (Twisted's default is 64 KiB):
            # fewer trips through the reactor, and most PDUs arrive whole.
            transport.bufferSize = READ_SIZE
        transport = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            try:
                transport.setTcpNoDelay(True)
            except OSError:
                pass
        self._writer = DirectWriter(transport)
        self.user.connection_made(self)
        if self.core.requestor:
            # Twisted connects before the protocol exists: Evt1 (the user's
            # A-ASSOCIATE request) and Evt2 (connected) happen together.
            self._run(self.core.request(self.user.association_request()))
        self._run(self.core.connection_made())

    def dataReceived(self, data):
        if self._records is not None:
            # TLS hands over one record (at most 16 KiB) per call, a dozen or
            # more per socket read: the core gets them joined when the TLS
            # layer says the read is done, once per read instead of once per
            # record.
            self._records.append(data)
            return
        self._receive(data)

    def tls_read_done(self):
        """The TLS layer has handed over every record of one socket read."""
        records = self._records
        if not records:  # a read of handshake messages only
            return
        self._records = []
        if not self.closed:
            self._receive(records[0] if len(records) == 1 else b"".join(records))

    def _receive(self, data):
        if self._dimse is not None:
            self._dimse.reset(self.dimse_timeout)
        core = self.core
        self._run(core.receive_data(data))
        while core.held:
            self._run(core.resume())
        self._check_pdu_deadline()

    def connectionLost(self, reason):
        if self._records:  # what arrived before the close comes first
            self.tls_read_done()
        self.closed = True
        self._cancel_artim()
        self._cancel_dimse()
        self._cancel_pdu()
        self._run(self.core.connection_lost())
        self.user.closed(reason)

    # ---- IAssociationProvider ----------------------------------------------

    @property
    def peer_max_pdu(self) -> int:
        return self.core.peer_max_pdu

    @property
    def can_send_data(self) -> bool:
        return not self.closed and self.core.can_send_data

    @property
    def can_request_release(self) -> bool:
        return not self.closed and self.core.can_request_release

    def accept(self, ac):
        # The core handles every PDU of one read before we run its effects:
        # a PDU that followed the A-ASSOCIATE-RQ too early (PS3.8: AA-8 in
        # Sta3) may already have aborted the association we are answering.
        if self.closed or not self.core.awaiting_answer:
            return
        self._run(self.core.accept(ac))
        self._start_dimse()

    def reject(self, rj):
        if self.closed or not self.core.awaiting_answer:
            return
        self._run(self.core.reject(rj))

    def send_pdata(self, pdu_bytes: bytes):
        # A late answer (a write that finished after an abort) has nowhere to go.
        if self.can_send_data:
            self._run(self.core.send_pdata(pdu_bytes))

    def release_request(self):
        self._run(self.core.release_request())

    def release_response(self):
        if not self.closed and self.core.can_answer_release:
            self._run(self.core.release_response())

    def abort(self, reason: int = ul.ABORT_REASON_NOT_SPECIFIED, why: str = "aborted", now: bool = False):
        """A-ABORT from the local user; the connection closes.  With ``now``
        the connection is dropped at once, without waiting for the peer."""
        if self.closed:
            return
        self.disconnect_reason = self.disconnect_reason or why
        self._run(self.core.abort(reason))
        self._close()
        if now:
            self._abort_transport()

    def provider_abort(self, reason: int, detail: str):
        """The peer broke a rule above the upper layer (e.g. DIMSE)."""
        if self.closed:
            return
        self.disconnect_reason = self.disconnect_reason or detail
        self._run(self.core.provider_abort(reason, detail))

    def pause(self):
        """Stop reading from the peer (our disk is behind)."""
        if not self._paused and not self.closed:
            self._paused = True
            self.transport.pauseProducing()
            self._cancel_dimse()
            self._cancel_pdu()

    def resume(self):
        if self._paused and not self.closed:
            self._paused = False
            self.transport.resumeProducing()
            self._start_dimse()
            self._check_pdu_deadline()

    def register_producer(self, producer):
        """Have the transport pause and resume ``producer`` (an IPushProducer)."""
        if self.transport is not None:
            self.transport.registerProducer(producer, True)

    def unregister_producer(self):
        if self.transport is not None and not self.closed:
            self.transport.unregisterProducer()

    @property
    def peer(self) -> str:
        try:
            p = self.transport.getPeer()
            return f"{p.host}:{p.port}"
        except Exception:
            return "?"

    @property
    def peer_host(self) -> str | None:
        try:
            return self.transport.getPeer().host
        except Exception:
            return None

    def peer_verify_error(self) -> str | None:
        """What the peer's TLS certificate is, when a handshake refused it
        (see gateway.net.tls.describe_peer_certificate), or None."""
        if not ISSLTransport.providedBy(self.transport):
            return None
        return describe_peer_certificate(self.transport.getHandle(), self.reactor.seconds())

    def peer_certificate_subject(self) -> str | None:
        """The TLS peer certificate's subject (RFC 4514), or None."""
        if not ISSLTransport.providedBy(self.transport):
            return None
        try:
            cert = self.transport.getPeerCertificate()
        except Exception:
            return None
        if cert is None:
            return None
        return cert.to_cryptography().subject.rfc4514_string()

    # ---- effects -------------------------------------------------------

    def _run(self, effects):
        for fx in effects:
            _EFFECTS[type(fx)](self, fx)

    def _send(self, fx):
        self._writer.write(fx.data)

    def _aborted(self, fx):
        if fx.local and fx.detail:
            self.disconnect_reason = self.disconnect_reason or fx.detail
        self._cancel_dimse()
        self.user.aborted(fx)

    def _confirmed(self, fx):
        if fx.accepted:
            self._start_dimse()
            self.user.associate_accepted(fx.response)
        else:
            self.user.associate_rejected(fx.response)

    def _close(self):
        self._cancel_dimse()
        if self.transport is None or self.closed:
            return
        self.transport.loseConnection()
        if ISSLTransport.providedBy(self.transport) and isinstance(self.transport, Protocol):
            # Over TLS that only sends our close_notify and waits for the
            # peer's, while a DICOM peer (PS3.8 Sta13) waits for us to close
            # the connection: close the TCP connection under it once the
            # close_notify is written, so that neither side waits for the other.
            tcp_transport = self.transport.transport
            self.reactor.callLater(0, tcp_transport.loseConnection)

    # ---- timers --------------------------------------------------------

    def _start_artim(self):
        self._cancel_artim()
        self._artim = self.reactor.callLater(self.artim_timeout, self._artim_expired)

    def _cancel_artim(self):
        if self._artim is not None and self._artim.active():
            self._artim.cancel()
        self._artim = None

    def _artim_expired(self):
        self._artim = None
        self.disconnect_reason = self.disconnect_reason or "ARTIM timer expired"
        effects = self.core.artim_expired()
        self._run(effects)
        if not self.closed:
            self._abort_transport()

    def _start_dimse(self):
        if self.dimse_timeout and self._dimse is None and not self.closed and not self._paused:
            self._dimse = self.reactor.callLater(self.dimse_timeout, self._dimse_expired)

    def _cancel_dimse(self):
        if self._dimse is not None and self._dimse.active():
            self._dimse.cancel()
        self._dimse = None

    def _dimse_expired(self):
        self._dimse = None
        if self._paused or self.closed:
            return
        if self.user.owes_response():
            # We owe the peer an answer (a store still being written): the
            # silence is ours, not the peer's.
            self._start_dimse()
            return
        self.log.warn("no data from {peer} for {timeout} s: aborting the association",
                      peer=self.peer, timeout=self.dimse_timeout)
        self.abort(why=f"DIMSE timeout ({self.dimse_timeout:g} s without data)", now=True)

    def _check_pdu_deadline(self):
        """Start the PDU deadline when a PDU is partly received, stop it when not."""
        if not self.pdu_timeout or self.closed or self._paused:
            return
        if self.core.partial_pdu:
            if self._pdu is None:
                self._pdu = self.reactor.callLater(self.pdu_timeout, self._pdu_expired)
        else:
            self._cancel_pdu()

    def _cancel_pdu(self):
        if self._pdu is not None and self._pdu.active():
            self._pdu.cancel()
        self._pdu = None

    def _pdu_expired(self):
        self._pdu = None
        if self._paused or self.closed:
            return
        self.log.warn("{peer} did not complete a PDU within {timeout} s: aborting",
                      peer=self.peer, timeout=self.pdu_timeout)
        self.abort(why=f"PDU timeout (a PDU not complete {self.pdu_timeout:g} s after its first byte)",
                   now=True)

    def _abort_transport(self):
        abort_connection = getattr(self.transport, "abortConnection", None)
        if abort_connection is not None:
            abort_connection()
        else:
            self.transport.loseConnection()


#: What each effect of the core means here.
_EFFECTS = {
    ul.Send: DicomProtocol._send,
    ul.StartARTIM: lambda p, fx: p._start_artim(),
    ul.StopARTIM: lambda p, fx: p._cancel_artim(),
    ul.CloseTransport: lambda p, fx: p._close(),
    ul.AssociateIndication: lambda p, fx: p.user.associate_indication(fx.request),
    ul.AssociateConfirmation: DicomProtocol._confirmed,
    ul.ReleaseIndication: lambda p, fx: p.user.release_indication(fx.collision),
    ul.ReleaseConfirmation: lambda p, fx: p.user.release_confirmation(),
    ul.AbortIndication: DicomProtocol._aborted,
    ul.ConnectTransport: lambda p, fx: None,  # Twisted connected us before this protocol existed
}

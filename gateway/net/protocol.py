"""The Twisted adapter around the sans-I/O association core.

:class:`DicomProtocol` feeds received bytes to :class:`Association`, carries
out the effects it returns (write bytes, ARTIM, close) and hands indications
to a *user* object: the SCP or SCU logic of one association.  It owns the
timers, all through the injected reactor so tests can use a ``Clock``:

- ARTIM (PS3.8 9.1.5): waiting for an A-ASSOCIATE-RQ, and after a reject,
  release or abort until the peer closes;
- the DIMSE timeout: no byte from the peer for ``dimse`` seconds while the
  association is up (not counted while we ourselves hold the peer back);
- the PDU deadline: once the first byte of a PDU has arrived, the rest must
  arrive within ``pdu_timeout`` seconds (again not counted while we hold the
  peer back).  The DIMSE timer restarts on every byte, so without this a
  peer trickling a byte a second would never be cut off.

A user implements some of: ``association_request()`` (requestor: returns
the A-ASSOCIATE-RQ to send), ``associate_indication(rq)``,
``associate_accepted(ac)``, ``associate_rejected(rj)``, ``pdata_indication(pdu)``,
``release_indication(collision)``, ``release_confirmation()``,
``aborted(indication)``, ``closed(reason)``.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from gateway.ul.association import (
    AbortIndication,
    AssociateAccepted,
    AssociateIndication,
    AssociateRejected,
    Association,
    CloseTransport,
    ConnectTransport,
    PDataIndication,
    ReleaseConfirmation,
    ReleaseIndication,
    Send,
    StartARTIM,
    StopARTIM,
)
from gateway.ul.pdu import ABORT_REASON_NOT_SPECIFIED

#: Bytes read from a TCP socket at a time (see connectionMade).
READ_SIZE = 256 << 10


def _write(transport, data: bytes) -> None:
    """``transport.write(data)``, sent at once where it can be.

    Twisted queues each write and sends it on the reactor's next turn, after
    registering for writability (and unregistering after): two ``epoll_ctl``
    calls and a reactor iteration per response, about 7% of the reactor's
    CPU for a stream of small instances.  On a plain TCP connection with
    nothing queued the bytes go to the socket now; whatever it does not take
    is queued as before, so their order is kept.  TLS connections (and test
    transports) take the ordinary path.
    """
    if (isinstance(transport, tcp.Connection) and transport.connected and not transport.disconnecting
            and not transport.dataBuffer and not transport._tempDataLen):
        sent = transport.writeSomeData(data)
        if type(sent) is int:  # else the connection is lost: write() below finds out as usual
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


class DicomProtocol(Protocol):
    log = Logger()

    def __init__(self, user, reactor, *, requestor: bool, max_pdu_length: int,
                 artim_timeout: float, dimse_timeout: float, pdu_timeout: float = 0):
        self.user = user
        self.reactor = reactor
        self.core = Association(requestor, max_pdu_length)
        self.artim_timeout = artim_timeout
        self.dimse_timeout = dimse_timeout
        self._artim = None
        self._dimse = None
        self.pdu_timeout = pdu_timeout
        self._pdu = None
        self._paused = False
        self._closed = False
        self.disconnect_reason = None  # why we closed, if we did
        user.protocol = self

    # ---- transport events ----------------------------------------------

    def connectionMade(self):
        if isinstance(getattr(self.transport, "bufferSize", None), int):
            # Read up to READ_SIZE bytes at a time (Twisted's default is 64 KiB):
            # fewer trips through the reactor, and most PDUs arrive whole.
            self.transport.bufferSize = READ_SIZE
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:
                pass
        if self.core.requestor:
            # Twisted connects before the protocol exists: Evt1 (the user's
            # A-ASSOCIATE request) and Evt2 (connected) happen together.
            self._run(self.core.request(self.user.association_request()))
        self._run(self.core.connection_made())

    def dataReceived(self, data):
        if self._dimse is not None:
            self._dimse.reset(self.dimse_timeout)
        self._run(self.core.receive_data(data))
        self._check_pdu_deadline()

    def connectionLost(self, reason):
        self._closed = True
        self._cancel_artim()
        self._cancel_dimse()
        self._cancel_pdu()
        self._run(self.core.connection_lost())
        closed = getattr(self.user, "closed", None)
        if closed is not None:
            closed(reason)

    # ---- primitives for the user -----------------------------------------

    def request(self, rq):
        self._run(self.core.request(rq))

    def accept(self, ac):
        # The core handles every PDU of one read before we run its effects:
        # a PDU that followed the A-ASSOCIATE-RQ too early (PS3.8: AA-8 in
        # Sta3) may already have aborted the association we are answering.
        if self._closed or self.core.state != "Sta3":
            return
        self._run(self.core.accept(ac))
        self._start_dimse()

    def reject(self, rj):
        if self._closed or self.core.state != "Sta3":
            return
        self._run(self.core.reject(rj))

    def send_pdata(self, pdu_bytes: bytes):
        # A late answer (a write that finished after an abort) has nowhere to go.
        if self._closed or self.core.state not in ("Sta6", "Sta8"):
            return
        self._run(self.core.send_pdata(pdu_bytes))

    def release_request(self):
        self._run(self.core.release_request())

    def release_response(self):
        if self._closed or self.core.state not in ("Sta8", "Sta9", "Sta12"):
            return
        self._run(self.core.release_response())

    def abort(self, reason: int = ABORT_REASON_NOT_SPECIFIED, why: str = "aborted"):
        """A-ABORT from the local user; the connection closes."""
        if self._closed:
            return
        self.disconnect_reason = self.disconnect_reason or why
        self._run(self.core.abort(reason))
        self._close()

    def provider_abort(self, reason: int, detail: str):
        """The peer broke a rule above the upper layer (e.g. DIMSE)."""
        if self._closed:
            return
        self.disconnect_reason = self.disconnect_reason or detail
        self._run(self.core.provider_abort(reason, detail))

    def pause(self):
        """Stop reading from the peer (our disk is behind)."""
        if not self._paused and not self._closed:
            self._paused = True
            self.transport.pauseProducing()
            self._cancel_dimse()
            self._cancel_pdu()

    def resume(self):
        if self._paused and not self._closed:
            self._paused = False
            self.transport.resumeProducing()
            self._start_dimse()
            self._check_pdu_deadline()

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

    def peer_certificate_subject(self) -> str | None:
        """The TLS peer certificate's subject (RFC 4514), or None."""
        get = getattr(self.transport, "getPeerCertificate", None)
        if get is None:
            return None
        try:
            cert = get()
        except Exception:
            return None
        if cert is None:
            return None
        return cert.to_cryptography().subject.rfc4514_string()

    # ---- effects -------------------------------------------------------

    def _run(self, effects):
        user = self.user
        for fx in effects:
            kind = type(fx)
            if kind is Send:
                _write(self.transport, fx.data)
            elif kind is PDataIndication:
                user.pdata_indication(fx.pdu)
            elif kind is StartARTIM:
                self._start_artim()
            elif kind is StopARTIM:
                self._cancel_artim()
            elif kind is CloseTransport:
                self._close()
            elif kind is AssociateIndication:
                user.associate_indication(fx.request)
            elif kind is ReleaseIndication:
                user.release_indication(fx.collision)
            elif kind is ReleaseConfirmation:
                user.release_confirmation()
            elif kind is AbortIndication:
                if fx.local and fx.detail:
                    self.disconnect_reason = self.disconnect_reason or fx.detail
                self._cancel_dimse()
                user.aborted(fx)
            elif kind is AssociateAccepted:
                self._start_dimse()
                user.associate_accepted(fx.response)
            elif kind is AssociateRejected:
                user.associate_rejected(fx.response)
            elif kind is ConnectTransport:
                pass  # Twisted connected us before this protocol existed

    def _close(self):
        self._cancel_dimse()
        if self.transport is not None and not self._closed:
            self.transport.loseConnection()

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
        if not self._closed:
            self._abort_transport()

    def _start_dimse(self):
        if self.dimse_timeout and self._dimse is None and not self._closed and not self._paused:
            self._dimse = self.reactor.callLater(self.dimse_timeout, self._dimse_expired)

    def _cancel_dimse(self):
        if self._dimse is not None and self._dimse.active():
            self._dimse.cancel()
        self._dimse = None

    def _dimse_expired(self):
        self._dimse = None
        if self._paused or self._closed:
            return
        busy = getattr(self.user, "busy", None)
        if busy is not None and busy():
            # We owe the peer an answer (a store still being written): the
            # silence is ours, not the peer's.
            self._start_dimse()
            return
        self.log.warn("no data from {peer} for {timeout} s: aborting the association",
                      peer=self.peer, timeout=self.dimse_timeout)
        self.abort(why=f"DIMSE timeout ({self.dimse_timeout:g} s without data)")
        self._abort_transport()

    def _check_pdu_deadline(self):
        """Start the PDU deadline when a PDU is partly received, stop it when not."""
        if not self.pdu_timeout or self._closed or self._paused:
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
        if self._paused or self._closed:
            return
        self.log.warn("{peer} did not complete a PDU within {timeout} s: aborting",
                      peer=self.peer, timeout=self.pdu_timeout)
        self.abort(why=f"PDU timeout (a PDU not complete {self.pdu_timeout:g} s after its first byte)")
        self._abort_transport()

    def _abort_transport(self):
        abort_connection = getattr(self.transport, "abortConnection", None)
        if abort_connection is not None:
            abort_connection()
        else:
            self.transport.loseConnection()

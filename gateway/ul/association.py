"""The upper-layer protocol machine for one association (PS3.8 section 9), sans I/O.

Bytes go in with :meth:`Association.receive_data`, local primitives with the
other methods; every call returns a list of *effects*
(:mod:`gateway.ul.events`: send these bytes, start or stop ARTIM, close the
transport, tell the user something) and never touches a socket, a timer or a
clock.  The caller (the Twisted Protocol) carries the effects out in order.

Framing: each PDU starts with a 6-byte header (type, reserved, 32-bit
length).  The declared length is checked against a limit *before* any of the
body is buffered, so a peer cannot make us allocate what it announces.
"""

from __future__ import annotations

import struct

from gateway.ul._decode import decode_pdu
from gateway.ul._encode import encode_pdu
from gateway.ul.events import (
    CLOSE_TRANSPORT,
    CONNECT_TRANSPORT,
    RELEASE_CONFIRMATION,
    START_ARTIM,
    STOP_ARTIM,
    AbortIndication,
    AssociateAccepted,
    AssociateIndication,
    AssociateRejected,
    PDataIndication,
    ReleaseIndication,
    Send,
)
from gateway.ul.fsm import ACTIONS, TABLE, Event, State
from gateway.ul.pdu import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    ABORT_INVALID_PDU_PARAMETER_VALUE,
    ABORT_REASON_NOT_SPECIFIED,
    ABORT_SOURCE_PROVIDER,
    ABORT_SOURCE_USER,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNIZED_PDU,
    P_DATA_TF,
    RJ_ACSE_PROTOCOL_VERSION_NOT_SUPPORTED,
    RJ_PERMANENT,
    RJ_SOURCE_ACSE,
    Abort,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    PDataTF,
    PDUError,
    ReleaseRP,
    ReleaseRQ,
)

# The largest non-P-DATA PDU we accept.  An A-ASSOCIATE-RQ with 128
# presentation contexts, each proposing a dozen transfer syntaxes, stays far
# below this; anything bigger is an attack or a broken peer.
MAX_ASSOCIATION_PDU = 1 << 20
# When we advertise "no maximum" (0) we still refuse P-DATA PDUs above this.
MAX_UNLIMITED_PDATA = 16 << 20
# Some peers count the 6 header bytes into the maximum they respect; accept
# that much over what we advertised rather than aborting them.
PDATA_SLACK = 6

_HEADER = struct.Struct(">BxL")

_EVENT_FOR_TYPE = {
    A_ASSOCIATE_AC: Event.Evt3,
    A_ASSOCIATE_RJ: Event.Evt4,
    A_ASSOCIATE_RQ: Event.Evt6,
    P_DATA_TF: Event.Evt10,
    A_RELEASE_RQ: Event.Evt12,
    A_RELEASE_RP: Event.Evt13,
    A_ABORT: Event.Evt16,
}

_START, _STOP, _CLOSE = START_ARTIM, STOP_ARTIM, CLOSE_TRANSPORT


class InvalidPrimitive(Exception):
    """A local primitive was issued in a state where PS3.8 has no cell for it."""


class Association:
    """One association's protocol machine.

    ``requestor`` selects the side (it only matters for release collisions
    and the reject a provider may send).  ``max_pdu_length`` is what we
    advertise for receiving; P-DATA PDUs above it are aborted.
    """

    def __init__(self, requestor: bool, max_pdu_length: int):
        self.requestor = requestor
        self.state = State.Sta1
        # The start of a PDU whose end has not arrived: the received chunks,
        # joined once ``_need`` bytes are there (the whole PDU, or its header).
        self._partial: list = []
        self._partial_len = 0
        self._need = 0
        self._discard = False  # stream cannot be framed any more
        limit = max_pdu_length + PDATA_SLACK if max_pdu_length else MAX_UNLIMITED_PDATA
        self._pdata_limit = min(limit, MAX_UNLIMITED_PDATA)
        self._pending: AssociateRQ | None = None
        self._abort: Abort | None = None
        self._detail = ""
        #: The Maximum Length the peer announced (its A-ASSOCIATE-RQ or -AC):
        #: what each P-DATA-TF we send may hold (PS3.8 D.1); 0 = no limit.
        self.peer_max_pdu = 0

    # ---- local service-user primitives ---------------------------------

    def connection_made(self) -> list:
        """Transport connected: Evt5 for an acceptor, Evt2 for a requestor."""
        return self._event(Event.Evt2 if self.requestor else Event.Evt5)

    def request(self, rq: AssociateRQ) -> list:
        """A-ASSOCIATE request (Evt1); the RQ PDU goes out on Evt2."""
        self._pending = rq
        return self._event(Event.Evt1)

    def accept(self, ac: AssociateAC) -> list:
        return self._event(Event.Evt7, ac)

    def reject(self, rj: AssociateRJ) -> list:
        return self._event(Event.Evt8, rj)

    def send_pdata(self, pdu_bytes: bytes) -> list:
        """P-DATA request with an already encoded P-DATA-TF PDU (Evt9)."""
        return self._event(Event.Evt9, pdu_bytes)

    def release_request(self) -> list:
        return self._event(Event.Evt11)

    def release_response(self) -> list:
        return self._event(Event.Evt14)

    def abort(self, reason: int = ABORT_REASON_NOT_SPECIFIED) -> list:
        """A-ABORT request from the local user (Evt15)."""
        if self.state in (State.Sta1, State.Sta2, State.Sta13):
            # Nothing to abort, or already aborting: just make sure the
            # connection goes away.
            return [] if self.state == State.Sta1 else [_CLOSE]
        self._abort = Abort(ABORT_SOURCE_USER, reason)
        return self._event(Event.Evt15)

    def provider_abort(self, reason: int, detail: str = "") -> list:
        """Abort because the peer broke a rule above this layer (e.g. DIMSE).

        Handled like an invalid PDU (Evt19): A-ABORT with service-provider
        source, an A-P-ABORT indication, ARTIM.
        """
        self._detail = detail
        self._abort = Abort(ABORT_SOURCE_PROVIDER, reason)
        if self.state in (State.Sta1, State.Sta13):
            return []
        return self._event(Event.Evt19)

    def connection_lost(self) -> list:
        if self.state == State.Sta1:
            return []
        return self._event(Event.Evt17)

    def artim_expired(self) -> list:
        if ((Event.Evt18, self.state)) not in TABLE:
            return []
        return self._event(Event.Evt18)

    # ---- predicates: what the state allows (callers never compare states) ----

    @property
    def partial_pdu(self) -> bool:
        """Some bytes of a PDU have arrived, but not all of it."""
        return bool(self._partial) and not self._discard

    @property
    def established(self) -> bool:
        """Sta6: associated, no release under way."""
        return self.state is State.Sta6

    @property
    def awaiting_answer(self) -> bool:
        """Sta3: an A-ASSOCIATE indication awaits accept() or reject()."""
        return self.state is State.Sta3

    @property
    def can_send_data(self) -> bool:
        """P-DATA may go out (Evt9 has a cell: Sta6, and Sta8 before our release answer)."""
        return (Event.Evt9, self.state) in TABLE

    @property
    def can_request_release(self) -> bool:
        return (Event.Evt11, self.state) in TABLE

    @property
    def can_answer_release(self) -> bool:
        """An A-RELEASE indication awaits release_response() (Evt14 has a cell)."""
        return (Event.Evt14, self.state) in TABLE

    @property
    def idle(self) -> bool:
        """Sta1: no association and no connection any more (or not yet)."""
        return self.state is State.Sta1

    # ---- bytes from the peer --------------------------------------------

    def receive_data(self, data) -> list:
        """Feed bytes from the peer; return the effects.

        Copies only the PDUs that straddle two reads, once: complete PDUs
        are decoded straight from ``data`` (P-DATA values are memoryview
        slices of it), and the pieces of one that spans several reads are
        joined when its last byte is in.  A PDU's declared length is checked
        against the limit as soon as its header is in, before anything
        waits for the rest of it.
        """
        if self._discard:
            return []
        if type(data) is not bytes:
            data = bytes(data)  # the views kept below must not see the caller reuse its buffer
        view = memoryview(data)
        effects: list = []
        while self._partial and view and not self._discard:
            missing = self._need - self._partial_len
            if len(view) < missing:
                self._partial.append(view)
                self._partial_len += len(view)
                return effects
            self._partial.append(view[:missing])
            view = view[missing:]
            unit = b"".join(self._partial)  # a whole PDU, or the header that says how long it is
            self._partial.clear()
            self._partial_len = 0
            effects += self._frame(memoryview(unit))
        if view and not self._discard:
            effects += self._frame(view)
        return effects

    def _frame(self, view) -> list:
        """Decode the whole PDUs at the start of ``view``; keep the rest."""
        total = len(view)
        off = 0
        need = 6
        effects: list = []
        while total - off >= 6 and not self._discard:
            pdu_type, length = _HEADER.unpack_from(view, off)
            event = _EVENT_FOR_TYPE.get(pdu_type)
            if event is None:
                effects += self._invalid(ABORT_UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{pdu_type:02x}")
                break
            limit = self._pdata_limit if pdu_type == P_DATA_TF else MAX_ASSOCIATION_PDU
            if length > limit:
                effects += self._invalid(
                    ABORT_INVALID_PDU_PARAMETER_VALUE,
                    f"PDU type 0x{pdu_type:02x} declares {length} bytes, limit {limit}",
                )
                break
            end = off + 6 + length
            if end > total:
                need = 6 + length
                break
            body = view[off + 6:end]
            off = end
            try:
                pdu = decode_pdu(pdu_type, body if pdu_type == P_DATA_TF else bytes(body))
            except PDUError as e:
                effects += self._invalid(e.reason, str(e))
                break
            effects += self._event(event, pdu)
        if off < total and not self._discard:
            self._partial.append(view[off:])
            self._partial_len = total - off
            self._need = need
        return effects

    def _invalid(self, reason: int, detail: str) -> list:
        self._discard = True
        self._partial.clear()
        self._detail = detail
        self._abort = Abort(ABORT_SOURCE_PROVIDER, reason)
        return self._event(Event.Evt19)

    # ---- dispatch ------------------------------------------------------

    def _event(self, event: Event, arg=None) -> list:
        action = TABLE.get((event, self.state))
        if action is None:
            raise InvalidPrimitive(f"{event.value} ({event.name}) is not valid in {self.state.name}")
        effects: list = []
        self.state = _ACTIONS[action](self, effects, event, arg)
        return effects

    # ---- actions (PS3.8 Tables 9-6 to 9-9) -------------------------------

    def _ae1(self, fx, event, arg):
        fx.append(CONNECT_TRANSPORT)
        return State.Sta4

    def _ae2(self, fx, event, arg):
        fx.append(Send(encode_pdu(self._pending)))
        return State.Sta5

    def _ae3(self, fx, event, ac):
        self.peer_max_pdu = ac.user_information.max_length or 0
        fx.append(AssociateAccepted(ac))
        return State.Sta6

    def _ae4(self, fx, event, rj):
        fx += [AssociateRejected(rj), _CLOSE]
        return State.Sta1

    def _ae5(self, fx, event, arg):
        fx.append(_START)
        return State.Sta2

    def _ae6(self, fx, event, rq: AssociateRQ):
        fx.append(_STOP)
        if not rq.protocol_version & 0x0001:
            # Only the service provider judges the protocol version.
            rj = AssociateRJ(RJ_PERMANENT, RJ_SOURCE_ACSE, RJ_ACSE_PROTOCOL_VERSION_NOT_SUPPORTED)
            fx += [Send(encode_pdu(rj)), _START]
            return State.Sta13
        self.peer_max_pdu = rq.user_information.max_length or 0
        fx.append(AssociateIndication(rq))
        return State.Sta3

    def _ae7(self, fx, event, ac):
        fx.append(Send(encode_pdu(ac)))
        return State.Sta6

    def _ae8(self, fx, event, rj):
        fx += [Send(encode_pdu(rj)), _START]
        return State.Sta13

    def _dt1(self, fx, event, pdu_bytes):
        fx.append(Send(pdu_bytes))
        return State.Sta6

    def _dt2(self, fx, event, pdu):
        fx.append(PDataIndication(pdu))
        return State.Sta6

    def _ar1(self, fx, event, arg):
        fx.append(Send(encode_pdu(ReleaseRQ())))
        return State.Sta7

    def _ar2(self, fx, event, arg):
        fx.append(ReleaseIndication())
        return State.Sta8

    def _ar3(self, fx, event, arg):
        fx += [RELEASE_CONFIRMATION, _CLOSE]
        return State.Sta1

    def _ar4(self, fx, event, arg):
        fx += [Send(encode_pdu(ReleaseRP())), _START]
        return State.Sta13

    def _ar5(self, fx, event, arg):
        fx.append(_STOP)
        return State.Sta1

    def _ar6(self, fx, event, pdu):
        fx.append(PDataIndication(pdu))
        return State.Sta7

    def _ar7(self, fx, event, pdu_bytes):
        fx.append(Send(pdu_bytes))
        return State.Sta8

    def _ar8(self, fx, event, arg):
        fx.append(ReleaseIndication(collision=True))
        return State.Sta9 if self.requestor else State.Sta10

    def _ar9(self, fx, event, arg):
        fx.append(Send(encode_pdu(ReleaseRP())))
        return State.Sta11

    def _ar10(self, fx, event, arg):
        fx.append(RELEASE_CONFIRMATION)
        return State.Sta12

    def _aa1(self, fx, event, arg):
        # Evt15 is our user's abort; in Sta2 the other events are a peer
        # that sent something other than A-ASSOCIATE-RQ: a provider abort.
        if event == Event.Evt15:
            abort = self._abort or Abort(ABORT_SOURCE_USER, ABORT_REASON_NOT_SPECIFIED)
        elif event == Event.Evt19 and self._abort is not None:
            abort = self._abort
        else:
            abort = Abort(ABORT_SOURCE_PROVIDER, ABORT_UNEXPECTED_PDU)
            self._detail = f"{event.value} in {self.state.name}"
        fx += [Send(encode_pdu(abort)), _START]
        if abort.source == ABORT_SOURCE_PROVIDER:
            fx.append(AbortIndication(abort.source, abort.reason, True, True, self._detail))
        return State.Sta13

    def _aa2(self, fx, event, arg):
        fx += [_STOP, _CLOSE]
        if event == Event.Evt16 and self.state == State.Sta2:
            fx.append(AbortIndication(arg.source, arg.reason, arg.source == ABORT_SOURCE_PROVIDER))
        return State.Sta1

    def _aa3(self, fx, event, abort: Abort):
        provider = abort.source == ABORT_SOURCE_PROVIDER
        fx += [AbortIndication(abort.source, abort.reason, provider), _CLOSE]
        return State.Sta1

    def _aa4(self, fx, event, arg):
        fx.append(AbortIndication(ABORT_SOURCE_PROVIDER, ABORT_REASON_NOT_SPECIFIED, True,
                                  detail="transport connection closed"))
        return State.Sta1

    def _aa5(self, fx, event, arg):
        fx.append(_STOP)
        return State.Sta1

    def _aa6(self, fx, event, arg):
        return State.Sta13

    def _aa7(self, fx, event, arg):
        abort = self._abort if event == Event.Evt19 and self._abort else Abort(ABORT_SOURCE_PROVIDER, ABORT_UNEXPECTED_PDU)
        fx.append(Send(encode_pdu(abort)))
        return State.Sta13

    def _aa8(self, fx, event, arg):
        if event == Event.Evt19 and self._abort is not None:
            abort = self._abort
        else:
            abort = Abort(ABORT_SOURCE_PROVIDER, ABORT_UNEXPECTED_PDU)
            self._detail = f"{event.value} in {self.state.name}"
        fx += [Send(encode_pdu(abort)),
               AbortIndication(abort.source, abort.reason, True, True, self._detail), _START]
        return State.Sta13


_ACTIONS = {
    name: getattr(Association, "_" + name.replace("-", "").lower()) for name in ACTIONS
}

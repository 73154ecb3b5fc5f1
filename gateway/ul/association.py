"""The upper-layer protocol machine for one association (PS3.8 section 9), sans I/O.

Bytes go in with :meth:`Association.receive_data`, local primitives with the
other methods; every call returns a list of *effects*
(:mod:`gateway.ul.events`: send these bytes, start or stop ARTIM, close the
transport, tell the user something) and never touches a socket, a timer or a
clock.  The caller (the Twisted Protocol) carries the effects out in order.
The one exception is the hot path: the PDV data of P-DATA-TF PDUs go to the
*sink* callable (the user's DIMSE assembler) as they arrive, without an
effect, a PDU object or a copy per PDU.

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
    AssociateConfirmation,
    AssociateIndication,
    ReleaseIndication,
    Send,
)
from gateway.ul.fsm import ACTIONS, TABLE, Event, State
import gateway.ul.pdu as P

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
    P.A_ASSOCIATE_AC: Event.Evt3,
    P.A_ASSOCIATE_RJ: Event.Evt4,
    P.A_ASSOCIATE_RQ: Event.Evt6,
    P.P_DATA_TF: Event.Evt10,
    P.A_RELEASE_RQ: Event.Evt12,
    P.A_RELEASE_RP: Event.Evt13,
    P.A_ABORT: Event.Evt16,
}

_START, _STOP, _CLOSE = START_ARTIM, STOP_ARTIM, CLOSE_TRANSPORT
_PDV_HEADER = struct.Struct(">IBB")  # item length, presentation context id, message control header
_EMPTY = memoryview(b"")
#: Where a P-DATA-TF reaches the user (Evt10: DT-2, AR-6): its data are
#: streamed to the sink.
_DELIVERING = frozenset({State.Sta6, State.Sta7})


class InvalidPrimitive(Exception):
    """A local primitive was issued in a state where PS3.8 has no cell for it."""


class Association:
    """One association's protocol machine.

    ``requestor`` selects the side (it only matters for release collisions
    and the reject a provider may send).  ``max_pdu_length`` is what we
    advertise for receiving; P-DATA PDUs above it are aborted.
    """

    def __init__(self, requestor: bool, max_pdu_length: int, sink=None):
        self.requestor = requestor
        self.state = State.Sta1
        # The start of a PDU whose end has not arrived: the received chunks,
        # joined once ``_need`` bytes are there (the whole PDU, or its header).
        self._partial: list = []
        self._partial_len = 0
        self._need = 0
        self._discard = False  # stream cannot be framed any more
        self._held = False  # see held
        # The P-DATA-TF being streamed (_stream): bytes of its body still to
        # come, of its current PDV's data, that PDV's context id and control
        # header, and the start of a PDV item header split between reads.
        self._body_left = 0
        self._pdv_left = 0
        self._pdv_context = self._pdv_control = 0
        self._pdv_head = b""
        #: Called with every piece of PDV data received in data transfer, in
        #: order: ``sink(context_id, control, data, end)``, ``data`` a
        #: memoryview of the received bytes (use or copy it before
        #: returning), ``end`` true on the last piece of the PDV.
        self.sink = sink if sink is not None else _ignore
        limit = max_pdu_length + PDATA_SLACK if max_pdu_length else MAX_UNLIMITED_PDATA
        self._pdata_limit = min(limit, MAX_UNLIMITED_PDATA)
        self._pending: P.AssociateRQ | None = None
        self._abort: P.Abort | None = None
        self._detail = ""
        #: The Maximum Length the peer announced (its A-ASSOCIATE-RQ or -AC):
        #: what each P-DATA-TF we send may hold (PS3.8 D.1); 0 = no limit.
        self.peer_max_pdu = 0

    # ---- local service-user primitives ---------------------------------

    def connection_made(self) -> list:
        """Transport connected: Evt5 for an acceptor, Evt2 for a requestor."""
        return self._event(Event.Evt2 if self.requestor else Event.Evt5)

    def request(self, rq: P.AssociateRQ) -> list:
        """A-ASSOCIATE request (Evt1); the RQ PDU goes out on Evt2."""
        self._pending = rq
        return self._event(Event.Evt1)

    def accept(self, ac: P.AssociateAC) -> list:
        return self._event(Event.Evt7, ac)

    def reject(self, rj: P.AssociateRJ) -> list:
        return self._event(Event.Evt8, rj)

    def send_pdata(self, pdu_bytes: bytes) -> list:
        """P-DATA request with an already encoded P-DATA-TF PDU (Evt9)."""
        return self._event(Event.Evt9, pdu_bytes)

    def release_request(self) -> list:
        return self._event(Event.Evt11)

    def release_response(self) -> list:
        return self._event(Event.Evt14)

    def abort(self, reason: int = P.ABORT_REASON_NOT_SPECIFIED) -> list:
        """A-ABORT request from the local user (Evt15)."""
        if self.state in (State.Sta1, State.Sta2, State.Sta13):
            # Nothing to abort, or already aborting: just make sure the
            # connection goes away.
            return [] if self.state == State.Sta1 else [_CLOSE]
        self._abort = P.Abort(P.ABORT_SOURCE_USER, reason)
        return self._event(Event.Evt15)

    def provider_abort(self, reason: int, detail: str = "") -> list:
        """Abort because the peer broke a rule above this layer (e.g. DIMSE).

        Handled like an invalid PDU (Evt19): A-ABORT with service-provider
        source, an A-P-ABORT indication, ARTIM.
        """
        self._detail = detail
        self._abort = P.Abort(P.ABORT_SOURCE_PROVIDER, reason)
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
        return bool(self._partial or self._body_left) and not self._discard

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

        A P-DATA-TF that reaches the user (Sta6, Sta7) is not buffered: its
        PDV data go to :attr:`sink` piece by piece as they arrive, views of
        ``data`` (see :meth:`_stream`).  Other PDUs are decoded whole: from
        ``data`` when they are complete in it, else once their last byte is
        in (the pieces joined, once).  A PDU's declared length is checked
        against the limit as soon as its header is in, before anything
        waits for the rest of it.
        """
        if self._discard:
            return []
        if type(data) is not bytes:
            data = bytes(data)  # the views handed on must not see the caller reuse its buffer
        effects: list = []
        self._frame(memoryview(data), effects)
        return effects

    @property
    def held(self) -> bool:
        """Framing stopped at a P-DATA-TF so that the effects returned are
        carried out before its data reach the user: call :meth:`resume`."""
        return self._held

    def resume(self) -> list:
        """Go on framing after :attr:`held`; return the effects."""
        self._held = False
        unit = b"".join(self._partial)
        self._partial.clear()
        self._partial_len = 0
        effects: list = []
        self._frame(memoryview(unit), effects)
        return effects

    def _frame(self, view, effects: list) -> None:
        while view and not self._discard and not self._held:
            if self._body_left:
                view = self._stream(view, effects)
            elif self._partial:
                missing = self._need - self._partial_len
                if len(view) < missing:
                    self._partial.append(view)
                    self._partial_len += len(view)
                    return
                self._partial.append(view[:missing])
                view = view[missing:]
                unit = b"".join(self._partial)  # a whole PDU, or the header that says how long it is
                self._partial.clear()
                self._partial_len = 0
                self._next_pdu(memoryview(unit), effects)
                if self._held and view:
                    self._partial.append(view)
                    self._partial_len += len(view)
                    return
            else:
                view = self._next_pdu(view, effects)

    def _next_pdu(self, view, effects: list):
        """Take the PDU at the start of ``view``: decode it, start streaming
        it, or keep what there is of it; return what follows."""
        if len(view) < 6:
            return self._keep(view, 6)
        pdu_type, length = _HEADER.unpack_from(view)
        event = _EVENT_FOR_TYPE.get(pdu_type)
        if event is None:
            effects += self._invalid(P.ABORT_UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{pdu_type:02x}")
            return _EMPTY
        limit = self._pdata_limit if pdu_type == P.P_DATA_TF else MAX_ASSOCIATION_PDU
        if length > limit:
            effects += self._invalid(
                P.ABORT_INVALID_PDU_PARAMETER_VALUE,
                f"PDU type 0x{pdu_type:02x} declares {length} bytes, limit {limit}",
            )
            return _EMPTY
        if pdu_type == P.P_DATA_TF and self.state in _DELIVERING:
            if effects:
                # What came before (an A-ASSOCIATE-AC, say) must reach the
                # user before these data do.
                self._held = True
                return self._keep(view, 6)
            if not length:
                # "shall contain one or more Presentation-data-value Items"
                effects += self._invalid(P.ABORT_INVALID_PDU_PARAMETER_VALUE, "P-DATA-TF PDU without any PDV item")
                return _EMPTY
            self._body_left = length
            return view[6:]
        end = 6 + length
        if len(view) < end:
            return self._keep(view, end)
        body = view[6:end]
        try:
            pdu = decode_pdu(pdu_type, body if pdu_type == P.P_DATA_TF else bytes(body))
        except P.PDUError as e:
            effects += self._invalid(e.reason, str(e))
            return _EMPTY
        effects += self._event(event, pdu)
        return view[end:]

    def _keep(self, view, need: int):
        """Keep the start of a PDU until ``need`` bytes of it are in."""
        self._partial.append(view)
        self._partial_len = len(view)
        self._need = need
        return _EMPTY

    def _stream(self, view, effects: list):
        """Hand the PDV data of the P-DATA-TF under way to :attr:`sink`, as
        pieces of ``view``; return what follows the PDU.

        Each PDV item header (PS3.8 Table 9-23: item length, presentation
        context id, message control header) is checked before any of its
        data goes on: a length under 2 or beyond the PDU, an even context
        id, or a PDU ending inside a header abort the association.  The
        sink is called only while the state delivers P-DATA: once the user
        has aborted from inside it, the rest of the PDU is dropped.
        """
        sink = self.sink
        while self._body_left and view:
            if not self._pdv_left:
                view = self._pdv_header(view, effects)
                if self._discard:
                    return _EMPTY
                continue
            n = self._pdv_left
            if n >= len(view):
                piece, view = view, _EMPTY
                n = len(piece)
            else:
                piece, view = view[:n], view[n:]
            self._pdv_left -= n
            self._body_left -= n
            if self.state in _DELIVERING:
                sink(self._pdv_context, self._pdv_control, piece, not self._pdv_left)
        return view

    def _pdv_header(self, view, effects: list):
        head = self._pdv_head
        if self._body_left + len(head) < 6:
            effects += self._invalid(P.ABORT_INVALID_PDU_PARAMETER_VALUE,
                                                  "truncated PDV item header")
            return _EMPTY
        if head or len(view) < 6:  # split between two reads
            take = view[:6 - len(head)]
            head = self._pdv_head = head + bytes(take)
            self._body_left -= len(take)
            view = view[len(take):]
            if len(head) < 6:
                return view
            self._pdv_head = b""
            length, context_id, control = _PDV_HEADER.unpack(head)
        else:
            length, context_id, control = _PDV_HEADER.unpack_from(view)
            self._body_left -= 6
            view = view[6:]
        if length < 2:
            problem = f"PDV item length {length} is less than 2"
        elif length - 2 > self._body_left:
            problem = f"PDV item length {length} exceeds the {self._body_left + 2} bytes remaining"
        elif not context_id & 1:
            problem = f"PDV presentation context id {context_id} is not odd"
        else:
            self._pdv_context, self._pdv_control, self._pdv_left = context_id, control, length - 2
            if not self._pdv_left and self.state in _DELIVERING:
                self.sink(context_id, control, _EMPTY, True)
            return view
        effects += self._invalid(P.ABORT_INVALID_PDU_PARAMETER_VALUE, problem)
        return _EMPTY

    def _invalid(self, reason: int, detail: str) -> list:
        self._discard = True
        self._partial.clear()
        self._body_left = self._pdv_left = 0
        self._detail = detail
        self._abort = P.Abort(P.ABORT_SOURCE_PROVIDER, reason)
        return self._event(Event.Evt19)

    # ---- dispatch ------------------------------------------------------

    def _event(self, event: Event, arg=None) -> list:
        action = TABLE.get((event, self.state))
        if action is None:
            raise InvalidPrimitive(f"{event.value} ({event.name}) is not valid in {self.state.name}")
        targets = ACTIONS[action][1]
        effects = _ACTIONS[action](self, event, arg)
        if len(targets) == 1:  # else the action chose (AE-6, AR-8)
            self.state = targets[0]
        return effects

    # ---- the actions that do more than emit effects ----------------------

    def _ae3(self, event, ac):
        self.peer_max_pdu = ac.user_information.max_length or 0
        return [AssociateConfirmation(ac)]

    def _ae6(self, event, rq: P.AssociateRQ):
        if not rq.protocol_version & 0x0001:
            # Only the service provider judges the protocol version.
            self.state = State.Sta13
            rj = P.AssociateRJ(P.RJ_PERMANENT, P.RJ_SOURCE_ACSE, P.RJ_ACSE_PROTOCOL_VERSION_NOT_SUPPORTED)
            return [_STOP, _send(rj), _START]
        self.state = State.Sta3
        self.peer_max_pdu = rq.user_information.max_length or 0
        return [_STOP, AssociateIndication(rq)]

    def _ar8(self, event, arg):
        self.state = State.Sta9 if self.requestor else State.Sta10
        return [ReleaseIndication(collision=True)]

    def _provider_abort(self, event) -> P.Abort:
        """The A-ABORT to send for a peer's error: the reason found (Evt19),
        or an unexpected PDU for this state."""
        if event is Event.Evt19 and self._abort is not None:
            return self._abort
        self._detail = f"{event.value} in {self.state.name}"
        return P.Abort(P.ABORT_SOURCE_PROVIDER, P.ABORT_UNEXPECTED_PDU)

    def _aa1(self, event, arg):
        # Evt15 is our user's abort; in Sta2 the other events are a peer
        # that sent something other than A-ASSOCIATE-RQ: a provider abort.
        if event is Event.Evt15:
            abort = self._abort or P.Abort(P.ABORT_SOURCE_USER, P.ABORT_REASON_NOT_SPECIFIED)
        else:
            abort = self._provider_abort(event)
        if abort.source != P.ABORT_SOURCE_PROVIDER:
            return [_send(abort), _START]
        return [_send(abort), _START, AbortIndication(abort.source, abort.reason, True, True, self._detail)]

    def _aa2(self, event, arg):
        if event is Event.Evt16 and self.state is State.Sta2:
            return [_STOP, _CLOSE, AbortIndication(arg.source, arg.reason, arg.source == P.ABORT_SOURCE_PROVIDER)]
        return [_STOP, _CLOSE]

    def _aa8(self, event, arg):
        abort = self._provider_abort(event)
        return [_send(abort), AbortIndication(abort.source, abort.reason, True, True, self._detail), _START]


def _ignore(context_id, control, data, end):
    pass


def _send(pdu) -> Send:
    return Send(encode_pdu(pdu))


#: PS3.8 Tables 9-6 to 9-9: what each action does, as the effects it returns
#: (``a`` the association, ``e`` the event, then what came with it: a PDU,
#: or the bytes of one to send).  The next state is the one fsm.ACTIONS
#: names; AE-6 and AR-8 choose between two.
_ACTIONS = {
    "AE-1": lambda a, e, x: [CONNECT_TRANSPORT],
    "AE-2": lambda a, e, x: [_send(a._pending)],
    "AE-3": Association._ae3,
    "AE-4": lambda a, e, rj: [AssociateConfirmation(rj), _CLOSE],
    "AE-5": lambda a, e, x: [_START],
    "AE-6": Association._ae6,
    "AE-7": lambda a, e, ac: [_send(ac)],
    "AE-8": lambda a, e, rj: [_send(rj), _START],
    "DT-1": lambda a, e, data: [Send(data)],
    "DT-2": lambda a, e, pdu: [],  # the data went to the sink as they came (_stream)
    "AR-1": lambda a, e, x: [_send(P.ReleaseRQ())],
    "AR-2": lambda a, e, x: [ReleaseIndication()],
    "AR-3": lambda a, e, x: [RELEASE_CONFIRMATION, _CLOSE],
    "AR-4": lambda a, e, x: [_send(P.ReleaseRP()), _START],
    "AR-5": lambda a, e, x: [_STOP],
    "AR-6": lambda a, e, pdu: [],  # likewise
    "AR-7": lambda a, e, data: [Send(data)],
    "AR-8": Association._ar8,
    "AR-9": lambda a, e, x: [_send(P.ReleaseRP())],
    "AR-10": lambda a, e, x: [RELEASE_CONFIRMATION],
    "AA-1": Association._aa1,
    "AA-2": Association._aa2,
    "AA-3": lambda a, e, abort: [AbortIndication(abort.source, abort.reason,
                                                 abort.source == P.ABORT_SOURCE_PROVIDER), _CLOSE],
    "AA-4": lambda a, e, x: [AbortIndication(P.ABORT_SOURCE_PROVIDER, P.ABORT_REASON_NOT_SPECIFIED, True,
                                             detail="transport connection closed")],
    "AA-5": lambda a, e, x: [_STOP],
    "AA-6": lambda a, e, x: [],
    "AA-7": lambda a, e, x: [_send(a._provider_abort(e))],
    "AA-8": Association._aa8,
}
assert _ACTIONS.keys() == ACTIONS.keys()

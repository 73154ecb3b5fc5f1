"""PS3.8 Table 9-10, cell by cell, through the association core."""

from __future__ import annotations

from twisted.trial import unittest

from gateway.ul import fsm
from gateway.ul.fsm import Event, State
from gateway.ul import Association, InvalidPrimitive, Send
from gateway.ul import (
    Abort,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    PDataTF,
    PDV,
    PresentationContextAC,
    PresentationContextRQ,
    ReleaseRP,
    ReleaseRQ,
    encode_pdata,
    encode_pdu,
)

RQ = AssociateRQ("SCP", "SCU", (PresentationContextRQ(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),))
AC = AssociateAC("SCP", "SCU", (PresentationContextAC(1, 0, "1.2.840.10008.1.2"),))
RJ = AssociateRJ(1, 1, 7)
PDATA = encode_pdu(PDataTF((PDV(1, 3, b"\x00\x01"),)))

RECEIVED = {
    Event.Evt3: encode_pdu(AC),
    Event.Evt4: encode_pdu(RJ),
    Event.Evt6: encode_pdu(RQ),
    Event.Evt10: PDATA,
    Event.Evt12: encode_pdu(ReleaseRQ()),
    Event.Evt13: encode_pdu(ReleaseRP()),
    Event.Evt16: encode_pdu(Abort(0, 0)),
    Event.Evt19: b"\x09\x00\x00\x00\x00\x00",  # no such PDU type
}

LOCAL = {
    Event.Evt1: lambda a: a.request(RQ),
    Event.Evt2: lambda a: a.connection_made(),
    Event.Evt5: lambda a: a.connection_made(),
    Event.Evt7: lambda a: a.accept(AC),
    Event.Evt8: lambda a: a.reject(RJ),
    Event.Evt9: lambda a: a.send_pdata(encode_pdata(1, 3, b"\x00")),
    Event.Evt11: lambda a: a.release_request(),
    Event.Evt14: lambda a: a.release_response(),
    Event.Evt15: lambda a: a.abort(),
    Event.Evt17: lambda a: a.connection_lost(),
    Event.Evt18: lambda a: a.artim_expired(),
}


def fire(event: Event, state: State, requestor: bool):
    requestor = event is Event.Evt2 or (requestor and event is not Event.Evt5)
    a = Association(requestor=requestor, max_pdu_length=16384)
    a.state = state
    a._pending = RQ
    if event in RECEIVED:
        effects = a.receive_data(RECEIVED[event])
    else:
        effects = LOCAL[event](a)
    return a, effects


class StateTableTests(unittest.TestCase):
    def test_every_cell_leads_where_the_standard_says(self):
        for (event, state), action in fsm.TABLE.items():
            targets = fsm.ACTIONS[action][1]
            for requestor in (False, True):
                a, _ = fire(event, state, requestor)
                self.assertIn(a.state, targets, f"{event.name} in {state.name} ({action})")
            if len(targets) == 1:
                self.assertEqual(a.state, targets[0])

    def test_two_way_actions(self):
        # AE-6: acceptable -> Sta3; protocol version without bit 0 -> Sta13 with RJ (ACSE, reason 2)
        a, _ = fire(Event.Evt6, State.Sta2, False)
        self.assertEqual(a.state, State.Sta3)
        a = Association(False, 16384)
        a.state = State.Sta2
        bad = encode_pdu(AssociateRQ("SCP", "SCU", RQ.presentation_contexts, protocol_version=2))
        effects = a.receive_data(bad)
        self.assertEqual(a.state, State.Sta13)
        sent = [e.data for e in effects if isinstance(e, Send)]
        self.assertEqual(sent, [bytes.fromhex("03000000000400010202")])
        # AR-8: release collision, requestor -> Sta9, acceptor -> Sta10
        self.assertEqual(fire(Event.Evt12, State.Sta7, True)[0].state, State.Sta9)
        self.assertEqual(fire(Event.Evt12, State.Sta7, False)[0].state, State.Sta10)

    def test_empty_cells_for_local_primitives_are_refused(self):
        for event, call in LOCAL.items():
            if event in (Event.Evt15, Event.Evt17, Event.Evt18, Event.Evt2, Event.Evt5):
                continue  # tolerated everywhere by design (see Association)
            for state in State:
                if (event, state) in fsm.TABLE:
                    continue
                a = Association(False, 16384)
                a.state = state
                a._pending = RQ
                self.assertRaises(InvalidPrimitive, call, a)

    def test_grid_is_complete_for_received_pdus(self):
        # Every state with an open connection has a cell for every PDU event.
        for n in (3, 4, 6, 10, 12, 13, 16, 17, 19):
            for state in State:
                if state not in (State.Sta1, State.Sta4):
                    self.assertIn((Event[f"Evt{n}"], state), fsm.TABLE)

    def test_matches_an_independent_transcription(self):
        """pynetdicom (a test peer) transcribed Table 9-10 independently."""
        try:
            from pynetdicom.fsm import TRANSITION_TABLE
        except ImportError:
            raise unittest.SkipTest("pynetdicom not installed")
        theirs = {(s, e): a for (e, s), a in TRANSITION_TABLE.items()}
        ours = {(s.name, e.name): a for (e, s), a in fsm.TABLE.items()}
        self.assertEqual(ours, theirs)

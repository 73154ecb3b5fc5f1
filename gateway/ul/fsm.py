"""PS3.8 section 9.2: the DICOM upper-layer state machine, as data.

``TABLE`` is Table 9-10 transcribed as a grid with the same rows (events) and
columns (states) as the standard, so it can be checked cell by cell.  ``.``
is an empty cell: the event cannot happen in that state (for a received PDU
that never happens, the standard fills every reachable cell).

``ACTIONS`` gives, for every action of Tables 9-6 to 9-9, its text and the
state it leads to.  Three actions choose between two next states; their
entries name both and :mod:`gateway.ul.association` picks one:

- AE-6: Sta3 if the request is acceptable to the service provider, else Sta13;
- AR-8: Sta9 for the association-requestor, Sta10 for the acceptor;
- AA-3, AA-8 etc. have one next state each.

States and events are Enums named as the standard names them (``State.Sta6``,
``Event.Evt10``), their values the standard's descriptions.  Code outside
this package never compares states: it asks the core's predicates
(``can_send_data`` and the like).

Nothing here performs I/O; the association core turns actions into effects.
"""

from __future__ import annotations

from enum import Enum

_STATES: dict[str, str] = {
    "Sta1": "Idle",
    "Sta2": "Transport connection open (awaiting A-ASSOCIATE-RQ PDU)",
    "Sta3": "Awaiting local A-ASSOCIATE response primitive",
    "Sta4": "Awaiting transport connection opening to complete",
    "Sta5": "Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU",
    "Sta6": "Association established and ready for data transfer",
    "Sta7": "Awaiting A-RELEASE-RP PDU",
    "Sta8": "Awaiting local A-RELEASE response primitive",
    "Sta9": "Release collision requestor side; awaiting A-RELEASE response",
    "Sta10": "Release collision acceptor side; awaiting A-RELEASE-RP PDU",
    "Sta11": "Release collision requestor side; awaiting A-RELEASE-RP PDU",
    "Sta12": "Release collision acceptor side; awaiting A-RELEASE response primitive",
    "Sta13": "Awaiting Transport Connection Close Indication",
}

_EVENTS: dict[str, str] = {
    "Evt1": "A-ASSOCIATE request (local user)",
    "Evt2": "Transport connect confirmation (local transport service)",
    "Evt3": "A-ASSOCIATE-AC PDU (received on transport connection)",
    "Evt4": "A-ASSOCIATE-RJ PDU (received on transport connection)",
    "Evt5": "Transport connection indication (local transport service)",
    "Evt6": "A-ASSOCIATE-RQ PDU (received on transport connection)",
    "Evt7": "A-ASSOCIATE response primitive (accept)",
    "Evt8": "A-ASSOCIATE response primitive (reject)",
    "Evt9": "P-DATA request primitive",
    "Evt10": "P-DATA-TF PDU",
    "Evt11": "A-RELEASE request primitive",
    "Evt12": "A-RELEASE-RQ PDU (received on open transport connection)",
    "Evt13": "A-RELEASE-RP PDU (received on transport connection)",
    "Evt14": "A-RELEASE response primitive",
    "Evt15": "A-ABORT request primitive",
    "Evt16": "A-ABORT PDU (received on open transport connection)",
    "Evt17": "Transport connection closed indication (local transport service)",
    "Evt18": "ARTIM timer expired (Association reject/release timer)",
    "Evt19": "Unrecognized or invalid PDU received",
}

State = Enum("State", [(name, text) for name, text in _STATES.items()], module=__name__)
State.__doc__ = "The states of PS3.8 Table 9-10; each value is the standard's description."
Event = Enum("Event", [(name, text) for name, text in _EVENTS.items()], module=__name__)
Event.__doc__ = "The events of PS3.8 Table 9-10; each value is the standard's description."

# action: (what the standard says it does, next state or states)
_ACTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "AE-1": ("Issue TRANSPORT CONNECT request primitive to local transport service", ("Sta4",)),
    "AE-2": ("Send A-ASSOCIATE-RQ-PDU", ("Sta5",)),
    "AE-3": ("Issue A-ASSOCIATE confirmation (accept) primitive", ("Sta6",)),
    "AE-4": ("Issue A-ASSOCIATE confirmation (reject) primitive and close transport connection", ("Sta1",)),
    "AE-5": ("Issue Transport connection response primitive; start ARTIM timer", ("Sta2",)),
    "AE-6": (
        "Stop ARTIM timer and if A-ASSOCIATE-RQ acceptable by service-provider: issue "
        "A-ASSOCIATE indication primitive; otherwise issue A-ASSOCIATE-RJ-PDU and start ARTIM timer",
        ("Sta3", "Sta13"),
    ),
    "AE-7": ("Send A-ASSOCIATE-AC PDU", ("Sta6",)),
    "AE-8": ("Send A-ASSOCIATE-RJ PDU and start ARTIM timer", ("Sta13",)),
    "DT-1": ("Send P-DATA-TF PDU", ("Sta6",)),
    "DT-2": ("Send P-DATA indication primitive", ("Sta6",)),
    "AR-1": ("Send A-RELEASE-RQ PDU", ("Sta7",)),
    "AR-2": ("Issue A-RELEASE indication primitive", ("Sta8",)),
    "AR-3": ("Issue A-RELEASE confirmation primitive, and close transport connection", ("Sta1",)),
    "AR-4": ("Issue A-RELEASE-RP PDU and start ARTIM timer", ("Sta13",)),
    "AR-5": ("Stop ARTIM timer", ("Sta1",)),
    "AR-6": ("Issue P-DATA indication", ("Sta7",)),
    "AR-7": ("Issue P-DATA-TF PDU", ("Sta8",)),
    "AR-8": ("Issue A-RELEASE indication (release collision)", ("Sta9", "Sta10")),
    "AR-9": ("Send A-RELEASE-RP PDU", ("Sta11",)),
    "AR-10": ("Issue A-RELEASE confirmation primitive", ("Sta12",)),
    "AA-1": ("Send A-ABORT PDU (service-user source) and start (or restart if already started) ARTIM timer", ("Sta13",)),
    "AA-2": ("Stop ARTIM timer if running. Close transport connection", ("Sta1",)),
    "AA-3": (
        "If (service-user initiated abort): issue A-ABORT indication and close transport connection; "
        "otherwise (service-provider initiated abort): issue A-P-ABORT indication and close transport connection",
        ("Sta1",),
    ),
    "AA-4": ("Issue A-P-ABORT indication primitive", ("Sta1",)),
    "AA-5": ("Stop ARTIM timer", ("Sta1",)),
    "AA-6": ("Ignore PDU", ("Sta13",)),
    "AA-7": ("Send A-ABORT PDU", ("Sta13",)),
    "AA-8": ("Send A-ABORT PDU (service-provider source), issue an A-P-ABORT indication, and start ARTIM timer", ("Sta13",)),
}

# PS3.8 Table 9-10, row by row.  Columns are Sta1 .. Sta13.
_GRID = """
        Sta1  Sta2  Sta3  Sta4  Sta5  Sta6  Sta7  Sta8  Sta9  Sta10 Sta11 Sta12 Sta13
Evt1    AE-1  .     .     .     .     .     .     .     .     .     .     .     .
Evt2    .     .     .     AE-2  .     .     .     .     .     .     .     .     .
Evt3    .     AA-1  AA-8  .     AE-3  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt4    .     AA-1  AA-8  .     AE-4  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt5    AE-5  .     .     .     .     .     .     .     .     .     .     .     .
Evt6    .     AE-6  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7
Evt7    .     .     AE-7  .     .     .     .     .     .     .     .     .     .
Evt8    .     .     AE-8  .     .     .     .     .     .     .     .     .     .
Evt9    .     .     .     .     .     DT-1  .     AR-7  .     .     .     .     .
Evt10   .     AA-1  AA-8  .     AA-8  DT-2  AR-6  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt11   .     .     .     .     .     AR-1  .     .     .     .     .     .     .
Evt12   .     AA-1  AA-8  .     AA-8  AR-2  AR-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt13   .     AA-1  AA-8  .     AA-8  AA-8  AR-3  AA-8  AA-8  AR-10 AR-3  AA-8  AA-6
Evt14   .     .     .     .     .     .     .     AR-4  AR-9  .     .     AR-4  .
Evt15   .     .     AA-1  AA-2  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  .
Evt16   .     AA-2  AA-3  .     AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-2
Evt17   .     AA-5  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AR-5
Evt18   .     AA-2  .     .     .     .     .     .     .     .     .     .     AA-2
Evt19   .     AA-1  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7
"""


ACTIONS: dict[str, tuple[str, tuple[State, ...]]] = {
    name: (text, tuple(State[s] for s in states)) for name, (text, states) in _ACTIONS.items()
}


def _parse(grid: str) -> dict[tuple[Event, State], str]:
    lines = [line.split() for line in grid.strip().splitlines()]
    header, rows = lines[0], lines[1:]
    table = {}
    for row in rows:
        event, cells = row[0], row[1:]
        assert len(cells) == len(header), event
        for state, action in zip(header, cells):
            if action != ".":
                table[(Event[event], State[state])] = action
    return table


TABLE: dict[tuple[Event, State], str] = _parse(_GRID)

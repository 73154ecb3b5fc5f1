"""The DICOM upper layer (PS3.8), sans-I/O: PDUs, their codec, the state table
and the association core.  No Twisted anywhere below this package.

The public names are re-exported here:

- :mod:`gateway.ul.pdu`: PDU and item types, PS3.8 constants, :class:`PDUError`;
- ``decode_pdu``, ``encode_pdu``, ``encode_pdata``: the codec;
- :mod:`gateway.ul.fsm`: ``State``, ``Event`` and Table 9-10;
- :mod:`gateway.ul.events`: the effects the core returns;
- :class:`Association`: the core of one association.

The codec modules import the types, never the other way round.
"""

from gateway.ul.pdu import *  # noqa: F401,F403
from gateway.ul.pdu import __all__ as _pdu_names
from gateway.ul._decode import decode_pdu
from gateway.ul._encode import encode_pdata, encode_pdu
from gateway.ul.association import MAX_ASSOCIATION_PDU, Association, InvalidPrimitive
from gateway.ul.events import (
    AbortIndication,
    AssociateConfirmation,
    AssociateIndication,
    CloseTransport,
    ConnectTransport,
    ReleaseConfirmation,
    ReleaseIndication,
    Send,
    StartARTIM,
    StopARTIM,
)
from gateway.ul.fsm import Event, State

__all__ = list(_pdu_names) + [
    "decode_pdu", "encode_pdu", "encode_pdata", "Association", "InvalidPrimitive",
    "MAX_ASSOCIATION_PDU", "State", "Event", "Send", "StartARTIM", "StopARTIM", "CloseTransport",
    "ConnectTransport", "AssociateIndication", "AssociateConfirmation",
    "ReleaseIndication", "ReleaseConfirmation", "AbortIndication",
]

"""What the association core hands back: effects for the caller to carry out.

Only types live here (as h11 keeps its events apart from the machine):
:class:`gateway.ul.association.Association` returns lists of these and the
Twisted adapter (:mod:`gateway.net.protocol`) carries them out in order.
Timer and transport effects say what to do to the connection; indications
are the PS3.8 primitives for the service user (but P-DATA, whose data go to
the core's sink as they arrive).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.ul.pdu import AssociateAC, AssociateRJ, AssociateRQ


@dataclass(frozen=True)
class Send:
    """Write these bytes (whole PDUs) to the transport."""

    data: bytes


class StartARTIM:
    """Start (or restart) the ARTIM timer."""


class StopARTIM:
    """Stop the ARTIM timer."""


class CloseTransport:
    """Close the transport connection."""


class ConnectTransport:
    """Open the transport connection (requestor, AE-1)."""


@dataclass(frozen=True)
class AssociateIndication:
    """A-ASSOCIATE indication: the peer asks; answer with accept() or reject()."""

    request: AssociateRQ


@dataclass(frozen=True)
class AssociateConfirmation:
    """A-ASSOCIATE confirmation, requestor side: the peer's A-ASSOCIATE-AC
    (accept) or A-ASSOCIATE-RJ (reject)."""

    response: AssociateAC | AssociateRJ

    @property
    def accepted(self) -> bool:
        return isinstance(self.response, AssociateAC)


@dataclass(frozen=True)
class ReleaseIndication:
    """A-RELEASE indication; ``collision`` when both sides asked at once (PS3.8 9.2.5)."""

    collision: bool = False


class ReleaseConfirmation:
    """A-RELEASE confirmation, requestor side."""


@dataclass(frozen=True)
class AbortIndication:
    """A-ABORT (peer user, ``provider`` false) or A-P-ABORT (``provider`` true).

    ``local`` is true when the provider abort was raised here (we sent the
    A-ABORT because of the peer's protocol error), false when the peer
    aborted or the connection was lost.
    """

    source: int
    reason: int
    provider: bool
    local: bool = False
    detail: str = ""


START_ARTIM, STOP_ARTIM, CLOSE_TRANSPORT = StartARTIM(), StopARTIM(), CloseTransport()
CONNECT_TRANSPORT, RELEASE_CONFIRMATION = ConnectTransport(), ReleaseConfirmation()

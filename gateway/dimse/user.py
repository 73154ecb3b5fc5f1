"""What the SCP's and the SCU's service users share, sans-I/O.

:class:`DIMSEUser` is the part of an :class:`~gateway.interfaces.IAssociationUser`
that is the same on both sides: it keeps the provider (the upper layer),
turns the PDV data the upper layer streams into DIMSE messages with a
:class:`MessageAssembler` (commands decoded, data set pieces passed on as
views) and sends
commands cut to the peer's Maximum Length, which the upper layer keeps.
Subclasses say what a command and a data set fragment mean to them, and
what to do when the peer breaks PS3.7 (:meth:`dimse_error`: the
association is aborted).
"""

from __future__ import annotations

from zope.interface import implementer

from gateway.dimse.commands import Command, encode_command
from gateway.dimse.message import MessageAssembler, fragment_message
from gateway.interfaces import IAssociationUser
from gateway.ul import ABORT_INVALID_PDU_PARAMETER_VALUE


@implementer(IAssociationUser)
class DIMSEUser:
    """``contexts`` maps the presentation context ids DIMSE may use to
    (abstract syntax, transfer syntax); it may be filled in later (the
    SCP's, once it has negotiated)."""

    def __init__(self, contexts: dict):
        self.provider = None  # the IAssociationProvider, from connection_made
        self.contexts = contexts
        self.assembler = MessageAssembler(self, contexts)

    # ---- what the subclass says ------------------------------------------

    def command_received(self, command: Command, context_id: int) -> None:
        raise NotImplementedError

    def data_received(self, data, last: bool) -> None:
        """A piece of the data set after the last command (a view, valid
        during the call; ``last`` on the final piece); ignored unless overridden."""

    def dimse_error(self, detail: str) -> None:
        """The peer broke PS3.7: abort (a subclass may log or fail work first)."""
        self.provider.provider_abort(ABORT_INVALID_PDU_PARAMETER_VALUE, detail)

    # ---- IAssociationUser: the part both sides share -------------------------

    def connection_made(self, provider) -> None:
        self.provider = provider

    def pdv_received(self, context_id: int, control: int, data, end: bool) -> None:
        self.assembler.pdv(context_id, control, data, end)

    def send_command(self, context_id: int, command: Command) -> None:
        provider = self.provider
        for pdu_bytes in fragment_message(context_id, encode_command(command), provider.peer_max_pdu):
            provider.send_pdata(pdu_bytes)

    def association_request(self):
        raise NotImplementedError("only a requestor sends an A-ASSOCIATE-RQ")

    def associate_indication(self, rq) -> None:
        raise NotImplementedError("only an acceptor receives an A-ASSOCIATE-RQ")

    def associate_accepted(self, ac) -> None:
        pass

    def associate_rejected(self, rj) -> None:
        pass

    def release_indication(self, collision) -> None:
        self.provider.release_response()

    def release_confirmation(self) -> None:
        pass

    def aborted(self, indication) -> None:
        pass

    def closed(self, reason) -> None:
        pass

    def owes_response(self) -> bool:
        return False

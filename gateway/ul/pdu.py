"""PS3.8 section 9.3: the upper-layer PDUs and their items, as frozen values.

Pure: no I/O, no Twisted, and no import of the codec, which imports these:
``gateway.ul.decode_pdu(pdu_type, body)`` turns the body of one PDU
(everything after the 6-byte header) into one of the classes below and
``gateway.ul.encode_pdu(pdu)`` turns one back into bytes, header included.
Anything that is not a well-formed PDU raises :class:`PDUError`, never
another exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

__all__ = [
    "A_ASSOCIATE_RQ",
    "A_ASSOCIATE_AC",
    "A_ASSOCIATE_RJ",
    "P_DATA_TF",
    "A_RELEASE_RQ",
    "A_RELEASE_RP",
    "A_ABORT",
    "PDU_TYPES",
    "ABORT_SOURCE_USER",
    "ABORT_SOURCE_PROVIDER",
    "ABORT_REASON_NOT_SPECIFIED",
    "ABORT_UNRECOGNIZED_PDU",
    "ABORT_UNEXPECTED_PDU",
    "ABORT_UNRECOGNIZED_PDU_PARAMETER",
    "ABORT_UNEXPECTED_PDU_PARAMETER",
    "ABORT_INVALID_PDU_PARAMETER_VALUE",
    "RJ_PERMANENT",
    "RJ_TRANSIENT",
    "RJ_SOURCE_USER",
    "RJ_SOURCE_ACSE",
    "RJ_SOURCE_PRESENTATION",
    "RJ_USER_NO_REASON",
    "RJ_USER_APP_CONTEXT_NOT_SUPPORTED",
    "RJ_USER_CALLING_AE_NOT_RECOGNIZED",
    "RJ_USER_CALLED_AE_NOT_RECOGNIZED",
    "RJ_ACSE_NO_REASON",
    "RJ_ACSE_PROTOCOL_VERSION_NOT_SUPPORTED",
    "RJ_PRES_TEMPORARY_CONGESTION",
    "RJ_PRES_LOCAL_LIMIT_EXCEEDED",
    "PC_ACCEPTANCE",
    "PC_USER_REJECTION",
    "PC_NO_REASON",
    "PC_ABSTRACT_SYNTAX_NOT_SUPPORTED",
    "PC_TRANSFER_SYNTAXES_NOT_SUPPORTED",
    "DICOM_APPLICATION_CONTEXT",
    "PDU",
    "PDUError",
    "PresentationContextRQ",
    "PresentationContextAC",
    "RoleSelection",
    "ExtendedNegotiation",
    "CommonExtendedNegotiation",
    "UserIdentityRQ",
    "UserIdentityAC",
    "UnknownItem",
    "UserInformation",
    "AssociateRQ",
    "AssociateAC",
    "AssociateRJ",
    "PDV",
    "PDataTF",
    "ReleaseRQ",
    "ReleaseRP",
    "Abort",
]

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

PDU_TYPES = frozenset(range(0x01, 0x08))

# A-ABORT source (PS3.8 Table 9-26)
ABORT_SOURCE_USER = 0
ABORT_SOURCE_PROVIDER = 2

# A-ABORT provider reasons (PS3.8 Table 9-26)
ABORT_REASON_NOT_SPECIFIED = 0
ABORT_UNRECOGNIZED_PDU = 1
ABORT_UNEXPECTED_PDU = 2
ABORT_UNRECOGNIZED_PDU_PARAMETER = 4
ABORT_UNEXPECTED_PDU_PARAMETER = 5
ABORT_INVALID_PDU_PARAMETER_VALUE = 6

# A-ASSOCIATE-RJ result / source / reason (PS3.8 Table 9-21)
RJ_PERMANENT = 1
RJ_TRANSIENT = 2
RJ_SOURCE_USER = 1
RJ_SOURCE_ACSE = 2  # service-provider (ACSE related function)
RJ_SOURCE_PRESENTATION = 3  # service-provider (presentation related function)
# source 1 (service-user)
RJ_USER_NO_REASON = 1
RJ_USER_APP_CONTEXT_NOT_SUPPORTED = 2
RJ_USER_CALLING_AE_NOT_RECOGNIZED = 3
RJ_USER_CALLED_AE_NOT_RECOGNIZED = 7
# source 2 (ACSE)
RJ_ACSE_NO_REASON = 1
RJ_ACSE_PROTOCOL_VERSION_NOT_SUPPORTED = 2
# source 3 (presentation)
RJ_PRES_TEMPORARY_CONGESTION = 1
RJ_PRES_LOCAL_LIMIT_EXCEEDED = 2

# Presentation context results (PS3.8 Table 9-18)
PC_ACCEPTANCE = 0
PC_USER_REJECTION = 1
PC_NO_REASON = 2
PC_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
PC_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


class PDUError(ValueError):
    """A PDU or item that cannot be decoded.

    ``reason`` is the A-ABORT provider reason a receiver should send
    (one of the ``ABORT_*`` codes above).
    """

    def __init__(self, message: str, reason: int = ABORT_INVALID_PDU_PARAMETER_VALUE):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PresentationContextRQ:
    """A proposed presentation context (PS3.8 Table 9-13): an odd ``id``, the
    abstract syntax, and the transfer syntaxes in the requestor's order."""

    id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class PresentationContextAC:
    """The answer to one proposed context (PS3.8 Table 9-18): a ``PC_*``
    result and, when accepted, the transfer syntax chosen."""

    id: int
    result: int
    transfer_syntax: str = ""  # not significant unless result == PC_ACCEPTANCE


@dataclass(frozen=True)
class RoleSelection:
    """SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4); each role is 0 or 1."""

    sop_class_uid: str
    scu_role: int
    scp_role: int


@dataclass(frozen=True)
class ExtendedNegotiation:
    """SOP Class Extended Negotiation sub-item (PS3.7 D.3.3.5): ``info`` is the
    service-class application information, uninterpreted."""

    sop_class_uid: str
    info: bytes


@dataclass(frozen=True)
class CommonExtendedNegotiation:
    """SOP Class Common Extended Negotiation sub-item (PS3.7 D.3.3.6)."""

    sop_class_uid: str
    service_class_uid: str
    related_general_sop_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class UserIdentityRQ:
    """User Identity negotiation, as requested (PS3.7 D.3.3.7.1): the type
    (1 username, 2 with passcode, 3 Kerberos, 4 SAML, 5 JWT) and its fields."""

    identity_type: int
    positive_response_requested: bool
    primary_field: bytes
    secondary_field: bytes = b""


@dataclass(frozen=True)
class UserIdentityAC:
    """User Identity negotiation, as answered (PS3.7 D.3.3.7.2)."""

    server_response: bytes


@dataclass(frozen=True)
class UnknownItem:
    """A sub-item of User Information we do not know; kept, never acted on."""

    item_type: int
    data: bytes


@dataclass(frozen=True)
class UserInformation:
    """The User Information item (PS3.8 9.3.2.3, Annex D; PS3.7 D.3.3):
    ``None`` where the sub-item is absent, empty tuples where none came."""

    max_length: int | None = None
    implementation_class_uid: str | None = None
    implementation_version_name: str | None = None
    async_ops: tuple[int, int] | None = None  # (max invoked, max performed)
    role_selections: tuple[RoleSelection, ...] = ()
    extended_negotiations: tuple[ExtendedNegotiation, ...] = ()
    common_extended_negotiations: tuple[CommonExtendedNegotiation, ...] = ()
    user_identity: UserIdentityRQ | UserIdentityAC | None = None
    unknown: tuple[UnknownItem, ...] = ()


@dataclass(frozen=True)
class _Associate:
    """The fields the A-ASSOCIATE-RQ and -AC share (PS3.8 Tables 9-11, 9-17)."""

    called_ae: str
    calling_ae: str
    presentation_contexts: tuple
    user_information: UserInformation = field(default_factory=UserInformation)
    application_context: str = DICOM_APPLICATION_CONTEXT
    protocol_version: int = 1


@dataclass(frozen=True)
class AssociateRQ(_Associate):
    """``presentation_contexts`` are :class:`PresentationContextRQ` items."""


@dataclass(frozen=True)
class AssociateAC(_Associate):
    """``presentation_contexts`` are :class:`PresentationContextAC` items."""


@dataclass(frozen=True)
class AssociateRJ:
    """A-ASSOCIATE-RJ (PS3.8 Table 9-21): the ``RJ_*`` result, source and reason."""

    result: int
    source: int
    reason: int


@dataclass(frozen=True)
class PDV:
    """One presentation data value item.

    ``control`` is the message control header: bit 0 set = command,
    bit 1 set = last fragment.  ``data`` may be a memoryview into the
    received PDU body (no copy on the receive path).
    """

    context_id: int
    control: int
    data: Union[bytes, memoryview]

    @property
    def is_command(self) -> bool:
        return bool(self.control & 0x01)

    @property
    def is_last(self) -> bool:
        return bool(self.control & 0x02)


@dataclass(frozen=True)
class PDataTF:
    """P-DATA-TF (PS3.8 Table 9-22): one or more PDVs."""

    pdvs: tuple[PDV, ...]


@dataclass(frozen=True)
class ReleaseRQ:
    """A-RELEASE-RQ (PS3.8 Table 9-24); it carries nothing."""


@dataclass(frozen=True)
class ReleaseRP:
    """A-RELEASE-RP (PS3.8 Table 9-25); it carries nothing."""


@dataclass(frozen=True)
class Abort:
    """A-ABORT (PS3.8 Table 9-26): ``ABORT_SOURCE_*`` and, for the provider,
    an ``ABORT_*`` reason (not significant when the source is the user)."""

    source: int
    reason: int


PDU = Union[AssociateRQ, AssociateAC, AssociateRJ, PDataTF, ReleaseRQ, ReleaseRP, Abort]


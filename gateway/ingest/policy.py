"""Association policy: who may associate, on which port, with what.

Pure functions of the configuration and the request; the SCP asks them and
carries out the answer.  PS3.8 Table 9-21 gives the A-ASSOCIATE-RJ fields:

=============================================  ======  ======  ======
why                                            result  source  reason
=============================================  ======  ======  ======
application context name not supported         1       1       2
called AE title not configured (or TLS-only)   1       1       7
calling AE title malformed or not a source     1       1       3
``max_associations`` reached                   2       3       2
storage over the watermark / under reserve     2       3       1
=============================================  ======  ======  ======
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from gateway.dimse.sop import VERIFICATION, is_storage_sop_class, is_valid_uid
from gateway import ul as P

# PS3.5 Table 6.2-1, AE: default repertoire without backslash or control codes.
AE_REPERTOIRE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


@dataclass(frozen=True)
class Reject:
    result: int
    source: int
    reason: int
    why: str

    @property
    def rj(self) -> P.AssociateRJ:
        return P.AssociateRJ(self.result, self.source, self.reason)

    def describe(self) -> str:
        result = "permanent" if self.result == P.RJ_PERMANENT else "transient"
        source = {P.RJ_SOURCE_USER: "service-user", P.RJ_SOURCE_ACSE: "service-provider (ACSE)",
                  P.RJ_SOURCE_PRESENTATION: "service-provider (presentation)"}[self.source]
        return f"{self.why} ({result}, {source}, reason {self.reason})"


def _user(reason, why):
    return Reject(P.RJ_PERMANENT, P.RJ_SOURCE_USER, reason, why)


def _host(peer_host: str | None):
    if not peer_host:
        return None
    try:
        return ipaddress.ip_address(peer_host)
    except ValueError:
        return None


def matching_sources(config, calling_ae: str, peer_host: str | None) -> set[str]:
    """The ``[[source]]`` AE titles this calling AE title and address match."""
    host = _host(peer_host)
    names = set()
    for source in config.source:
        if source.ae_title != calling_ae:
            continue
        if source.host is not None:
            if host is None:
                continue
            # An IPv4 peer may show up as an IPv4-mapped IPv6 address.
            if host.version == 6 and host.ipv4_mapped is not None:
                host = host.ipv4_mapped
            if host.version != source.host.version or host not in source.host:
                continue
        names.add(source.ae_title)
    return names


def check_association(config, rq: P.AssociateRQ, *, peer_host: str | None, tls: bool,
                      active: int, congestion: str | None, index_trouble: str | None = None) -> Reject | None:
    """None to go on negotiating, or why (and how) to reject."""
    if rq.application_context != P.DICOM_APPLICATION_CONTEXT:
        return _user(P.RJ_USER_APP_CONTEXT_NOT_SUPPORTED, f"application context {rq.application_context!r}")
    ae = config.ae_named(rq.called_ae)
    if ae is None:
        return _user(P.RJ_USER_CALLED_AE_NOT_RECOGNIZED, f"called AE title {rq.called_ae!r} is not configured")
    if ae.tls_only and not tls:
        return _user(P.RJ_USER_CALLED_AE_NOT_RECOGNIZED,
                     f"called AE title {rq.called_ae!r} is served on the TLS port only")
    calling = rq.calling_ae
    if not AE_REPERTOIRE.match(calling):
        return _user(P.RJ_USER_CALLING_AE_NOT_RECOGNIZED, f"calling AE title {calling!r} is not a valid AE title")
    if config.gateway.reject_unknown_sources or ae.sources is not None:
        known = matching_sources(config, calling, peer_host)
        if config.gateway.reject_unknown_sources and not known:
            return _user(P.RJ_USER_CALLING_AE_NOT_RECOGNIZED,
                         f"calling AE title {calling!r} from {peer_host} matches no [[source]]")
        if ae.sources is not None and not known.intersection(ae.sources):
            return _user(P.RJ_USER_CALLING_AE_NOT_RECOGNIZED,
                         f"calling AE title {calling!r} from {peer_host} may not call {ae.title!r}")
    if active >= config.gateway.max_associations:
        return Reject(P.RJ_TRANSIENT, P.RJ_SOURCE_PRESENTATION, P.RJ_PRES_LOCAL_LIMIT_EXCEEDED,
                      f"{active} associations open (max_associations = {config.gateway.max_associations})")
    if congestion:
        return Reject(P.RJ_TRANSIENT, P.RJ_SOURCE_PRESENTATION, P.RJ_PRES_TEMPORARY_CONGESTION,
                      f"storage: {congestion}")
    if index_trouble:
        return Reject(P.RJ_TRANSIENT, P.RJ_SOURCE_PRESENTATION, P.RJ_PRES_TEMPORARY_CONGESTION,
                      f"index: {index_trouble}")
    return None


def negotiate(ae, pc: P.PresentationContextRQ) -> tuple[int, str]:
    """(result, transfer syntax) for one proposed presentation context."""
    abstract = pc.abstract_syntax
    if abstract != VERIFICATION:
        if not is_storage_sop_class(abstract):  # nor a UID at all, as the peer may send
            return P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, pc.transfer_syntaxes[0]
        if ae is not None and ae.allowed_sop_classes is not None and abstract not in ae.allowed_sop_classes:
            return P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, pc.transfer_syntaxes[0]
    allowed = ae.transfer_syntaxes if ae is not None and abstract != VERIFICATION else None
    # The first acceptable transfer syntax is the requestor's own encoding:
    # taking it means storing exactly what the modality produced.
    for ts in pc.transfer_syntaxes:
        if is_valid_uid(ts) and (allowed is None or ts in allowed):
            return P.PC_ACCEPTANCE, ts
    return P.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, pc.transfer_syntaxes[0]


def instance_result(ae, sop_class: str, transfer_syntax: str) -> int:
    """The presentation context result :func:`negotiate` gives an instance
    of ``sop_class`` in ``transfer_syntax``: instances that arrive without
    negotiation (DICOMweb) are held to the same rules.  Verification is a
    service, not an instance."""
    if sop_class == VERIFICATION:
        return P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED
    return negotiate(ae, P.PresentationContextRQ(1, sop_class, (transfer_syntax,)))[0]

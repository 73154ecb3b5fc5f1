"""docs/conformance-statement.md says what the code does.

Each fact is one line of :data:`FACTS`: the first column of a table row in the
document, and the value the code gives for it (computed from constants, the
config defaults, or by running the code).  Adding a fact to the document is a
table row there and one line here.
"""

from __future__ import annotations

import json
import os
import re

from twisted.internet.task import Clock
from twisted.trial import unittest

import gateway
from gateway import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from gateway.config import Config
from gateway.dimse import commands as C
from gateway.dimse import sop
from gateway.export.scu import MAX_CONTEXTS, verification_contexts
from gateway.ingest import policy
from gateway.ingest.scp import StoreSCP
from gateway.ingest.service import SCPService
from gateway.messaging import monai
from gateway.testing import FakeProvider
from gateway import ul as P
from gateway.ul.association import MAX_ASSOCIATION_PDU, MAX_UNLIMITED_PDATA

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "conformance-statement.md")
DEFAULTS = Config()
CT = "1.2.840.10008.5.1.4.1.1.2"


def _reject_for(called_ae="DICOMGW", calling_ae="MODALITY", context=P.DICOM_APPLICATION_CONTEXT) -> str:
    """Run the SCP's association acceptance and return 'result, source, reason'."""
    scp = StoreSCP(SCPService(DEFAULTS, None, Clock()))
    scp.connection_made(FakeProvider())
    rq = P.AssociateRQ(called_ae=called_ae, calling_ae=calling_ae, application_context=context,
                       presentation_contexts=(P.PresentationContextRQ(1, CT, (sop.IMPLICIT_VR_LITTLE_ENDIAN,)),),
                       user_information=P.UserInformation(max_length=16384))
    scp.associate_indication(rq)
    rj = scp.provider.rejected
    return f"{rj.result}, {rj.source}, {rj.reason}"


def _accepted_user_information() -> P.UserInformation:
    """The user information of our A-ASSOCIATE-AC to a request that proposes
    asynchronous operations (5, 5), SCU and SCP roles, extended negotiation
    and a user identity."""
    scp = StoreSCP(SCPService(DEFAULTS, None, Clock()))
    scp.connection_made(FakeProvider())
    rq = P.AssociateRQ(
        called_ae="DICOMGW", calling_ae="MODALITY", application_context=P.DICOM_APPLICATION_CONTEXT,
        presentation_contexts=(P.PresentationContextRQ(1, CT, (sop.IMPLICIT_VR_LITTLE_ENDIAN,)),),
        user_information=P.UserInformation(
            max_length=16384, async_ops=(5, 5), role_selections=(P.RoleSelection(CT, 1, 1),),
            extended_negotiations=(P.ExtendedNegotiation(CT, b"\x01"),),
            user_identity=P.UserIdentityRQ(1, 1, b"user", b""),
        ))
    scp.associate_indication(rq)
    return scp.provider.accepted.user_information


def _async_window() -> str:
    invoked, performed = _accepted_user_information().async_ops
    return f"{invoked}, {performed} (no asynchronous operations)"


def _roles() -> str:
    (role,) = _accepted_user_information().role_selections
    return f"SCU role as proposed, SCP role {role.scp_role}" if role.scu_role == 1 else "?"


def _ignored(field) -> str:
    return "not supported (ignored)" if not getattr(_accepted_user_information(), field) else "answered"


def _negotiate(abstract, *syntaxes) -> tuple[int, str]:
    return policy.negotiate(None, P.PresentationContextRQ(1, abstract, syntaxes))


def _first_proposed_policy() -> str:
    result, ts = _negotiate(CT, "1.2.3.4.5.6.7", sop.IMPLICIT_VR_LITTLE_ENDIAN)
    assert (result, ts) == (P.PC_ACCEPTANCE, "1.2.3.4.5.6.7")
    return f"{P.PC_ACCEPTANCE} (acceptance), with the first transfer syntax proposed"


def _tls_profiles() -> str:
    from gateway.net.tls import PROFILES

    names = {"bcp195": "BCP 195", "bcp195-nd": "Non-downgrading BCP 195", "bcp195-ex": "Extended BCP 195"}
    return ", ".join(f"{names[p]} ({p}{', default' if p == DEFAULTS.tls.profile else ''})" for p in PROFILES)


def _tls_versions() -> str:
    from twisted.internet.ssl import TLSVersion

    from gateway.net.tls import MINIMUM_VERSION

    return "TLS 1.2, TLS 1.3" if MINIMUM_VERSION == TLSVersion.TLSv1_2 else "?"


def _policy_reject(called_ae="DICOMGW", calling_ae="CT01", active=0, congestion=None) -> str:
    """Association policy (issue 3) on a configuration that uses it."""
    from gateway.config import config_from_string
    from gateway.ingest.policy import check_association

    config = config_from_string(
        '[gateway]\nreject_unknown_sources = true\n[listen]\ndicom_tls = "tcp:2762"\n'
        '[[source]]\nae_title = "CT01"\n[[source]]\nae_title = "MR01"\n'
        '[[ae]]\ntitle = "DICOMGW"\n[[ae]]\ntitle = "SECURE"\ntls_only = true\n'
        '[[ae]]\ntitle = "NARROW"\nsources = ["MR01"]\n')
    rq = P.AssociateRQ(called_ae=called_ae, calling_ae=calling_ae, presentation_contexts=(),
                       user_information=P.UserInformation(max_length=16384))
    rj = check_association(config, rq, peer_host="10.0.0.1", tls=False, active=active, congestion=congestion)
    return f"{rj.result}, {rj.source}, {rj.reason}"


def _code(status: int) -> str:
    return f"{status:04X}"


def _stow_facts() -> list[tuple[str, str]]:
    """STOW-RS statuses and Failure Reasons, each produced by the code."""
    from gateway.export import dicomweb as W
    from gateway.ingest import stow as S
    from gateway.ingest import stow_web

    def status(*outcomes):
        return str(S.StowResult(list(outcomes)).status)

    def refusal(f, *args):
        try:
            f(*args)
        except S.Refusal as e:
            return str(e.status)
        return "accepted"

    stored, failed = S.PartOutcome(1, stored=True), S.PartOutcome(2, failure=S.PROCESSING_FAILURE)
    a = "STOW-RS answer "
    r = "STOW-RS Failure Reason: "
    return [
        (a + "when every instance was stored", status(stored)),
        (a + "when some instances failed", status(stored, failed)),
        (a + "when no instance was stored", status(failed)),
        (a + "to a broken multipart body or a part that is not a Part 10 instance",
         status(S.PartOutcome(1, not_part10=True, failure=S.CANNOT_UNDERSTAND))),
        (a + "to a missing or wrong bearer token", "401"),
        (a + "to an unknown path or AE title", refusal(S.route, b"/dicomweb/series")),
        (a + "to a method other than POST", "405"),
        (a + "to a media type other than multipart/related of application/dicom",
         refusal(S.check_media_type, b"application/dicom")),
        (a + "to a body over dicomweb.max_request_bytes, or more parts than dicomweb.max_parts", "413"),
        (a + "while the storage is over its watermark", "503"),
        (r + "SOP class not accepted by the AE title", _code(S.SOP_CLASS_NOT_SUPPORTED)),
        (r + "transfer syntax not accepted by the AE title", _code(S.TRANSFER_SYNTAX_NOT_SUPPORTED)),
        (r + "storage full, a storage error or the watermark crossed during the request", _code(S.OUT_OF_RESOURCES)),
        (r + "SOP Class, Instance or Transfer Syntax UID not a valid UID", _code(S.CANNOT_UNDERSTAND)),
        (r + "an instance of another study than the one in the path", _code(S.STUDY_MISMATCH)),
        (r + "could not be indexed or recorded", _code(S.PROCESSING_FAILURE)),
        ("Body bytes that each dicomweb.timeout period must bring (at least)", str(stow_web.PROGRESS_BYTES)),
        ("STOW-RS export instances per request (most)", str(W.BATCH_FILES)),
        ("STOW-RS export Failure Reasons not retried", ", ".join(_code(c) for c in W.PERMANENT)),
        ("dicomweb.max_request_bytes", str(DEFAULTS.dicomweb.max_request_bytes)),
        ("dicomweb.max_parts", str(DEFAULTS.dicomweb.max_parts)),
        ("dicomweb.timeout", f"{DEFAULTS.dicomweb.timeout:g}"),
    ]

def _trigger_service():
    """The dataService of a workflow request, as the gateway builds one."""
    message = monai.workflow_request({"id": "p", "created": 0}, [{"path": "/r/x.dcm"}],
                                     [{"id": "a", "calling_ae": "A", "called_ae": "B"}], root="/r", bucket="b",
                                     workflows=(), routing_key="k")
    return json.loads(message.body)["trigger"]["dataService"]


FACTS = [
    ("Product version", gateway.__version__),
    ("Implementation Class UID", IMPLEMENTATION_CLASS_UID),
    ("Implementation Version Name", IMPLEMENTATION_VERSION_NAME),
    ("Application Context Name", P.DICOM_APPLICATION_CONTEXT),
    ("Maximum PDU length received (default)", str(DEFAULTS.gateway.max_pdu_length)),
    ("Largest P-DATA-TF PDU accepted when the limit is 0", str(MAX_UNLIMITED_PDATA)),
    ("Largest association PDU accepted", str(MAX_ASSOCIATION_PDU)),
    ("Maximum DIMSE command set length", str(C.MAX_COMMAND_LENGTH)),
    ("Asynchronous operations window", _async_window()),
    ("SCP/SCU role selection", _roles()),
    ("Extended negotiation", _ignored("extended_negotiations")),
    ("User identity negotiation", _ignored("user_identity")),
    ("ARTIM timeout (default)", f"{DEFAULTS.timeouts.artim:g} s"),
    ("DIMSE timeout (default)", f"{DEFAULTS.timeouts.dimse:g} s"),
    ("Default AE title", DEFAULTS.ae[0].title),
    ("Default listening port", DEFAULTS.listen.dicom),
    ("gateway.max_pdu_length", str(DEFAULTS.gateway.max_pdu_length)),
    ("timeouts.artim", f"{DEFAULTS.timeouts.artim:g}"),
    ("timeouts.dimse", f"{DEFAULTS.timeouts.dimse:g}"),
    ("storage.fsync", str(DEFAULTS.storage.fsync).lower()),
    ("gateway.implementation_version_name", DEFAULTS.gateway.implementation_version_name),
    ("Called AE title not configured", _reject_for(called_ae="NOBODY")),
    ("Calling AE title not in the DICOM default repertoire", _reject_for(calling_ae="BAD\\AE")),
    ("Application context name not supported", _reject_for(context="1.2.3")),
    ("Protocol version without bit 0",
     f"{P.RJ_PERMANENT}, {P.RJ_SOURCE_ACSE}, {P.RJ_ACSE_PROTOCOL_VERSION_NOT_SUPPORTED}"),
    ("Verification or a storage SOP class", _first_proposed_policy()),
    ("A known non-storage SOP class (query/retrieve, worklist, MPPS, print, storage commitment, ...)",
     f"{_negotiate('1.2.840.10008.5.1.4.1.2.2.1', sop.IMPLICIT_VR_LITTLE_ENDIAN)[0]} (abstract syntax not supported)"),
    ("No proposed transfer syntax is a valid UID",
     f"{_negotiate(CT, 'not a uid')[0]} (transfer syntaxes not supported)"),
    ("Success", _code(C.SUCCESS)),
    ("Refused: Out of Resources (disk full, storage error)", _code(C.OUT_OF_RESOURCES)),
    ("Error: Cannot Understand (SOP Class/Instance UID not a valid UID, no dataset)", _code(C.CANNOT_UNDERSTAND)),
    ("Failure: Processing failure (unexpected error while storing)", _code(C.PROCESSING_FAILURE)),
    ("Refused: SOP Class not supported (Affected SOP Class UID differs from the abstract syntax of the "
     "presentation context the command came on)", _code(C.SOP_CLASS_NOT_SUPPORTED)),
    ("Unrecognized operation (any DIMSE request other than C-STORE, C-ECHO, C-CANCEL)",
     _code(C.UNRECOGNIZED_OPERATION)),
    ("TLS secure transport connection profiles", _tls_profiles()),
    ("TLS versions", _tls_versions()),
    ("Called AE title is TLS-only and the association came to the plain port",
     _policy_reject(called_ae="SECURE")),
    ("Calling AE title (and address) matches no configured source, when unknown sources are rejected",
     _policy_reject(calling_ae="STRANGER")),
    ("Calling AE title not among the sources allowed for the called AE title",
     _policy_reject(called_ae="NARROW", calling_ae="CT01")),
    ("Maximum number of simultaneous associations reached", _policy_reject(active=DEFAULTS.gateway.max_associations)),
    ("Storage over its watermark or under its reserve of free space", _policy_reject(congestion="full")),
    ("PDU completion timeout (default)", f"{DEFAULTS.timeouts.pdu:g} s"),
    ("gateway.max_associations", str(DEFAULTS.gateway.max_associations)),
    ("timeouts.pdu", f"{DEFAULTS.timeouts.pdu:g}"),
    ("storage.watermark_percent", f"{DEFAULTS.storage.watermark_percent:g}"),
    ("storage.reserved_gb", f"{DEFAULTS.storage.reserved_gb:g}"),
    ("tls.profile", DEFAULTS.tls.profile),
    ("tls.require_client_certificate", str(DEFAULTS.tls.require_client_certificate).lower()),
    # The Storage SCU AE (export).
    ("SCU calling AE title (default)", DEFAULTS.scu.ae_title),
    ("SCU presentation contexts per association (most)", str(MAX_CONTEXTS)),
    ("SCU simultaneous associations (default)", str(DEFAULTS.scu.max_associations)),
    ("SCU retries of failed files (default)", str(DEFAULTS.scu.retries)),
    ("SCU first retry delay (default)", f"{DEFAULTS.scu.retry_delay:g} s, doubled for each further retry"),
    ("SCU connect timeout (default)", f"{DEFAULTS.scu.connect_timeout:g} s"),
    ("SCU Verification transfer syntax", verification_contexts()[0][1]),
    ("scu.ae_title", DEFAULTS.scu.ae_title),
    ("scu.max_associations", str(DEFAULTS.scu.max_associations)),
    ("scu.retries", str(DEFAULTS.scu.retries)),
    ("scu.retry_delay", f"{DEFAULTS.scu.retry_delay:g}"),
    ("scu.connect_timeout", f"{DEFAULTS.scu.connect_timeout:g}"),
    # DICOMweb STOW-RS.
    *_stow_facts(),

    ("messaging.exchange", DEFAULTS.messaging.exchange),
    ("messaging.workflow_request", DEFAULTS.messaging.workflow_request),
    ("messaging.export_complete", DEFAULTS.messaging.export_complete),
    ("messaging.export_request_prefix", DEFAULTS.messaging.export_request_prefix),
    ("messaging.export_agents", ", ".join(DEFAULTS.messaging.export_agents)),
    ("messaging.prefetch", str(DEFAULTS.messaging.prefetch)),
    ("Workflow request dataService", _trigger_service()),
]

# PS3.2 top-level layout, in order.
SECTIONS = ["1 Conformance Statement Overview", "2 Table of Contents", "3 Introduction", "4 Networking",
            "5 Media Interchange", "6 Support of Character Sets", "7 Security", "8 Annexes"]


def _text():
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def _rows(text):
    """Every table row as a list of cells, backticks and bold stripped; separators skipped."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|") or re.fullmatch(r"\|[\s|:-]+\|", line):
            continue
        rows.append([c.strip().strip("*").strip("`").strip() for c in line.strip("|").split("|")])
    return rows


class ConformanceStatementTests(unittest.TestCase):
    def test_facts_match_the_code(self):
        rows = _rows(_text())
        wrong = []
        for key, expected in FACTS:
            found = [r[1] for r in rows if r[0] == key and len(r) > 1]
            if len(found) != 1:
                wrong.append(f"{key!r}: {len(found)} rows in the document (want exactly 1)")
            elif found[0] != expected:
                wrong.append(f"{key!r}: document says {found[0]!r}, code says {expected!r}")
        self.assertEqual(wrong, [])

    def test_ps3_2_layout(self):
        headings = [h.strip() for h in re.findall(r"^## (.+)$", _text(), re.M)]
        self.assertEqual(headings[:len(SECTIONS)], SECTIONS)

    def test_annex_a_lists_exactly_the_storage_sop_classes(self):
        text = _text()
        annex = text[text.index("### Annex A"):]
        listed = {r[1]: r[0] for r in _rows(annex)[1:]}
        self.assertEqual(set(listed), set(sop.STORAGE_SOP_CLASSES))
        for uid, name in listed.items():
            self.assertEqual(sop.sop_class_name(uid), name, uid)
            self.assertEqual(_negotiate(uid, sop.EXPLICIT_VR_LITTLE_ENDIAN)[0], P.PC_ACCEPTANCE, uid)

    def test_every_listed_transfer_syntax_and_verification_is_accepted(self):
        text = _text()
        section = text[text.index("| Transfer Syntax Name |"):text.index("##### 4.2.1.5")]
        uids = [r[1] for r in _rows(section)[1:] if re.fullmatch(r"[0-9.]+", r[1])]
        self.assertGreater(len(uids), 5)
        for uid in uids:
            self.assertEqual(_negotiate(CT, uid), (P.PC_ACCEPTANCE, uid))
        self.assertIn(f"| Verification | `{sop.VERIFICATION}` | No | Yes |", text)
        self.assertEqual(_negotiate(sop.VERIFICATION, sop.IMPLICIT_VR_LITTLE_ENDIAN)[0], P.PC_ACCEPTANCE)

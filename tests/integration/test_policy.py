"""Association policy with real peers: every reject reason, with the exact
A-ASSOCIATE-RJ bytes the gateway sent, captured by a relay between the peer
and the gateway."""

from __future__ import annotations

import os
import ssl

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests import dicomfiles
from tests.integration.harness import (
    in_thread,
    make_certificates,
    require_pynetdicom,
    run,
    start_gateway,
)
from tests.integration.recorder import RecordingRelay, rj_bytes

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"

POLICY = """
[[source]]
ae_title = "ECHOSCU"
host = "127.0.0.0/8"
[[source]]
ae_title = "FARAWAY"
host = "10.0.0.0/8"
[[source]]
ae_title = "OTHER"
[[source]]
ae_title = "PYNETDICOM"

[[ae]]
title = "DICOMGW"
[[ae]]
title = "SECURE"
tls_only = true
[[ae]]
title = "NARROW"
sources = ["OTHER"]
"""


def collect_events(testcase, name):
    events = []

    def observer(event):
        if event.get("event") == name:
            events.append(event)

    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def pynetdicom_ae(title="PYNETDICOM"):
    pynetdicom = require_pynetdicom()
    ae = pynetdicom.AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


def client_context(certs: str, with_certificate=True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.path.join(certs, "ca.pem"))
    if with_certificate:
        ctx.load_cert_chain(os.path.join(certs, "client.pem"), os.path.join(certs, "client.key"))
    return ctx


@defer.inlineCallbacks
def wait_for(predicate, timeout=10.0):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("condition not reached in time")


class RejectReasonTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def echo(self, relay, calling, called):
        """echoscu through the relay; the first PDU the gateway answered."""
        before = len(relay.connections)
        out, err, code = yield run("echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(relay.port))
        self.assertEqual(len(relay.connections), before + 1)
        return relay.connections[-1].first_pdu(), code

    @defer.inlineCallbacks
    def test_identity_rejects_with_dcmtk(self):
        certs = make_certificates(self)
        gw = yield start_gateway(self, POLICY, aes=(), reject_unknown_sources=True, tls_dir=certs)
        relay = yield RecordingRelay.start(self, gw.port)
        closed = collect_events(self, "association.closed")

        cases = [
            ("ECHOSCU", "NOSUCH", rj_bytes(1, 1, 7)),     # called AE title not configured
            ("ECHOSCU", "SECURE", rj_bytes(1, 1, 7)),     # TLS-only AE on the plain port
            ("STRANGER", "DICOMGW", rj_bytes(1, 1, 3)),   # calling AE title matches no source
            ("FARAWAY", "DICOMGW", rj_bytes(1, 1, 3)),    # a known AE title from the wrong network
            ("ECHOSCU", "NARROW", rj_bytes(1, 1, 3)),     # not in that AE's sources
        ]
        for calling, called, expected in cases:
            (pdu_type, pdu), code = yield self.echo(relay, calling, called)
            self.assertEqual((pdu_type, pdu), (0x03, expected), f"{calling} -> {called}")
            self.assertNotEqual(code, 0)
        (pdu_type, _), code = yield self.echo(relay, "ECHOSCU", "DICOMGW")
        self.assertEqual((pdu_type, code), (0x02, 0))  # A-ASSOCIATE-AC, echo succeeded

        yield wait_for(lambda: len(closed) == len(cases) + 1)
        rejects = [(e["calling_ae"], e["called_ae"], e["reject_result"], e["reject_source"], e["reject_reason"])
                   for e in closed if e["result"] == "rejected"]
        self.assertEqual(rejects, [(c, d, e[7], e[8], e[9]) for c, d, e in cases])

    @defer.inlineCallbacks
    def test_association_limit_counts_both_ports(self):
        """max_associations = 3: two held on the plain port and one on the
        TLS port; the fourth is rejected-transient, presentation, reason 2."""
        certs = make_certificates(self)
        gw = yield start_gateway(self, max_associations=3, tls_dir=certs)
        relay = yield RecordingRelay.start(self, gw.port)
        ctx = client_context(certs)

        def hold():
            held = []
            for tls in (False, False, True):
                ae = pynetdicom_ae()
                ae.add_requested_context(VERIFICATION)
                if tls:
                    assoc = ae.associate("127.0.0.1", gw.tls_port, ae_title="DICOMGW", tls_args=(ctx, "localhost"))
                else:
                    assoc = ae.associate("127.0.0.1", gw.port, ae_title="DICOMGW")
                assert assoc.is_established
                held.append(assoc)
            return held

        held = yield in_thread(hold)
        try:
            self.assertEqual(len(gw.scp.active), 3)
            self.assertEqual(sum(1 for a in gw.scp.active if a.tls), 1)
            (pdu_type, pdu), code = yield self.echo(relay, "ECHOSCU", "DICOMGW")
            self.assertEqual((pdu_type, pdu), (0x03, rj_bytes(2, 3, 2)))
        finally:
            yield in_thread(lambda: [a.release() for a in held])
        yield wait_for(lambda: not gw.scp.active)
        (pdu_type, _), code = yield self.echo(relay, "ECHOSCU", "DICOMGW")
        self.assertEqual((pdu_type, code), (0x02, 0))

    @defer.inlineCallbacks
    def test_watermark_rejects_and_a700_then_recovers(self):
        gw = yield start_gateway(self, check_interval=3600, reserved_gb=1)
        relay = yield RecordingRelay.start(self, gw.port)
        watermark = gw.service.getServiceNamed("watermark")
        disk = {"full": False}

        class St:
            f_frsize = 1 << 20
            f_blocks = 10000
            f_bfree = f_bavail = property(lambda self: 10 if disk["full"] else 9000)

        watermark.statvfs = lambda path: St()
        src = self.mktemp()
        os.makedirs(src)
        path = dicomfiles.small_instance(os.path.join(src, "a.dcm"))

        # An association accepted while there is room ...
        def associate():
            ae = pynetdicom_ae()
            ae.add_requested_context(SC, IMPLICIT)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="DICOMGW")
            assert assoc.is_established
            return assoc

        yield watermark.probe()
        assoc = yield in_thread(associate)
        try:
            # ... then the disk fills up: C-STORE answers A700, nothing stored.
            disk["full"] = True
            yield watermark.probe()
            self.assertEqual(gw.scp.congestion, "0.01 GiB free, reserve 1 GiB")
            status = yield in_thread(lambda: assoc.send_c_store(path).Status)
            self.assertEqual(status, 0xA700)
            self.assertEqual(gw.stored_files(), [])
        finally:
            yield in_thread(assoc.release)
        # New associations: rejected-transient, presentation, temporary congestion.
        (pdu_type, pdu), _ = yield self.echo(relay, "ECHOSCU", "DICOMGW")
        self.assertEqual((pdu_type, pdu), (0x03, rj_bytes(2, 3, 1)))
        # Space comes back: accepted again, no restart.
        disk["full"] = False
        yield watermark.probe()
        self.assertIsNone(gw.scp.congestion)
        (pdu_type, _), code = yield self.echo(relay, "ECHOSCU", "DICOMGW")
        self.assertEqual((pdu_type, code), (0x02, 0))


class SOPClassPolicyTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_allowed_ignored_and_transfer_syntaxes(self):
        extra = f"""
[[ae]]
title = "ONLYMR"
allowed_sop_classes = ["{MR}"]
[[ae]]
title = "NOSC"
ignored_sop_classes = ["{SC}"]
[[ae]]
title = "EXPLICIT"
transfer_syntaxes = ["{EXPLICIT}"]
"""
        gw = yield start_gateway(self, extra, aes=())
        closed = collect_events(self, "association.closed")
        src = self.mktemp()
        os.makedirs(src)
        sc = dicomfiles.small_instance(os.path.join(src, "sc.dcm"))

        def talk():
            results = {}
            ae = pynetdicom_ae()
            for sop in (VERIFICATION, CT, MR):
                ae.add_requested_context(sop, IMPLICIT)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="ONLYMR")
            results["ONLYMR"] = {c.abstract_syntax: c.result for c in assoc.accepted_contexts + assoc.rejected_contexts}
            assoc.release()

            ae = pynetdicom_ae()
            ae.add_requested_context(SC, IMPLICIT)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="NOSC")
            results["NOSC"] = assoc.send_c_store(sc).Status
            assoc.release()

            ae = pynetdicom_ae()
            ae.add_requested_context(CT, [IMPLICIT])
            ae.add_requested_context(MR, [IMPLICIT, EXPLICIT])
            ae.add_requested_context(VERIFICATION, [IMPLICIT])
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="EXPLICIT")
            results["EXPLICIT"] = {c.abstract_syntax: (c.result, c.transfer_syntax[0] if c.result == 0 else None)
                                   for c in assoc.accepted_contexts + assoc.rejected_contexts}
            assoc.release()
            return results

        results = yield in_thread(talk)
        # 0 acceptance, 3 abstract syntax not supported, 4 transfer syntaxes not supported
        self.assertEqual(results["ONLYMR"], {VERIFICATION: 0, CT: 3, MR: 0})
        self.assertEqual(results["NOSC"], 0x0000)
        self.assertEqual(gw.stored_files("NOSC"), [])
        self.assertEqual(results["EXPLICIT"], {CT: (4, None), MR: (0, EXPLICIT), VERIFICATION: (0, IMPLICIT)})
        yield wait_for(lambda: len(closed) == 3)
        nosc = [e for e in closed if e["called_ae"] == "NOSC"][0]
        self.assertEqual((nosc["instances"], nosc["ignored"], nosc["failures"]), (0, 1, 0))

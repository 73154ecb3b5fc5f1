"""Association policy as pure functions of the configuration and the request."""

from __future__ import annotations

from twisted.trial import unittest

from gateway.config import config_from_string
from gateway.dimse import sop
from gateway.ingest.policy import check_association, instance_result, matching_sources, negotiate
from gateway import ul as P

CONFIG = config_from_string('''
[gateway]
max_associations = 2
[listen]
dicom_tls = "tcp:0"
[[source]]
ae_title = "CT01"
host = "10.1.2.0/24"
[[source]]
ae_title = "CT01"
host = "2001:db8::/32"
[[source]]
ae_title = "ANY"
[[ae]]
title = "GW"
[[ae]]
title = "SEC"
tls_only = true
[[ae]]
title = "CTONLY"
sources = ["CT01"]
allowed_sop_classes = ["1.2.840.10008.5.1.4.1.1.2"]
transfer_syntaxes = ["1.2.840.10008.1.2.1"]
''')


def rq(called="GW", calling="CT01", context=P.DICOM_APPLICATION_CONTEXT):
    return P.AssociateRQ(called, calling, (), P.UserInformation(max_length=0), application_context=context)


def check(request, host="10.1.2.3", tls=False, active=0, congestion=None, config=CONFIG):
    r = check_association(config, request, peer_host=host, tls=tls, active=active, congestion=congestion)
    return None if r is None else (r.result, r.source, r.reason)


class PolicyTests(unittest.TestCase):
    def test_reject_table(self):
        self.assertIsNone(check(rq()))
        self.assertEqual(check(rq(context="1.2.3")), (1, 1, 2))
        self.assertEqual(check(rq(called="NOPE")), (1, 1, 7))
        self.assertEqual(check(rq(called="SEC")), (1, 1, 7))
        self.assertIsNone(check(rq(called="SEC"), tls=True))
        self.assertEqual(check(rq(calling="BAD\\AE")), (1, 1, 3))
        self.assertEqual(check(rq(called="CTONLY", calling="ANY")), (1, 1, 3))
        self.assertEqual(check(rq(called="CTONLY"), host="10.9.9.9"), (1, 1, 3))
        self.assertIsNone(check(rq(called="CTONLY"), host="::ffff:10.1.2.3"))  # IPv4-mapped
        self.assertIsNone(check(rq(called="CTONLY"), host="2001:db8::5"))
        self.assertEqual(check(rq(), active=2), (2, 3, 2))
        self.assertEqual(check(rq(), congestion="full"), (2, 3, 1))
        # Identity is checked before load: an unknown AE learns nothing about our state.
        self.assertEqual(check(rq(called="NOPE"), active=2, congestion="full"), (1, 1, 7))

    def test_reject_unknown_sources(self):
        strict = config_from_string('[gateway]\nreject_unknown_sources = true\n'
                                    '[[source]]\nae_title = "CT01"\nhost = "10.1.2.3"\n[[ae]]\ntitle = "GW"\n')
        self.assertIsNone(check(rq(), config=strict))
        self.assertEqual(check(rq(), host="10.1.2.4", config=strict), (1, 1, 3))
        self.assertEqual(check(rq(calling="MR01"), config=strict), (1, 1, 3))
        self.assertEqual(check(rq(), host=None, config=strict), (1, 1, 3))
        self.assertEqual(matching_sources(strict, "CT01", "10.1.2.3"), {"CT01"})

    def test_negotiate(self):
        ae = CONFIG.ae_named("CTONLY")
        CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
        IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
        pc = P.PresentationContextRQ
        self.assertEqual(negotiate(ae, pc(1, CT, (IMPLICIT, EXPLICIT))), (P.PC_ACCEPTANCE, EXPLICIT))
        self.assertEqual(negotiate(ae, pc(1, CT, (IMPLICIT,)))[0], P.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED)
        self.assertEqual(negotiate(ae, pc(1, MR, (EXPLICIT,)))[0], P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED)
        # Verification is always allowed, in any transfer syntax.
        self.assertEqual(negotiate(ae, pc(1, "1.2.840.10008.1.1", (IMPLICIT,))), (P.PC_ACCEPTANCE, IMPLICIT))
        # Without lists: the first proposed syntax, as before.
        self.assertEqual(negotiate(CONFIG.ae_named("GW"), pc(1, MR, (IMPLICIT, EXPLICIT))), (P.PC_ACCEPTANCE, IMPLICIT))


class InstanceResultTests(unittest.TestCase):
    """Instances that come without negotiation meet the presentation context rules."""

    def test_the_rules_of_negotiation(self):
        ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
        cfg = config_from_string(f'[[ae]]\ntitle = "ANY"\n[[ae]]\ntitle = "CT"\nallowed_sop_classes = ["{ct}"]\n'
                                 '[[ae]]\ntitle = "EXPLICIT"\ntransfer_syntaxes = ["1.2.840.10008.1.2.1"]\n')
        any_ae, ct_ae, explicit = cfg.ae
        implicit = sop.IMPLICIT_VR_LITTLE_ENDIAN
        self.assertEqual(instance_result(any_ae, mr, implicit), P.PC_ACCEPTANCE)
        self.assertEqual(instance_result(ct_ae, mr, implicit), P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED)
        self.assertEqual(instance_result(any_ae, sop.VERIFICATION, implicit), P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED)
        self.assertEqual(instance_result(any_ae, "1.2.840.10008.5.1.4.1.2.2.1", implicit),
                         P.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED)  # a query/retrieve SOP class
        self.assertEqual(instance_result(explicit, ct, implicit), P.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED)
        self.assertEqual(instance_result(explicit, ct, "1.2.840.10008.1.2.1"), P.PC_ACCEPTANCE)

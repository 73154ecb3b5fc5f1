"""Configuration of association policy, TLS, the watermark and the PDU deadline."""

from __future__ import annotations

import ipaddress

from twisted.trial import unittest

from gateway.config import ConfigError, config_from_string


def problems(text):
    try:
        config_from_string(text, "gw.toml")
    except ConfigError as e:
        return e.problems
    raise AssertionError("configuration was accepted")


class PolicyConfigTests(unittest.TestCase):
    def test_defaults(self):
        c = config_from_string('[[ae]]\ntitle = "A"\n')
        self.assertEqual((c.gateway.max_associations, c.gateway.reject_unknown_sources, c.listen.dicom_tls),
                         (25, False, None))
        self.assertEqual((c.storage.watermark_percent, c.storage.reserved_gb, c.storage.check_interval, c.timeouts.pdu),
                         (75.0, 5.0, 10.0, 60.0))
        self.assertEqual((c.tls.profile, c.tls.require_client_certificate), ("bcp195-nd", True))
        ae = c.ae_named("A")
        self.assertEqual((ae.tls_only, ae.sources, ae.allowed_sop_classes, ae.ignored_sop_classes,
                          ae.transfer_syntaxes), (False, None, None, frozenset(), None))

    def test_full(self):
        c = config_from_string('''
[gateway]
reject_unknown_sources = true
max_associations = 1000
[listen]
dicom_tls = "tcp:2762"
[tls]
profile = "bcp195-ex"
require_client_certificate = false
[timeouts]
pdu = 5
[storage]
watermark_percent = 90
reserved_gb = 0.5
check_interval = 2
[[source]]
ae_title = "CT01"
host = "10.1.2.0/24"
[[source]]
ae_title = "MR01"
[[ae]]
title = "A"
tls_only = true
sources = ["CT01", "MR01"]
allowed_sop_classes = ["1.2.840.10008.5.1.4.1.1.2"]
transfer_syntaxes = ["1.2.840.10008.1.2.1"]
[[ae]]
title = "B"
ignored_sop_classes = ["1.2.840.10008.5.1.4.1.1.7"]
''')
        self.assertEqual(c.gateway.max_associations, 1000)
        self.assertEqual(c.source[0].host, ipaddress.ip_network("10.1.2.0/24"))
        self.assertIsNone(c.source[1].host)
        self.assertEqual(c.ae_named("A").sources, ("CT01", "MR01"))
        self.assertEqual(c.ae_named("A").allowed_sop_classes, frozenset({"1.2.840.10008.5.1.4.1.1.2"}))
        self.assertEqual(c.ae_named("B").ignored_sop_classes, frozenset({"1.2.840.10008.5.1.4.1.1.7"}))
        self.assertEqual((c.tls.profile, c.timeouts.pdu, c.storage.reserved_gb), ("bcp195-ex", 5.0, 0.5))

    def test_errors_name_their_keys(self):
        cases = {
            '[gateway]\nmax_associations = 0\n': "gateway.max_associations: 0 is out of range 1..1000",
            '[gateway]\nmax_associations = 1001\n': "gateway.max_associations: 1001 is out of range 1..1000",
            '[tls]\nprofile = "tls1"\n': "tls.profile: 'tls1' is not one of bcp195, bcp195-nd, bcp195-ex",
            '[tls]\ncertificate = ""\n': "tls.certificate: must not be empty",
            '[storage]\nwatermark_percent = 0\n': "storage.watermark_percent: 0 is out of range 1..100",
            '[storage]\nreserved_gb = -1\n': "storage.reserved_gb: -1 is out of range",
            '[timeouts]\npdu = 0\n': "timeouts.pdu: 0 is out of range 1..86400",
            '[[source]]\nhost = "10.0.0.1"\n': "source[0].ae_title: required",
            '[[source]]\nae_title = "X"\nhost = "10.0.0.300"\n': "source[0].host: '10.0.0.300' is not an IP",
            '[[source]]\nae_title = "X\\\\Y"\n': "source[0].ae_title: 'X\\\\Y' is not an AE title",
        }
        for text, expected in cases.items():
            found = problems(text + '[[ae]]\ntitle = "A"\n')
            self.assertTrue(any(p.startswith(expected) for p in found), f"{expected!r} not in {found}")

    def test_ae_errors(self):
        cases = {
            'tls_only = true': "ae[0].tls_only: 'A' is TLS-only but listen.dicom_tls is not set",
            'sources = ["NOBODY"]': "ae[0].sources: 'NOBODY' is not the ae_title of any [[source]]",
            'allowed_sop_classes = ["1.2"]\nignored_sop_classes = ["1.3"]':
                "ae[0]: allowed_sop_classes and ignored_sop_classes cannot both be set",
            'allowed_sop_classes = ["1.2.x"]': "ae[0].allowed_sop_classes[0]: '1.2.x' is not a UID",
            'ignored_sop_classes = "1.2"': "ae[0].ignored_sop_classes: expected an array of non-empty strings",
            'transfer_syntaxes = []': "ae[0].transfer_syntaxes: must not be empty",
            'transfer_syntaxes = ["../etc"]': "ae[0].transfer_syntaxes[0]: '../etc' is not a UID",
        }
        for line, expected in cases.items():
            found = problems(f'[[ae]]\ntitle = "A"\n{line}\n')
            self.assertTrue(any(p.startswith(expected) for p in found), f"{expected!r} not in {found}")

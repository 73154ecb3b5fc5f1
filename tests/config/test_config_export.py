"""[scu], [[destination]] and the client's view of [tls]: defaults, errors naming keys."""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import TestCase

from gateway.config import ConfigError, config_from_string, load_config

from tests import ROOT

BASE = '[[ae]]\ntitle = "GW"\n'


def problems(text):
    try:
        config_from_string(BASE + text)
    except ConfigError as e:
        return e.problems
    raise AssertionError("configuration accepted")


class SCUConfigTests(TestCase):
    def test_defaults(self):
        c = config_from_string(BASE)
        self.assertEqual((c.scu.ae_title, c.scu.max_associations, c.scu.retries, c.scu.retry_delay),
                         ("DICOMGW", 2, 3, 30.0))
        self.assertEqual(c.destination, ())

    def test_issue_example(self):
        c = config_from_string(BASE + '''
[scu]
ae_title = "DICOMGW"
max_associations = 2
retries = 3
retry_delay = 30

[[destination]]
name = "pacs"
ae_title = "PACS"
host = "10.0.0.5"
port = 104
tls = false
''')
        d = c.destination_named("pacs")
        self.assertEqual((d.ae_title, d.host, d.port, d.tls), ("PACS", "10.0.0.5", 104, False))
        self.assertIsNone(c.destination_named("other"))

    def test_errors_name_their_keys(self):
        found = problems('''
[scu]
ae_title = "A\\\\B"
max_associations = 0
retries = true
retry_delay = -1
colour = "red"

[[destination]]
name = "pacs"
host = "h"
port = 70000

[[destination]]
name = "pacs"
ae_title = "X"
host = "h"
port = 1
ca_certificates = "missing.pem"
''')
        keys = sorted(p.split(":")[0] for p in found)
        self.assertEqual(keys, sorted([
            "scu.ae_title", "scu.max_associations", "scu.retries", "scu.retry_delay", "scu.colour",
            "destination[0].port", "destination[0].ae_title",
            "destination[1].name", "destination[1]", "destination[1].ca_certificates",
        ]), found)

    def test_client_certificate_needs_both_files(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x")
        found = problems('[[destination]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 1\ntls = true\n'
                         f'certificate = "{path}"\n')
        self.assertEqual(found, ["destination[0]: a client certificate needs both certificate and private_key"])

    def test_shipped_example_destination_is_valid(self):
        shipped = os.path.join(ROOT, "etc", "dicomgw.toml")
        with open(shipped) as f:
            text = f.read()
        # Uncomment the example destination's active lines (not the nested ones).
        start = text.index("# [[destination]]\n")
        example = re.sub(r"^# (\[\[destination\]\]|[a-z_]+ = .*)$", r"\1", text[start:], flags=re.M)
        text = text[:start] + example
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        c = load_config(path)
        self.assertEqual([(d.name, d.ae_title, d.host, d.port, d.tls) for d in c.destination],
                         [("pacs", "PACS", "10.0.0.5", 104, False), ("archive", None, None, None, False),
                          ("dcmtk-tls", "STORESCP", "localhost", 11113, True)])
        self.assertEqual((c.destination[1].dicomweb, c.destination[1].https),
                         ("https://archive.example.org/dicom-web", True))


class InterfaceTests(TestCase):
    def test_implementations_and_fakes_provide_the_interfaces(self):
        from twisted.internet import reactor
        from zope.interface.verify import verifyObject

        from gateway.interfaces import IDestinations, IExportQueue
        from gateway.export.destinations import Destinations
        from gateway.export.jobs import ExportService
        from gateway.testing import FakeDestinations, FakeExportQueue

        config = config_from_string(BASE)
        self.assertTrue(verifyObject(IExportQueue, ExportService(config, reactor, None, db_path=self.mktemp())))
        self.assertTrue(verifyObject(IDestinations, Destinations(config, reactor, None)))
        self.assertTrue(verifyObject(IExportQueue, FakeExportQueue()))
        self.assertTrue(verifyObject(IDestinations, FakeDestinations()))

    def test_reload_brings_new_destinations(self):
        from twisted.internet import reactor

        from gateway.export.jobs import ExportService

        export = ExportService(config_from_string(BASE), reactor, None, db_path=self.mktemp())
        self.assertEqual(export.destinations.names(), [])
        export.reconfigure(config_from_string(
            BASE + '[[destination]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\n'))
        self.assertEqual(export.destinations.names(), ["pacs"])
        self.assertEqual(export.destinations.get("pacs").ae_title, "PACS")

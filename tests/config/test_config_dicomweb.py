"""[dicomweb], listen.dicomweb and DICOMweb [[destination]] tables: defaults, keys, errors naming keys."""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from gateway.config import ConfigError, changes, config_from_string


def config(extra=""):
    return config_from_string(f'[[ae]]\ntitle = "GW"\n[[ae]]\ntitle = "OTHER"\n{extra}')


def destination(extra: str):
    return config_from_string(f'[[ae]]\ntitle = "GW"\n[[destination]]\nname = "web"\n{extra}\n').destination[0]


class DicomWebSectionTests(TestCase):
    def test_defaults_and_keys(self):
        cfg = config()
        d = cfg.dicomweb
        self.assertEqual((cfg.listen.dicomweb, d.ae, d.tls, d.max_request_bytes, d.max_parts, d.timeout),
                         ("", "", False, 8 << 30, 10000, 60.0))
        self.assertEqual(cfg.dicomweb_ae().title, "GW")  # "" is the first [[ae]]
        token = os.path.abspath(self.mktemp())
        with open(token, "w") as f:
            f.write("x" * 20 + "\n")
        cfg = config_from_string(f"""
[listen]
dicomweb = "tcp:8081"
[dicomweb]
ae = "B"
token_file = "{token}"
max_request_bytes = 2048
max_parts = 5
timeout = 3
[[ae]]
title = "A"
[[ae]]
title = "B"
""")
        d = cfg.dicomweb
        self.assertEqual((cfg.listen.dicomweb, d.ae, d.token, d.max_request_bytes, d.max_parts, d.timeout),
                         ("tcp:8081", "B", "x" * 20, 2048, 5, 3.0))
        self.assertEqual(cfg.dicomweb_ae().title, "B")
        self.assertNotIn("x" * 20, repr(d))

    def test_errors_name_their_keys(self):
        with self.assertRaises(ConfigError) as e:
            config_from_string("""
[listen]
dicomweb = "tcp:8081"
[dicomweb]
ae = "NOPE"
max_parts = 0
bogus = 1
token_file = ""
[[ae]]
title = "A"
""")
        text = "\n".join(e.exception.problems)
        self.assertIn("dicomweb.ae: 'NOPE' is not the title of any [[ae]]", text)
        self.assertIn("dicomweb.max_parts: 0 is out of range", text)
        self.assertIn("dicomweb.bogus: unknown key", text)
        self.assertIn("listen.dicomweb: 'tcp:8081' is not loopback-only", text)
        with self.assertRaises(ConfigError) as e:
            config('[listen]\ndicomweb = "nonsense:1"\n[dicomweb]\ntoken_file = "/nonexistent/token"\n')
        text = "\n".join(e.exception.problems)
        self.assertIn("listen.dicomweb: 'nonsense:1' is not a valid endpoint description", text)
        self.assertIn("dicomweb.token_file: cannot read '/nonexistent/token'", text)
        short = os.path.abspath(self.mktemp())
        with open(short, "w") as f:
            f.write("short")
        with self.assertRaises(ConfigError) as e:
            config(f'[dicomweb]\ntoken_file = "{short}"\n')
        self.assertIn("shorter than 16 characters", "\n".join(e.exception.problems))

    def test_loopback_or_client_certificates_need_no_token(self):
        for listen, extra in (("tcp:8081:interface=127.0.0.1", ""),
                              ("tcp:8081", "[dicomweb]\ntls = true\n")):
            cfg = config_from_string(f'[listen]\ndicomweb = "{listen}"\n{extra}[[ae]]\ntitle = "A"\n')
            self.assertEqual(cfg.listen.dicomweb, listen)
        with self.assertRaises(ConfigError) as e:
            config_from_string('[listen]\ndicomweb = "tcp:8081"\n[dicomweb]\ntls = true\n'
                               '[tls]\nrequire_client_certificate = false\n[[ae]]\ntitle = "A"\n')
        self.assertIn("listen.dicomweb", e.exception.problems[0])

    def test_what_a_reload_applies(self):
        old = config('[listen]\ndicomweb = "tcp:8081:interface=127.0.0.1"\n')
        new = config('[listen]\ndicomweb = "tcp:8082:interface=127.0.0.1"\n'
                     '[dicomweb]\nae = "OTHER"\ntls = true\nmax_parts = 3\ntimeout = 5\n')
        self.assertEqual(sorted(changes(old, new)), [
            ("dicomweb.ae", True), ("dicomweb.max_parts", True), ("dicomweb.timeout", True),
            ("dicomweb.tls", False), ("listen.dicomweb", False)])


class DicomWebDestinationTests(TestCase):
    def test_a_dicomweb_destination(self):
        token = os.path.abspath(self.mktemp())
        with open(token, "w") as f:
            f.write("tok\n")
        d = destination(f'dicomweb = "https://pacs.example.org:8443/dicom-web/"\ntoken_file = "{token}"')
        self.assertEqual((d.dicomweb, d.token, d.https, d.server_host),
                         ("https://pacs.example.org:8443/dicom-web", "tok", True, "pacs.example.org"))
        self.assertEqual((d.ae_title, d.host, d.port, d.tls), (None, None, None, False))
        d = destination('dicomweb = "http://10.0.0.9/dw"')
        self.assertEqual((d.https, d.server_host, d.token), (False, "10.0.0.9", ""))
        d = destination('ae_title = "PACS"\nhost = "pacs"\nport = 104')
        self.assertEqual((d.dicomweb, d.https, d.server_host), (None, False, "pacs"))

    def test_errors_name_their_keys(self):
        cases = {
            'dicomweb = "ftp://x/y"': "destination[0].dicomweb: 'ftp://x/y' is not an http:// or https:// base URL",
            'dicomweb = "https://u@x/y"': "destination[0].dicomweb:",
            'dicomweb = "https://x:99999/"': "destination[0].dicomweb:",
            'dicomweb = "https://x/"\nhost = "h"': "destination[0]: ae_title, host, port and tls are for DIMSE",
            'dicomweb = "https://x/"\ntls = true': "destination[0]: ae_title, host, port and tls are for DIMSE",
            'dicomweb = "http://x/"\nca_certificates = "/etc/hostname"': "need an https:// dicomweb URL",
            'dicomweb = "https://x/"\ntoken_file = "/nonexistent/token"': "destination[0].token_file: cannot read",
            'ae_title = "A"\nhost = "h"\nport = 104\ntoken_file = "/etc/hostname"':
                "destination[0].token_file: only a dicomweb destination takes a token_file",
            'host = "h"': "destination[0].ae_title: required",
        }
        for extra, fragment in cases.items():
            with self.assertRaises(ConfigError) as e:
                destination(extra)
            self.assertTrue(any(fragment in p for p in e.exception.problems), (extra, e.exception.problems))

    def test_a_refused_value_is_named_once(self):
        with self.assertRaises(ConfigError) as e:
            destination('ae_title = "A"\nhost = "h"\nport = 70000')
        self.assertEqual(e.exception.problems, ["destination[0].port: 70000 is out of range 1..65535"])

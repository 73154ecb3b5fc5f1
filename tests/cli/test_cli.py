from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial import unittest

from gateway import cli
from gateway.cli.devcerts import make_dev_certs

from tests import ROOT

SHIPPED = os.path.join(ROOT, "etc", "dicomgw.toml")
DICOMGW = os.path.join(os.path.dirname(sys.executable), "dicomgw")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class CheckConfigTests(unittest.TestCase):
    def run_cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_good_file(self):
        # The shipped file names etc/tls/*, relative to where it is run.
        work = os.path.abspath(self.mktemp())
        make_dev_certs(os.path.join(work, "etc", "tls"))
        result = subprocess.run([DICOMGW, "check-config", SHIPPED], cwd=work, capture_output=True, text=True,
                                timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("valid", result.stdout)

    def test_files_are_checked_as_start_up_checks_them(self):
        # Every file the configuration names, each problem by key and file,
        # all in one list: a missing certificate, a key that is not PEM, a
        # CA bundle of no certificate, a destination's client key that does
        # not belong to its certificate, an observer that does not import,
        # beside a bad value.
        certs = os.path.abspath(self.mktemp())
        make_dev_certs(certs)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"""
[listen]
dicom_tls = "tcp:0"
[tls]
certificate = "{certs}/missing.pem"
private_key = "{certs}/ca.pem"
ca_certificates = "{certs}/ca.key"
[timeouts]
artim = -1
[notify]
observers = ["nosuch.module.Factory"]
[[ae]]
title = "A"
[[destination]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104
tls = true
certificate = "{certs}/client.pem"
private_key = "{certs}/server.key"
""")
        code, out, err = self.run_cli("check-config", path)
        self.assertEqual(code, 1)
        self.assertIn(f"invalid configuration in {path}", err)
        for expected in (f"tls.certificate: cannot read {certs}/missing.pem: No such file or directory",
                         f"tls.private_key: {certs}/ca.pem holds no PEM private key",
                         f"tls.ca_certificates: {certs}/ca.key holds no PEM certificate",
                         f"destination[0].private_key: {certs}/server.key does not match {certs}/client.pem",
                         "notify.observers[0]: cannot import 'nosuch.module.Factory'",
                         "timeouts.artim: -1 is out of range"):
            self.assertIn(expected, err)
        # start-up refuses the same file with the same list, and no usage text
        result = subprocess.run([TWISTD, "-n", "--pidfile=", "dicomgw", "--config", path], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.strip(), err.strip())
        self.assertNotIn("Usage:", result.stdout + result.stderr)
        self.assertNotIn("--config=", result.stdout + result.stderr)

    def test_a_refused_key_is_not_checked_again_as_a_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[listen]\ndicom_tls = "tcp:0"\n[tls]\ncertificate = 7\n'
                    'private_key = "/nonexistent/k"\nca_certificates = "/nonexistent/c"\n[[ae]]\ntitle = "A"\n')
        code, out, err = self.run_cli("check-config", path)
        self.assertEqual(code, 1)
        self.assertIn("tls.certificate: expected a string", err)
        self.assertEqual(err.count("tls.certificate"), 1, err)
        self.assertIn("tls.private_key: cannot read /nonexistent/k", err)
        self.assertIn("tls.ca_certificates: cannot read /nonexistent/c", err)

    def test_bad_file_lists_every_problem(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[gateway]\nmax_pdu_length = "big"\n[timeouts]\ndimse = -4\n[[ae]]\ntitle = "OK"\n')
        code, out, err = self.run_cli("--config", path, "check-config")
        self.assertEqual(code, 1)
        self.assertIn("gateway.max_pdu_length", err)
        self.assertIn("timeouts.dimse", err)
        self.assertIn(path, err)

    def test_management_api_rule_is_checked(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[listen]\nhttp = "tcp:8080"\n[http]\ntoken_file = ""\n[[ae]]\ntitle = "OK"\n')
        code, out, err = self.run_cli("check-config", path)
        self.assertEqual(code, 1)
        self.assertIn("listen.http: 'tcp:8080' is not loopback-only", err)
        token = self.mktemp()
        with open(token, "w") as f:
            f.write("a-long-enough-token-value\n")
        with open(path, "w") as f:
            f.write(f'[listen]\nhttp = "tcp:8080"\n[http]\ntoken_file = "{token}"\n[[ae]]\ntitle = "OK"\n')
        code, out, err = self.run_cli("check-config", path)
        self.assertEqual(code, 0, err)

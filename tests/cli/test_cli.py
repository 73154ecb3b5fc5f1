from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial import unittest

from gateway import cli

from tests import ROOT

SHIPPED = os.path.join(ROOT, "etc", "dicomgw.toml")


class CheckConfigTests(unittest.TestCase):
    def run_cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_good_file(self):
        code, out, err = self.run_cli("check-config", SHIPPED)
        self.assertEqual(code, 0, err)
        self.assertIn("valid", out)

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

"""The STOW-RS benchmark still runs end to end (a quick run; nothing is timed here)."""

from __future__ import annotations

import os

from twisted.trial import unittest

from bench import dicomweb as B
from tests.integration.harness import require_program
from tests.integration.peers import require_orthanc, require_orthanc_dicomweb


class QuickRunTests(unittest.TestCase):
    timeout = 300

    def test_quick_run_writes_its_report(self):
        require_program("storescu")
        require_orthanc()
        require_orthanc_dicomweb()
        out = os.path.abspath(self.mktemp())
        status = B.main(["--quick", "--out", out, "--workdir", os.path.abspath(self.mktemp())])
        self.assertEqual(status, 0)
        with open(os.path.join(out, "dicomweb-quick.md")) as f:
            text = f.read()
        for row in ("DCMTK storescu -> dicomgw DIMSE", "STOW-RS -> dicomgw, 1 request of 50",
                    "STOW-RS -> dicomgw, 5 requests of 10", "STOW-RS -> Orthanc, 1 request of 50",
                    "64 MiB instance via STOW-RS at < 150 MB peak RSS"):
            self.assertIn(row, text)
        self.assertNotIn("| NO |", text)

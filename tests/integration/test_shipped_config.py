"""The README's run command on the shipped configuration: ``dicomgw dev-certs``
then ``twistd``, with the TLS port enabled, works out of the box."""

from __future__ import annotations

import os
import shutil
import sys

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.integration.harness import free_port, require_program, run
from tests.integration.test_twistd import _spawn, _stop, _wait_for_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DICOMGW = os.path.join(os.path.dirname(sys.executable), "dicomgw")


class ShippedConfigTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_dev_certs_then_twistd_serves_both_ports(self):
        require_program("echoscu")
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "etc"))
        with open(os.path.join(ROOT, "etc", "dicomgw.toml")) as f:
            shipped = f.read()
        self.assertIn('dicom_tls = "tcp:2762"', shipped)
        plain, tls = free_port(), free_port()
        # Only the ports change (the shipped ones may be taken on this machine),
        # and the storage watermark, which depends on how full this disk is.
        config = shipped.replace('dicom = "tcp:11112"', f'dicom = "tcp:{plain}:interface=127.0.0.1"')
        config = config.replace('dicom_tls = "tcp:2762"', f'dicom_tls = "tcp:{tls}:interface=127.0.0.1"')
        config = config.replace('http = "tcp:8080:interface=127.0.0.1"', f'http = "tcp:{free_port()}:interface=127.0.0.1"')
        config = config.replace("watermark_percent = 75", "watermark_percent = 100")
        config = config.replace("reserved_gb = 5", "reserved_gb = 0")
        self.assertNotIn("watermark_percent = 75", config)
        with open(os.path.join(workdir, "dicomgw.toml"), "w") as f:
            f.write(config)

        # Before dev-certs: start-up fails, naming the missing file.
        out, err, code = yield getProcessOutputAndValue(
            os.path.join(os.path.dirname(sys.executable), "twistd"),
            ["-n", "--pidfile=", "dicomgw", "--config", "dicomgw.toml"], path=workdir, env=dict(os.environ))
        self.assertNotEqual(code, 0)
        self.assertIn(b"tls.certificate: cannot read etc/tls/server.pem", out + err)

        out, err, code = yield getProcessOutputAndValue(DICOMGW, ["dev-certs"], path=workdir, env=dict(os.environ))
        self.assertEqual(code, 0, err)
        self.assertIn(b"development-only", out)
        self.assertTrue(os.path.exists(os.path.join(workdir, "etc", "tls", "server.pem")))

        proc = _spawn(workdir, os.path.join(workdir, "twistd.log"))
        self.addCleanup(_stop, proc)
        yield _wait_for_port(plain)
        yield _wait_for_port(tls)
        tls_dir = os.path.join(workdir, "etc", "tls")
        out, err, code = yield run("echoscu", "-aec", "DICOMGW", "127.0.0.1", str(plain))
        self.assertEqual(code, 0, err)
        out, err, code = yield run("echoscu", "+tls", f"{tls_dir}/client.key", f"{tls_dir}/client.pem",
                                   "+cf", f"{tls_dir}/ca.pem", "--profile-bcp195-nd",
                                   "-aec", "DICOMGW", "127.0.0.1", str(tls))
        self.assertEqual(code, 0, err)
        shutil.rmtree(tls_dir)

"""The README's run command on the shipped configuration: ``dicomgw dev-certs``
then ``twistd``, with the TLS port enabled, works out of the box."""

from __future__ import annotations

import json
import os
import shutil
import sys

from twisted.internet import defer, reactor, task
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
        http = free_port()
        config = config.replace('http = "tcp:8080:interface=127.0.0.1"', f'http = "tcp:{http}:interface=127.0.0.1"')
        # and the port of the README's TLS example's storescp
        storescp_port = free_port()
        self.assertIn("port = 11113\n", config)
        config = config.replace("port = 11113\n", f"port = {storescp_port}\n")
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

        # The README's "Try it": pydicom's CT_small.dcm to both ports, then
        # to storescp over mutual TLS with dicomgw send, as written there.
        from pydicom.data import get_testdata_file

        with open(os.path.join(ROOT, "README.md")) as f:
            readme = f.read()
        self.assertIn("""get_testdata_file("CT_small.dcm")""", readme)
        self.assertIn(".venv/bin/dicomgw send -d dcmtk-tls", readme)
        ct = get_testdata_file("CT_small.dcm")
        out, err, code = yield run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(plain), ct)
        self.assertEqual(code, 0, err)
        out, err, code = yield run("storescu", "+tls", f"{tls_dir}/client.key", f"{tls_dir}/client.pem", "+cf",
                                   f"{tls_dir}/ca.pem", "--profile-bcp195-nd", "-aec", "DICOMGW", "127.0.0.1",
                                   str(tls), ct)
        self.assertEqual(code, 0, err)
        received = os.path.join(workdir, "var", "storescp")
        os.makedirs(received)
        yield start_process(self, "storescp", ["+tls", "etc/tls/server.key", "etc/tls/server.pem", "+cf",
                                                         "etc/tls/ca.pem", "-rc", "-aet", "STORESCP", "-od",
                                                         "var/storescp", str(storescp_port)], storescp_port, workdir)
        out, err, code = yield getProcessOutputAndValue(
            DICOMGW, ["--config", "dicomgw.toml", "send", "-d", "dcmtk-tls", ct], path=workdir, env=dict(os.environ))
        self.assertEqual(code, 0, (out, err))
        self.assertEqual(len(os.listdir(received)), 1)
        shutil.rmtree(tls_dir)


@defer.inlineCallbacks
def start_process(testcase, program, args, port, cwd):
    """A peer program run in ``cwd`` until the test ends; fires once ``port`` listens."""
    import subprocess

    proc = subprocess.Popen([require_program(program), *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    testcase.addCleanup(_stop, proc)
    yield _wait_for_port(port)
    return proc


class PipelineExampleTests(unittest.TestCase):
    """etc/pipeline-example.toml runs beside the shipped configuration, with
    the README's command, and its pipeline writes its summary."""

    timeout = 90

    def test_ports_and_storage_of_its_own(self):
        from gateway.config import load_config

        shipped = load_config(os.path.join(ROOT, "etc", "dicomgw.toml"))
        example = load_config(os.path.join(ROOT, "etc", "pipeline-example.toml"))

        def ports(config):
            return {d.split(":")[1] for d in (config.listen.dicom, config.listen.dicom_tls, config.listen.http,
                                              config.listen.dicomweb) if d}

        self.assertEqual(ports(shipped) & ports(example), set())
        self.assertNotEqual(os.path.abspath(shipped.gateway.storage), os.path.abspath(example.gateway.storage))
        self.assertFalse(os.path.abspath(example.gateway.storage).startswith(
            os.path.abspath(shipped.gateway.storage) + os.sep))
        # The 11113 of the README's TLS example, and every port there, differ.
        tls_example = shipped.destination_named("dcmtk-tls")
        self.assertNotIn(str(tls_example.port), ports(shipped) | ports(example))

    @defer.inlineCallbacks
    def test_the_readme_command_runs_the_pipeline(self):
        from pydicom.data import get_testdata_file

        require_program("storescu")
        with open(os.path.join(ROOT, "README.md")) as f:
            readme = f.read()
        self.assertIn(".venv/bin/twistd -n dicomgw --config etc/pipeline-example.toml", readme)
        workdir = os.path.abspath(self.mktemp())
        shutil.copytree(os.path.join(ROOT, "etc", "pipelines"), os.path.join(workdir, "etc", "pipelines"))
        port = free_port()
        with open(os.path.join(ROOT, "etc", "pipeline-example.toml")) as f:
            example = f.read()
        # Only the port changes: the shipped one may be taken on this machine.
        self.assertIn('dicom = "tcp:11114:interface=127.0.0.1"', example)
        with open(os.path.join(workdir, "etc", "pipeline-example.toml"), "w") as f:
            f.write(example.replace("tcp:11114:", f"tcp:{port}:"))
        import subprocess

        log = open(os.path.join(workdir, "twistd.out"), "w")
        self.addCleanup(log.close)
        proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "dicomgw",
                                 "--config", "etc/pipeline-example.toml"], cwd=workdir, stdout=log,
                                stderr=subprocess.STDOUT)
        self.addCleanup(_stop, proc)
        yield _wait_for_port(port)
        out, err, code = yield run("storescu", "-aec", "PIPELINE", "127.0.0.1", str(port),
                                   get_testdata_file("CT_small.dcm"))
        self.assertEqual(code, 0, err)
        outputs = os.path.join(workdir, "var", "pipeline-example", "outputs")
        found = []
        for _ in range(300):  # 30 s: the payload closes 5 s after the last instance
            found = [os.path.join(outputs, p, "summary", "summary.json")
                     for p in (os.listdir(outputs) if os.path.isdir(outputs) else ())]
            found = [p for p in found if os.path.exists(p)]
            if found:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(found), 1, os.listdir(workdir))
        with open(found[0]) as f:
            summary = json.load(f)
        self.assertEqual(summary["instances"], 1)

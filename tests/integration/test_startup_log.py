"""A normal start of ``twistd -n dicomgw`` says what it set up, a line each, and nothing else."""

from __future__ import annotations

import os
import re

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.integration.harness import free_port, gateway_config, make_certificates
from tests.integration.test_twistd import _spawn, _stop, _wait_for_port


class StartupLogTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_one_line_per_listener_storage_pipeline_and_destination(self):
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        certs = make_certificates(self)
        dicom, dicom_tls, http, web = (free_port() for _ in range(4))
        text = gateway_config("var/dicomgw", aes=(), tls_dir=certs, fsync=True, dicomweb=f"tcp:{web}:interface=127.0.0.1")
        text = text.replace('dicom = "tcp:0:interface=127.0.0.1"',
                            f'dicom = "tcp:{dicom}:interface=127.0.0.1"\nhttp = "tcp:{http}:interface=127.0.0.1"')
        text = text.replace('dicom_tls = "tcp:0:interface=127.0.0.1"',
                            f'dicom_tls = "tcp:{dicom_tls}:interface=127.0.0.1"')
        text += f"""
[scu]
certificate = "{certs}/client.pem"
private_key = "{certs}/client.key"
[pipeline.summary]
command = ["/bin/true", "{{manifest}}"]
export = ["pacs"]
[[destination]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104
tls = true
[[destination]]
name = "archive"
dicomweb = "http://127.0.0.1:9/dicom-web"
[[ae]]
title = "DICOMGW"
pipelines = ["summary"]
"""
        with open(os.path.join(workdir, "dicomgw.toml"), "w") as f:
            f.write(text)
        log = os.path.join(workdir, "twistd.log")
        proc = _spawn(workdir, log)
        self.addCleanup(_stop, proc)
        for port in (dicom, dicom_tls, http, web):
            yield _wait_for_port(port)
        # The ports listen before the services start: wait for the last line
        # of a start (bounded), then stop.
        for _ in range(200):
            with open(log) as f:
                if "pipeline summary:" in f.read():
                    break
            yield task.deferLater(reactor, 0.1, lambda: None)
        _stop(proc)
        with open(log) as f:
            lines = [line.rstrip("\n").split("] ", 1)[-1] for line in f]
        storage = os.path.join(workdir, "var", "dicomgw")
        expected = [
            f"DICOM listening on 127.0.0.1:{dicom} (tcp:{dicom}:interface=127.0.0.1)",
            f"DICOM over TLS listening on 127.0.0.1:{dicom_tls} (tcp:{dicom_tls}:interface=127.0.0.1); TLS profile "
            f"bcp195-nd, client certificate required, certificate {certs}/server.pem",
            f"DICOMweb STOW-RS listening on 127.0.0.1:{web} (tcp:{web}:interface=127.0.0.1); plain HTTP",
            f"management API listening on 127.0.0.1:{http} (tcp:{http}:interface=127.0.0.1); no token",
            f"storage under {storage} (fsync on, digest blake3, refusing work at 100% used or under 0 GiB free); "
            f"index {storage}/dicomgw.sqlite",
            f"destination pacs: C-STORE to PACS at 127.0.0.1:104 over TLS (client certificate {certs}/client.pem)",
            "destination archive: STOW-RS to http://127.0.0.1:9/dicom-web",
            "pipeline summary: command /bin/true {manifest} (for AE titles DICOMGW; concurrency 1, timeout 3600 s, "
            "retries 3; results to pacs)",
        ]
        for line in expected:
            self.assertEqual(lines.count(line), 1, (line, lines))
        text = "\n".join(lines)
        for noise in ("Traceback", "Starting factory", "Stopping factory", "object at 0x", "Unhandled", "Error",
                      "WARN", "deprecated"):
            self.assertNotIn(noise, text)
        # Besides ours, only twistd's own lines, the reactor's port lines and
        # the lines of the connections that found the ports open.
        ours = set(expected)
        others = [line for line in lines if line not in ours and not re.match(
            r"(twistd \S+ \(.*\) starting up\.|reactor class: .*|\S+( \(TLS\))? starting on \d+|"
            r"association .* connection closed before association|Received SIGTERM, shutting down\.|\(TCP Port \d+ Closed\)|Main loop terminated\.|Server Shut Down\.)$",
            line)]
        self.assertEqual(others, [])

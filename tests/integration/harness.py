"""Run a gateway in this process and real peers (DCMTK, pynetdicom) against it.

Peers are required when ``CI=true``: a missing one fails the test there
instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import textwrap

from twisted.internet import defer, reactor, threads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest

from gateway.config import config_from_string
from gateway.tap import makeService
from gateway.testing import listening_port

IN_CI = os.environ.get("CI", "").lower() == "true"


def free_port() -> int:
    """A loopback TCP port nothing listens on (now): for a child process to
    bind, or for a peer whose connections must be refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def require_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            raise AssertionError(f"{name} is required in CI (install DCMTK: apt-get install dcmtk)")
        raise SkipTest(f"{name} not installed")
    return path


def require_pynetdicom():
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        if IN_CI:
            raise AssertionError("pynetdicom is required in CI (pip install '.[test]')")
        raise SkipTest("pynetdicom not installed")
    return pynetdicom


def gateway_config(storage: str, extra: str = "", aes=("DICOMGW",), **sections) -> str:
    """A config for tests: loopback, ephemeral port, short timeouts."""
    ae_tables = "\n".join(f'[[ae]]\ntitle = "{t}"\n' for t in aes)
    text = f"""
    [gateway]
    storage = "{storage}"
    max_pdu_length = {sections.get("max_pdu_length", 131072)}
    max_associations = {sections.get("max_associations", 25)}
    reject_unknown_sources = {str(sections.get("reject_unknown_sources", False)).lower()}

    [listen]
    dicom = "tcp:0:interface=127.0.0.1"
    {'dicom_tls = "tcp:0:interface=127.0.0.1"' if sections.get("tls_dir") else ""}
    {f'dicomweb = "{sections["dicomweb"]}"' if sections.get("dicomweb") else ""}

    [timeouts]
    artim = {sections.get("artim", 5)}
    dimse = {sections.get("dimse", 30)}
    pdu = {sections.get("pdu", 30)}

    [storage]
    fsync = {str(sections.get("fsync", False)).lower()}
    watermark_percent = {sections.get("watermark_percent", 100)}
    reserved_gb = {sections.get("reserved_gb", 0)}
    check_interval = {sections.get("check_interval", 10)}
    """
    tls_dir = sections.get("tls_dir")
    if tls_dir:
        text += f"""
    [tls]
    certificate = "{tls_dir}/server.pem"
    private_key = "{tls_dir}/server.key"
    ca_certificates = "{tls_dir}/ca.pem"
    require_client_certificate = {str(sections.get("require_client_certificate", True)).lower()}
    profile = "{sections.get("profile", "bcp195-nd")}"
    """
    return textwrap.dedent(text) + extra + "\n" + ae_tables


def make_certificates(testcase) -> str:
    """A directory with a development CA, server and client certificate."""
    from gateway.cli.devcerts import make_dev_certs

    directory = os.path.abspath(testcase.mktemp())
    make_dev_certs(directory)
    return directory


class RunningGateway:
    def __init__(self, service, port, tls_port=None):
        self.service = service
        self.port = port.getHost().port
        self.tls_port = tls_port.getHost().port if tls_port is not None else None
        self.web_port = None  # the DICOMweb port, when listen.dicomweb is set
        self.scp = service.getServiceNamed("scp")

    @property
    def storage_root(self):
        return self.scp.storage.root

    def stored_files(self, ae="DICOMGW"):
        directory = os.path.join(self.scp.storage.instances_dir, ae)
        if not os.path.isdir(directory):
            return []
        return sorted(os.path.join(directory, n) for n in os.listdir(directory))


@defer.inlineCallbacks
def start_gateway(testcase, extra: str = "", aes=("DICOMGW",), storage=None, **sections):
    storage = storage or os.path.abspath(testcase.mktemp())
    config = config_from_string(gateway_config(storage, extra, aes, **sections))
    service = makeService({"config_object": config}, reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    port = yield listening_port(service)
    tls_port = None
    if sections.get("tls_dir"):
        tls_port = yield listening_port(service, "dicom_tls")
    gateway = RunningGateway(service, port, tls_port)
    if sections.get("dicomweb"):
        gateway.web_port = (yield listening_port(service, "dicomweb")).getHost().port
    return gateway


def run(program: str, *args: str, env=None):
    """Run a peer program; fire with (stdout, stderr, exit code) as text."""
    full_env = dict(os.environ)
    full_env["TCP_NODELAY"] = "1"
    full_env.update(env or {})
    d = getProcessOutputAndValue(require_program(program), list(args), env=full_env)
    return d.addCallback(lambda r: (r[0].decode(errors="replace"), r[1].decode(errors="replace"), r[2]))


def in_thread(f, *args, **kw):
    return threads.deferToThread(f, *args, **kw)


PYTHON = sys.executable

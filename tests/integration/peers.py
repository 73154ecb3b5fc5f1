"""Receivers no one here wrote: DCMTK ``storescp`` (plain and TLS) and Orthanc.

Each is started on a free loopback port with its storage in a test
directory, waited for (bounded), and stopped by the test's cleanup.  Also a
throw-away CA with server and client certificates for the TLS tests.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket

from twisted.internet import defer, error, protocol, reactor, task
from twisted.trial.unittest import SkipTest

from tests.integration.harness import IN_CI, free_port, require_program


def _stopper(proc, transport):
    """A cleanup that stops a peer process: TERM, then KILL if it is still
    there 10 s later; fires when the process has ended."""

    def stop():
        if not proc.ended.called:
            try:
                transport.signalProcess("TERM")
            except error.ProcessExitedAlready:
                pass
            timer = reactor.callLater(10, lambda: proc.ended.called or transport.signalProcess("KILL"))
            proc.ended.addBoth(lambda r: timer.active() and timer.cancel())
        return proc.ended

    return stop


class _Collect(protocol.ProcessProtocol):
    def __init__(self):
        self.output = bytearray()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data[-65536:]

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(None)


@defer.inlineCallbacks
def _wait_listening(port, proc, what, seconds=20.0):
    for _ in range(int(seconds / 0.05)):
        if proc.ended.called:
            raise AssertionError(f"{what} exited at start: {proc.output.decode(errors='replace')[-2000:]}")
        s = socket.socket()
        try:
            s.settimeout(0.2)
            s.connect(("127.0.0.1", port))
            return
        except OSError:
            pass
        finally:
            s.close()
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{what} did not listen on {port} within {seconds} s")


@defer.inlineCallbacks
def _spawn(testcase, program, args, port, env=None):
    path = require_program(program)
    proc = _Collect()
    full_env = dict(os.environ)
    full_env["TCP_NODELAY"] = "1"
    full_env.update(env or {})
    transport = reactor.spawnProcess(proc, path, [path, *args], env=full_env)

    testcase.addCleanup(_stopper(proc, transport))
    yield _wait_listening(port, proc, program)
    return proc


@defer.inlineCallbacks
def start_storescp(testcase, directory, ae="STORESCP", tls=None, server=("server_key", "server_cert")):
    """storescp writing what it receives, bit-preserving (+B), into ``directory``.

    ``tls`` is a :class:`Certs`: the server uses its server certificate (or
    the one ``server`` names) and requires a client certificate signed by its CA.
    """
    os.makedirs(directory, exist_ok=True)
    port = free_port()
    args = ["-aet", ae, "+B", "-od", directory]
    if tls is not None:
        args += ["+tls", getattr(tls, server[0]), getattr(tls, server[1]), "+cf", tls.ca_cert, "-rc", "+py"]
    args.append(str(port))
    yield _spawn(testcase, "storescp", args, port)
    return port


@defer.inlineCallbacks
def start_old_tls_server(testcase, certs):
    """``openssl s_server`` speaking TLS 1.1 only: a destination too old for any of our profiles."""
    port = free_port()
    yield _spawn(testcase, "openssl", ["s_server", "-accept", f"127.0.0.1:{port}", "-cert", certs.server_cert,
                                       "-key", certs.server_key, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0",
                                       "-quiet"], port)
    return port


def require_orthanc():
    path = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    if path is None:
        if IN_CI:
            raise AssertionError("Orthanc is required in CI (apt-get install orthanc)")
        raise SkipTest("Orthanc not installed")
    return path


def require_orthanc_dicomweb() -> str:
    """The path of Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)."""
    for path in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                 "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so"):
        if os.path.exists(path):
            return path
    if IN_CI:
        raise AssertionError("Orthanc's DICOMweb plugin is required in CI (apt-get install orthanc-dicomweb)")
    raise SkipTest("orthanc-dicomweb not installed")


@defer.inlineCallbacks
def start_orthanc(testcase, directory, ae="ORTHANC", extra=None):
    """Orthanc with its storage in ``directory``; returns (dicom port, http port).

    ``extra`` is merged into its JSON configuration (plugins, DicomWeb)."""
    program = require_orthanc()
    os.makedirs(directory, exist_ok=True)
    dicom, http = free_port(), free_port()
    config = {
        "Name": "dicomgw-test",
        "StorageDirectory": os.path.join(directory, "db"),
        "IndexDirectory": os.path.join(directory, "db"),
        "DicomAet": ae,
        "DicomPort": dicom,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "Plugins": [],
        "StorageCompression": False,
        "OverwriteInstances": True,
    }
    config.update(extra or {})
    path = os.path.join(directory, "orthanc.json")
    with open(path, "w") as f:
        json.dump(config, f)
    proc = _Collect()
    transport = reactor.spawnProcess(proc, program, [program, path], env=dict(os.environ))

    testcase.addCleanup(_stopper(proc, transport))
    yield _wait_listening(dicom, proc, "Orthanc")
    yield _wait_listening(http, proc, "Orthanc (HTTP)")
    return dicom, http


class Certs:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (PEM files)."""

    def __init__(self, directory):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
        import ipaddress

        os.makedirs(directory, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)

        def name(cn):
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def write(fname, data):
            p = os.path.join(directory, fname)
            with open(p, "wb") as f:
                f.write(data)
            return p

        def key_pem(key):
            return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption())

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(name("dicomgw test CA")).issuer_name(name("dicomgw test CA"))
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        self.ca_cert = write("ca.pem", ca.public_bytes(serialization.Encoding.PEM))

        def leaf(cn, san, usage, valid_days=(-1, 2)):
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                       .public_key(key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now + datetime.timedelta(days=valid_days[0]))
                       .not_valid_after(now + datetime.timedelta(days=valid_days[1]))
                       .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
            if san is not None:
                builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            cert = builder.sign(ca_key, hashes.SHA256())
            return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

        cert, key = leaf("127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                         ExtendedKeyUsageOID.SERVER_AUTH)
        self.server_cert, self.server_key = write("server.pem", cert), write("server.key", key)
        cert, key = leaf("dicomgw test client", None, ExtendedKeyUsageOID.CLIENT_AUTH)
        self.client_cert, self.client_key = write("client.pem", cert), write("client.key", key)
        # Server certificates that must fail: for another host, and expired.
        cert, key = leaf("other.example", [x509.DNSName("other.example")], ExtendedKeyUsageOID.SERVER_AUTH)
        self.wronghost_cert, self.wronghost_key = write("wronghost.pem", cert), write("wronghost.key", key)
        cert, key = leaf("127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                         ExtendedKeyUsageOID.SERVER_AUTH, valid_days=(-3, -1))
        self.expired_cert, self.expired_key = write("expired.pem", cert), write("expired.key", key)
        # A second, unrelated CA: a server certificate it did not sign must fail.
        other_key = ec.generate_private_key(ec.SECP256R1())
        other = (x509.CertificateBuilder().subject_name(name("other CA")).issuer_name(name("other CA"))
                 .public_key(other_key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
                 .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                 .sign(other_key, hashes.SHA256()))
        self.other_ca_cert = write("other-ca.pem", other.public_bytes(serialization.Encoding.PEM))
        # A client certificate from that other CA: a server trusting only ours refuses it.
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name("stranger")).issuer_name(other.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(other_key, hashes.SHA256()))
        self.stranger_cert = write("stranger.pem", cert.public_bytes(serialization.Encoding.PEM))
        self.stranger_key = write("stranger.key", key_pem(key))

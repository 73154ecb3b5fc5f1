"""TLS for the DICOM port: PS3.15 Annex B profiles as Twisted ``CertificateOptions``.

:func:`server_options` reads the PEM files named in ``[tls]`` and returns the
options for ``TLSMemoryBIOFactory(options, False, factory)``.  A file that is
missing, unreadable or not what it should be raises
:class:`~gateway.config.ConfigError` naming the key and the file: the gateway
never falls back to a plain port.

Profiles (our reading of PS3.15 B.9-B.11 and BCP 195; every profile refuses
TLS 1.0/1.1, RC4, 3DES, CBC with SHA-1, NULL and anonymous suites):

- ``bcp195``: TLS 1.2 and 1.3.  TLS 1.2 with ECDHE AES-GCM, and, for older
  peers, ECDHE AES-CBC with SHA-256/SHA-384.
- ``bcp195-nd`` (non-downgrading, the default): TLS 1.2 and 1.3; TLS 1.2 with
  ECDHE AES-GCM only.
- ``bcp195-ex`` (extended): TLS 1.2 and 1.3; TLS 1.2 with ECDHE
  AES-256-GCM-SHA384 only.

TLS 1.3 suites are restricted in every profile to TLS_AES_128_GCM_SHA256 and
TLS_AES_256_GCM_SHA384 (no ChaCha20).  ``CertificateOptions`` has no option
for TLS 1.3 suites, so we set them on the ``SSL.Context`` it builds:
``getContext()`` makes the context once and hands the same one to every
connection, so one call to pyOpenSSL's ``set_tls13_ciphersuites`` on it is
enough.  DHE suites are not offered: the gateway configures no
Diffie-Hellman parameters, and ECDHE gives the same forward secrecy.
"""

from __future__ import annotations

import os

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamClientEndpoint
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from gateway.config import ConfigError
from gateway.interfaces import IReconfigurable

_GCM = [
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
]
_CBC_SHA2 = [
    "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-RSA-AES128-SHA256",
    "ECDHE-ECDSA-AES256-SHA384",
    "ECDHE-RSA-AES256-SHA384",
]

PROFILES = {
    # name: (TLS 1.2 OpenSSL cipher names, in order of preference)
    "bcp195": _GCM + _CBC_SHA2,
    "bcp195-nd": _GCM,
    "bcp195-ex": ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384"],
}

# Every profile: TLS 1.2 and 1.3, nothing older.
MINIMUM_VERSION = TLSVersion.TLSv1_2

TLS13_SUITES = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"


def describe_peer_certificate(connection, now: float) -> str | None:
    """What the peer's certificate is, for a handshake that refused it: its
    subject, its issuer, and that it has expired or is not yet valid when so.
    ``connection`` is the OpenSSL connection (``transport.getHandle()``)."""
    try:
        chain = connection.get_peer_cert_chain()
    except Exception:
        return None
    if not chain:
        return "the peer sent no certificate"
    leaf = chain[0].to_cryptography()
    text = f"the peer's certificate {leaf.subject.rfc4514_string()}, issued by {leaf.issuer.rfc4514_string()}"
    if now > leaf.not_valid_after_utc.timestamp():
        return f"{text}, has expired (not valid after {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)"
    if now < leaf.not_valid_before_utc.timestamp():
        return f"{text}, is not valid yet (not before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC)"
    return text


def _read(key: str, path: str, source: str) -> bytes:
    """The file named by configuration key ``key`` (blocking), or a ConfigError naming both."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError([f"{key}: cannot read {path}: {e.strerror}"], source) from None


def _certificates(key: str, path: str, source: str) -> list[crypto.X509]:
    data = _read(key, path, source)
    certs = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for chunk in data.split(marker)[1:]:
        try:
            certs.append(crypto.load_certificate(crypto.FILETYPE_PEM, marker + chunk))
        except crypto.Error:
            raise ConfigError([f"{key}: {path} holds a certificate that is not valid PEM"], source) from None
    if not certs:
        raise ConfigError([f"{key}: {path} holds no PEM certificate"], source)
    return certs


def _trust_root(key: str, path: str | None, source: str):
    """The CAs of the file ``path`` as a trust root; None (the platform's) when there is no file."""
    if not path:
        return None
    return ssl.trustRootFromCertificates([ssl.Certificate(c) for c in _certificates(key, path, source)])


def _ciphers(profile: str) -> AcceptableCiphers:
    return AcceptableCiphers.fromOpenSSLCipherString(":".join(PROFILES[profile]))


def _collect(problems: list[str], f, *args):
    """``f(*args)``, or None with its ConfigError's problems added to ``problems``."""
    try:
        return f(*args)
    except ConfigError as e:
        problems.extend(e.problems)
        return None


def _private_key(key: str, path: str, source: str):
    try:
        return crypto.load_privatekey(crypto.FILETYPE_PEM, _read(key, path, source))
    except crypto.Error:
        raise ConfigError([f"{key}: {path} holds no PEM private key"], source) from None


def server_options(tls, source: str = "<string>") -> CertificateOptions:
    """``CertificateOptions`` for the TLS port from a ``[tls]`` section
    (:class:`gateway.config.sections.TLS`); a ConfigError lists every file
    that cannot be used."""
    problems: list[str] = []
    chain = _collect(problems, _certificates, "tls.certificate", tls.certificate, source)
    key = _collect(problems, _private_key, "tls.private_key", tls.private_key, source)
    cas = _collect(problems, _certificates, "tls.ca_certificates", tls.ca_certificates, source)
    if problems:
        raise ConfigError(problems, source)

    common = dict(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=MINIMUM_VERSION,
        acceptableCiphers=_ciphers(tls.profile),
    )
    if tls.require_client_certificate:
        trust = ssl.trustRootFromCertificates([ssl.Certificate(c) for c in cas])
        options = CertificateOptions(trustRoot=trust, **common)
    else:
        # Verify a certificate when the peer presents one; allow none.
        options = CertificateOptions(verify=True, caCerts=cas, requireCertificate=False, **common)
    try:
        context = options.getContext()
    except SSL.Error as e:
        raise ConfigError([f"tls.private_key: {tls.private_key} does not match {tls.certificate}: {e}"],
                          source) from None
    context.set_tls13_ciphersuites(TLS13_SUITES.encode("ascii"))
    return options


def _client_certificate(cert_key, cert_file, key_key, key_file, source):
    problems: list[str] = []
    _collect(problems, _certificates, cert_key, cert_file, source)
    _collect(problems, _private_key, key_key, key_file, source)
    if problems:
        raise ConfigError(problems, source)
    try:
        return ssl.PrivateCertificate.loadPEM(_read(cert_key, cert_file, source) + b"\n"
                                              + _read(key_key, key_file, source))
    except Exception as e:
        raise ConfigError([f"{key_key}: {key_file} does not match {cert_file}: {e}"], source) from None


def client_options(destination, config, key: str | None = None):
    """``optionsForClientTLS`` for a ``[[destination]]`` (blocking: reads PEM files).

    ``config`` is the whole configuration.  The server's certificate is
    checked against the destination's ``ca_certificates``, else ``[tls]
    ca_certificates`` when that file exists, else the system's CAs; the
    destination's host name or IP address (``server_host``: its ``host``,
    or its ``dicomweb`` URL's) is verified against it (service-identity).
    The client certificate offered is the destination's own, else ``[scu]
    certificate`` / ``private_key`` (none when those are "").  TLS 1.2 or
    later, TLS 1.2 with the ciphers of ``[tls] profile``.  ``key`` is how
    problems name the destination (``destination[2]``); a ConfigError
    lists every file that cannot be used.
    """
    tls, source = config.tls, config.path
    key = key or f"destination {destination.name!r}"
    ca_file, ca_key = destination.ca_certificates, f"{key}.ca_certificates"
    if not ca_file and tls.ca_certificates and os.path.isfile(tls.ca_certificates):
        ca_file, ca_key = tls.ca_certificates, "tls.ca_certificates"
    cert_file, key_file = destination.certificate, destination.private_key
    cert_key, key_key = f"{key}.certificate", f"{key}.private_key"
    if not cert_file:
        cert_file, key_file, cert_key, key_key = (config.scu.certificate, config.scu.private_key,
                                                  "scu.certificate", "scu.private_key")
    problems: list[str] = []
    trust = _collect(problems, _trust_root, ca_key, ca_file, source)
    client = None
    if cert_file:
        client = _collect(problems, _client_certificate, cert_key, cert_file, key_key, key_file, source)
    if problems:
        raise ConfigError(problems, source)
    return ssl.optionsForClientTLS(destination.server_host, trustRoot=trust, clientCertificate=client,
                                   extraCertificateOptions={"raiseMinimumTo": MINIMUM_VERSION,
                                                            "acceptableCiphers": _ciphers(tls.profile)})


def file_problems(config) -> list[str]:
    """Every certificate, key and CA file the configuration uses that
    cannot be read, parsed or matched, each naming its key and file
    (blocking): the TLS listeners' ``[tls]`` files, and each TLS
    destination's (what :func:`client_options` will read)."""
    problems: list[str] = []
    if config.listen.dicom_tls is not None or (config.listen.dicomweb and config.dicomweb.tls):
        _collect(problems, server_options, config.tls, config.path)
    for i, destination in enumerate(config.destination):
        if destination.tls or destination.https:
            _collect(problems, client_options, destination, config, f"destination[{i}]")
    return problems


def verified_client_options(host: str, ca_file: str, key: str, source: str = "<string>"):
    """``optionsForClientTLS`` for a server that is not a DICOM peer (the
    message broker), blocking: its certificate must be valid for ``host``
    and signed by a CA of ``ca_file`` ("": the system's CAs); never below
    TLS 1.2.  A file that cannot be used is a ConfigError naming ``key``."""
    return ssl.optionsForClientTLS(host, trustRoot=_trust_root(key, ca_file, source),
                                   extraCertificateOptions={"raiseMinimumTo": MINIMUM_VERSION})


@implementer(IOpenSSLServerConnectionCreator, IReconfigurable)
class ReloadableServerTLS:
    """The TLS port's connection creator; a reload swaps its certificates.

    Each new connection takes the options in force when it arrives;
    connections already open keep theirs.  On a reload with a changed
    ``[tls]`` the new options are built (the PEM files read and checked) in
    the disk thread pool; if that fails the old certificates stay in force
    and the error, naming the file, is logged.
    """

    log = Logger()

    def __init__(self, options: CertificateOptions, tls, source: str, reactor, pool):
        self.options = options
        self.tls = tls
        self.source = source
        self.reactor = reactor
        self.pool = pool

    def serverConnectionForTLS(self, protocol):
        return SSL.Connection(self.options.getContext(), None)

    def reconfigure(self, config):
        if config.tls == self.tls or config.tls is None:
            return None
        tls = config.tls
        d = deferToThreadPool(self.reactor, self.pool, server_options, tls, config.path)

        def swap(options):
            self.options, self.tls, self.source = options, tls, config.path
            self.log.info("TLS listeners: new connections use the certificate from {certificate} "
                          "(profile {profile})", event="tls.reloaded",
                          certificate=tls.certificate, profile=tls.profile)

        def keep(failure):
            problems = failure.value.problems if failure.check(ConfigError) else [str(failure.value)]
            self.log.error("TLS listeners: the new [tls] settings were NOT applied; new connections keep "
                           "the old certificate:\n{problem_text}", event="tls.reload_failed",
                           problems=problems, problem_text="\n".join(f"  - {p}" for p in problems))

        return d.addCallbacks(swap, keep)


class DicomTLSProtocol(TLSMemoryBIOProtocol):
    """Twisted's TLS layer, telling the DICOM protocol above it when the
    records decrypted from one socket read have all been handed over
    (``tls_read_done``): the protocol gives them to its core joined, once
    per read, not once per record of at most 16 KiB
    (:meth:`gateway.net.protocol.DicomProtocol.dataReceived`).

    Each write is encrypted and sent as it is made: the DICOM protocol
    writes whole PDUs.  (``TLSMemoryBIOFactory``'s own protocol holds small
    writes for the next reactor turn, and a C-STORE response waited there
    behind whatever else that turn ran, while the peer waited for it.)"""

    def dataReceived(self, data):
        try:
            super().dataReceived(data)
        finally:
            self.wrappedProtocol.tls_read_done()


class DicomTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` for the DICOM protocol: the listener's and the SCU's."""

    protocol = DicomTLSProtocol


@implementer(IStreamClientEndpoint)
class DicomClientTLSEndpoint:
    """``wrapClientTLS`` for the SCU, with :class:`DicomTLSFactory` as the TLS layer."""

    def __init__(self, options, endpoint):
        self._options = options
        self._endpoint = endpoint

    def connect(self, factory):
        d = self._endpoint.connect(DicomTLSFactory(self._options, True, factory))
        return d.addCallback(lambda tls: tls.wrappedProtocol)

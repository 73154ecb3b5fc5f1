"""Development certificates for the TLS port (``dicomgw dev-certs``).

Makes, in one directory, a development CA and a server and a client
certificate signed by it::

    ca.pem  ca.key  server.pem  server.key  client.pem  client.key

Every subject says DEVELOPMENT ONLY: these exist so that the shipped
configuration starts out of the box, and so that tests have certificates.
They are made only when missing; existing files are never overwritten.
Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")
ORGANIZATION = "dicomgw DEVELOPMENT ONLY - NOT FOR PRODUCTION"
VALID_DAYS = 825


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _certificate(subject, key, issuer, issuer_key, *, ca: bool, usage=None, names=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False, crl_sign=False,
                          content_commitment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: str, data: bytes, private: bool):
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


_DNS_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def host_names() -> list[str]:
    """localhost, and this machine's host name and fully qualified name
    when they are DNS names: what a peer on this host may call it by."""
    names = ["localhost"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and _DNS_NAME.match(name) and name.lower() not in (n.lower() for n in names):
            names.append(name)
    return names


def make_dev_certs(directory: str, hostnames=None, addresses=("127.0.0.1", "::1")) -> list[str]:
    """Create the development CA, server and client certificates in ``directory``.

    The server certificate (serverAuth) names ``hostnames`` (default:
    :func:`host_names`) and ``addresses``; the client certificate is for
    clientAuth only.

    Does nothing when all six files exist; refuses (``FileExistsError``) when
    only some do, rather than mix old and new.  Returns the paths written.
    """
    paths = {name: os.path.join(directory, name) for name in FILES}
    present = [n for n, p in paths.items() if os.path.exists(p)]
    if len(present) == len(FILES):
        return []
    if present:
        raise FileExistsError(f"{directory} already holds {', '.join(present)} but not all of {', '.join(FILES)}; "
                              "remove them to make a new set")
    os.makedirs(directory, exist_ok=True)
    hostnames = host_names() if hostnames is None else hostnames
    names = [x509.DNSName(h) for h in hostnames] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]

    ca_key = _key()
    ca_name = _name("dicomgw development CA")
    ca = _certificate(ca_name, ca_key, ca_name, ca_key, ca=True)
    server_key = _key()
    server = _certificate(_name("dicomgw development server"), server_key, ca_name, ca_key, ca=False,
                          usage=ExtendedKeyUsageOID.SERVER_AUTH, names=names)
    client_key = _key()
    client = _certificate(_name("dicomgw development client"), client_key, ca_name, ca_key, ca=False,
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH)

    pem = serialization.Encoding.PEM
    _write(paths["ca.key"], _pem_key(ca_key), True)
    _write(paths["ca.pem"], ca.public_bytes(pem), False)
    _write(paths["server.key"], _pem_key(server_key), True)
    _write(paths["server.pem"], server.public_bytes(pem), False)
    _write(paths["client.key"], _pem_key(client_key), True)
    _write(paths["client.pem"], client.public_bytes(pem), False)
    return [paths[n] for n in FILES]

"""The TLS options: profiles' cipher lists, and start-up errors that name the file."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr
import shutil

from OpenSSL import SSL
from twisted.python import usage
from twisted.trial import unittest

from gateway.config import ConfigError
from gateway.config.sections import TLS as TLSConfig
from gateway.cli.devcerts import make_dev_certs
from gateway.net.tls import PROFILES, server_options
from gateway.tap import Options

FORBIDDEN = ("RC4", "DES", "NULL", "MD5", "EXPORT", "anon", "PSK", "CHACHA")


class TLSOptionsTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        make_dev_certs(self.dir)

    def tls(self, **kw):
        paths = dict(certificate=f"{self.dir}/server.pem", private_key=f"{self.dir}/server.key",
                     ca_certificates=f"{self.dir}/ca.pem")
        paths.update(kw)
        return TLSConfig(**paths)

    def test_cipher_lists_per_profile(self):
        tls13 = ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]
        for profile, tls12 in PROFILES.items():
            ctx = server_options(self.tls(profile=profile)).getContext()
            ciphers = SSL.Connection(ctx).get_cipher_list()
            self.assertEqual(sorted(ciphers), sorted(tls13 + tls12), profile)
            for name in ciphers:
                self.assertFalse(any(bad in name for bad in FORBIDDEN), name)
                # CBC with SHA-1 MAC: "-SHA" at the end without a digest size
                self.assertFalse(name.endswith("-SHA"), name)
        self.assertNotIn("ECDHE-RSA-AES128-GCM-SHA256", PROFILES["bcp195-ex"])
        self.assertIn("ECDHE-RSA-AES128-SHA256", PROFILES["bcp195"])
        self.assertNotIn("ECDHE-RSA-AES128-SHA256", PROFILES["bcp195-nd"])

    def test_client_certificate_required_or_optional(self):
        ctx = server_options(self.tls()).getContext()
        self.assertEqual(ctx.get_verify_mode() & SSL.VERIFY_FAIL_IF_NO_PEER_CERT, SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        ctx = server_options(self.tls(require_client_certificate=False)).getContext()
        self.assertEqual(ctx.get_verify_mode() & SSL.VERIFY_FAIL_IF_NO_PEER_CERT, 0)
        self.assertEqual(ctx.get_verify_mode() & SSL.VERIFY_PEER, SSL.VERIFY_PEER)

    def test_missing_and_bad_files_name_the_key_and_file(self):
        missing = f"{self.dir}/nope.pem"
        for kw, key in ((dict(certificate=missing), "tls.certificate"),
                        (dict(private_key=missing), "tls.private_key"),
                        (dict(ca_certificates=missing), "tls.ca_certificates")):
            e = self.assertRaises(ConfigError, server_options, self.tls(**kw), "gw.toml")
            self.assertEqual(e.source, "gw.toml")
            self.assertIn(key, e.problems[0])
            self.assertIn(missing, e.problems[0])
        # A key that does not belong to the certificate:
        e = self.assertRaises(ConfigError, server_options, self.tls(private_key=f"{self.dir}/client.key"))
        self.assertIn("does not match", e.problems[0])
        # A file that is not PEM:
        e = self.assertRaises(ConfigError, server_options, self.tls(certificate=f"{self.dir}/server.key"))
        self.assertIn("no PEM certificate", e.problems[0])

    def test_twistd_refuses_to_start_without_certificates(self):
        work = self.mktemp()
        os.makedirs(work)
        config = os.path.join(work, "gw.toml")
        with open(config, "w") as f:
            f.write('[listen]\ndicom_tls = "tcp:0"\n[tls]\n'
                    f'certificate = "{work}/missing.pem"\n[[ae]]\ntitle = "A"\n')
        err = io.StringIO()
        with redirect_stderr(err):
            e = self.assertRaises(SystemExit, Options().parseOptions, ["--config", config])
        self.assertEqual(e.code, 1)
        self.assertIn(f"tls.certificate: cannot read {work}/missing.pem", err.getvalue())


class DevCertsTests(unittest.TestCase):
    def test_made_once_never_overwritten_never_mixed(self):
        d = self.mktemp()
        written = make_dev_certs(d)
        self.assertEqual(len(written), 6)
        with open(os.path.join(d, "server.pem"), "rb") as f:
            before = f.read()
        self.assertIn(b"-----BEGIN CERTIFICATE-----", before)
        self.assertEqual(make_dev_certs(d), [])
        with open(os.path.join(d, "server.pem"), "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(os.stat(os.path.join(d, "server.key")).st_mode & 0o777, 0o600)
        os.unlink(os.path.join(d, "client.key"))
        self.assertRaises(FileExistsError, make_dev_certs, d)
        shutil.rmtree(d)

    def test_subjects_say_development_only(self):
        from cryptography import x509
        d = self.mktemp()
        make_dev_certs(d)
        for name in ("ca.pem", "server.pem", "client.pem"):
            with open(os.path.join(d, name), "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
            self.assertIn("DEVELOPMENT ONLY", cert.subject.rfc4514_string())

    def test_server_for_this_host_client_for_clients(self):
        import socket

        from cryptography import x509
        from cryptography.x509.oid import ExtendedKeyUsageOID

        d = self.mktemp()
        make_dev_certs(d)

        def load(name):
            with open(os.path.join(d, name), "rb") as f:
                return x509.load_pem_x509_certificate(f.read())

        server, client = load("server.pem"), load("client.pem")
        self.assertEqual(list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
                         [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertEqual(list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
                         [ExtendedKeyUsageOID.CLIENT_AUTH])
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn("localhost", names.get_values_for_type(x509.DNSName))
        self.assertIn(socket.gethostname(), names.get_values_for_type(x509.DNSName))
        self.assertIn("127.0.0.1", [str(a) for a in names.get_values_for_type(x509.IPAddress)])

"""The TLS port with real peers: DCMTK +tls, pynetdicom with an SSLContext,
and openssl s_client probes of what must be refused."""

from __future__ import annotations

import os
import socket

from twisted.internet import defer
from twisted.trial import unittest

from gateway import ul as P
from tests import dicomfiles
from tests.integration.harness import in_thread, make_certificates, require_program, run, start_gateway
from tests.integration.test_policy import (
    VERIFICATION,
    client_context,
    collect_events,
    pynetdicom_ae,
    wait_for,
)

CLIENT_SUBJECT = "CN=dicomgw development client,O=dicomgw DEVELOPMENT ONLY - NOT FOR PRODUCTION"
APPLICATION_CONTEXT = P.DICOM_APPLICATION_CONTEXT
DCMTK_PROFILE = {"bcp195": "--profile-bcp195", "bcp195-nd": "--profile-bcp195-nd",
                 "bcp195-ex": "--profile-bcp195-ex"}


def associate_rq_bytes(called="DICOMGW", calling="OPENSSL") -> bytes:
    return P.encode_pdu(P.AssociateRQ(
        called, calling, (P.PresentationContextRQ(1, VERIFICATION, ("1.2.840.10008.1.2",)),),
        P.UserInformation(max_length=16384, implementation_class_uid="1.2.3"),
    ))


class TLSPeerTests(unittest.TestCase):
    timeout = 180

    def tls_args(self, certs):
        return ["+tls", os.path.join(certs, "client.key"), os.path.join(certs, "client.pem"),
                "+cf", os.path.join(certs, "ca.pem")]

    @defer.inlineCallbacks
    def test_dcmtk_echo_and_store_bcp195_nd_with_client_certificate(self):
        certs = make_certificates(self)
        gw = yield start_gateway(self, tls_dir=certs)
        closed = collect_events(self, "association.closed")
        src = self.mktemp()
        os.makedirs(src)
        path = dicomfiles.ct_image(os.path.join(src, "ct.dcm"), rows=64, cols=64)

        out, err, code = yield run("echoscu", *self.tls_args(certs), "--profile-bcp195-nd",
                                   "-aec", "DICOMGW", "127.0.0.1", str(gw.tls_port))
        self.assertEqual(code, 0, err)
        out, err, code = yield run("storescu", *self.tls_args(certs), "--profile-bcp195-nd",
                                   "-aec", "DICOMGW", "127.0.0.1", str(gw.tls_port), path)
        self.assertEqual(code, 0, err)
        stored = gw.stored_files()
        self.assertEqual(len(stored), 1)
        self.assertEqual(dicomfiles.dataset_bytes(stored[0]), dicomfiles.dataset_bytes(path))
        yield wait_for(lambda: len(closed) == 2)
        for event in closed:
            self.assertEqual((event["result"], event["tls"], event["tls_subject"]),
                             ("released", True, CLIENT_SUBJECT))

    @defer.inlineCallbacks
    def test_each_profile_with_the_matching_dcmtk_profile(self):
        certs = make_certificates(self)
        for profile, option in DCMTK_PROFILE.items():
            gw = yield start_gateway(self, tls_dir=certs, profile=profile)
            out, err, code = yield run("echoscu", *self.tls_args(certs), option,
                                       "-aec", "DICOMGW", "127.0.0.1", str(gw.tls_port))
            self.assertEqual(code, 0, f"{profile}: {err}")

    @defer.inlineCallbacks
    def test_dcmtk_without_client_certificate_gets_no_association(self):
        certs = make_certificates(self)
        gw = yield start_gateway(self, tls_dir=certs)
        closed = collect_events(self, "association.closed")
        out, err, code = yield run("echoscu", "+tla", "+cf", os.path.join(certs, "ca.pem"),
                                   "-aec", "DICOMGW", "127.0.0.1", str(gw.tls_port))
        self.assertNotEqual(code, 0)
        yield wait_for(lambda: len(closed) == 1)
        self.assertEqual(closed[0]["result"], "lost")
        self.assertEqual(closed[0]["called_ae"], "-")  # no A-ASSOCIATE-RQ ever reached the SCP

    @defer.inlineCallbacks
    def test_pynetdicom_with_ssl_context_and_tcp_nodelay(self):
        certs = make_certificates(self)
        gw = yield start_gateway(self, tls_dir=certs)
        ctx = client_context(certs)
        src = self.mktemp()
        os.makedirs(src)
        path = dicomfiles.small_instance(os.path.join(src, "sc.dcm"))
        nodelay = []

        def talk():
            ae = pynetdicom_ae()
            ae.add_requested_context(VERIFICATION)
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2")
            assoc = ae.associate("127.0.0.1", gw.tls_port, ae_title="DICOMGW", tls_args=(ctx, "localhost"))
            assert assoc.is_established
            try:
                from twisted.internet import reactor, threads
                threads.blockingCallFromThread(reactor, lambda: nodelay.extend(
                    a.provider.transport.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                    for a in gw.scp.active))
                return assoc.send_c_echo().Status, assoc.send_c_store(path).Status
            finally:
                assoc.release()

        statuses = yield in_thread(talk)
        self.assertEqual(statuses, (0, 0))
        self.assertEqual(len(nodelay), 1)
        self.assertTrue(nodelay[0], "TCP_NODELAY not set under TLS")
        self.assertEqual(dicomfiles.dataset_bytes(gw.stored_files()[0]), dicomfiles.dataset_bytes(path))

        def without_certificate():
            ae = pynetdicom_ae()
            ae.add_requested_context(VERIFICATION)
            assoc = ae.associate("127.0.0.1", gw.tls_port, ae_title="DICOMGW",
                                 tls_args=(client_context(certs, with_certificate=False), "localhost"))
            return assoc.is_established

        established = yield in_thread(without_certificate)
        self.assertFalse(established)


class OpenSSLProbeTests(unittest.TestCase):
    """What every profile refuses, probed with openssl s_client."""

    timeout = 120

    @defer.inlineCallbacks
    def s_client(self, port, *args, stdin=b"", wait=1.0):
        infile = os.path.abspath(self.mktemp())
        with open(infile, "wb") as f:
            f.write(stdin)
        # s_client sends the file (an A-ASSOCIATE-RQ, say), waits a second for
        # an answer, and quits at the end of its input.
        out, err, code = yield run("sh", "-c",
                                   f'(cat "{infile}"; sleep {wait}) | timeout 10 openssl s_client '
                                   f'-connect 127.0.0.1:{port} ' + " ".join(args))
        return out + err, code

    @defer.inlineCallbacks
    def test_probes(self):
        require_program("openssl")
        certs = make_certificates(self)
        cert = f"-cert {certs}/client.pem -key {certs}/client.key -CAfile {certs}/ca.pem"
        closed = collect_events(self, "association.closed")
        for profile in ("bcp195", "bcp195-nd", "bcp195-ex"):
            gw = yield start_gateway(self, tls_dir=certs, profile=profile)
            port = gw.tls_port
            refused = {
                "TLS 1.1": "-tls1_1 -cipher DEFAULT@SECLEVEL=0",
                "TLS 1.0": "-tls1 -cipher DEFAULT@SECLEVEL=0",
                "CBC-SHA1": "-tls1_2 -cipher AES128-SHA",
                "ECDHE CBC-SHA1": "-tls1_2 -cipher ECDHE-RSA-AES128-SHA",
                "NULL": "-tls1_2 -cipher NULL-SHA256@SECLEVEL=0",
                "ECDHE NULL": "-tls1_2 -cipher ECDHE-RSA-NULL-SHA@SECLEVEL=0",
                "TLS 1.3 ChaCha20": "-tls1_3 -ciphersuites TLS_CHACHA20_POLY1305_SHA256",
            }
            # (RC4 and 3DES cannot be offered by this OpenSSL build at all;
            # tests/net/test_tls.py checks our cipher lists never hold them.)
            if profile != "bcp195":
                refused["CBC-SHA256"] = "-tls1_2 -cipher ECDHE-RSA-AES128-SHA256"
            if profile == "bcp195-ex":
                refused["AES-128-GCM"] = "-tls1_2 -cipher ECDHE-RSA-AES128-GCM-SHA256"
            names = list(refused)
            texts = yield defer.gatherResults([self.s_client(port, cert, refused[n], wait=0.3) for n in names])
            for name, (text, _) in zip(names, texts):
                self.assertIn("Cipher is (NONE)", text, f"{profile}: {name} was not refused:\n{text}")
                self.assertRegex(text, r"alert (protocol version|handshake failure)|no (protocols|cipher)",
                                 f"{profile}: {name}")

            # The good case: TLS 1.3 and TLS 1.2 GCM with a client certificate
            # make a session, and the A-ASSOCIATE-RQ gets an A-ASSOCIATE-AC.
            # No client certificate: no session.  TLS 1.2 fails the handshake;
            # TLS 1.3 finishes the client side, then the server's "certificate
            # required" alert arrives and the A-ASSOCIATE-RQ is never answered.
            rq = associate_rq_bytes()
            good = ("-tls1_3", "-tls1_2 -cipher ECDHE-RSA-AES256-GCM-SHA384")
            texts = yield defer.gatherResults(
                [self.s_client(port, cert, args, stdin=rq) for args in good]
                + [self.s_client(port, f"-CAfile {certs}/ca.pem {v}", stdin=rq) for v in ("-tls1_2", "-tls1_3")])
            for args, (text, _) in zip(good, texts):
                self.assertRegex(text, r"Cipher is (TLS_AES|ECDHE-RSA-AES256-GCM)", f"{profile} {args}:\n{text}")
                self.assertIn(APPLICATION_CONTEXT, text)  # the A-ASSOCIATE-AC came back
            (tls12, _), (tls13, _) = texts[2:]
            self.assertIn("alert handshake failure", tls12)
            self.assertIn("alert certificate required", tls13)
            self.assertNotIn(APPLICATION_CONTEXT, tls12 + tls13)
        # Only the six good sessions reached the SCP, each with an association.
        yield wait_for(lambda: len([e for e in closed if e["called_ae"] == "DICOMGW"]) == 6)
        accepted = [e for e in closed if e["called_ae"] == "DICOMGW"]
        self.assertEqual({e["tls_subject"] for e in accepted}, {CLIENT_SUBJECT})

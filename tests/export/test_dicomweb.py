"""STOW-RS export pieces: the streamed body, batches, the answer's outcomes.

Destination configuration is in tests/config/test_config_dicomweb.py;
sending to real servers (our own receiver, Orthanc) in
tests/integration/test_dicomweb.py.
"""

from __future__ import annotations

import json
import os

from OpenSSL import SSL
from twisted.internet import defer, error, reactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseNeverReceived
from zope.interface.verify import verifyObject

from gateway.export import dicomweb as W
from gateway.threads import WorkerPool


class Consumer:
    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data


class BodyTests(TestCase):
    @defer.inlineCallbacks
    def test_the_body_is_the_files_framed(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        files = []
        for i, size in enumerate((0, 1, W.CHUNK + 5)):
            path = os.path.join(directory, f"f{i}")
            with open(path, "wb") as f:
                f.write(bytes([65 + i]) * size)
            files.append((path, size))
        pool = WorkerPool(1, "test-body")
        pool.start()
        self.addCleanup(pool.stop)
        body = W.MultipartFiles(files, reactor, pool)
        verifyObject(W.IBodyProducer, body)
        consumer = Consumer()
        d = body.startProducing(consumer)
        body.pauseProducing()
        body.resumeProducing()
        yield d
        self.assertEqual(len(consumer.data), body.length)
        b = body.boundary.encode()
        expected = b"".join(
            (b"\r\n" if i else b"") + b"--" + b + b"\r\nContent-Type: application/dicom\r\nContent-Length: "
            + str(size).encode() + b"\r\n\r\n" + bytes([65 + i]) * size for i, (_p, size) in enumerate(files)
        ) + b"\r\n--" + b + b"--\r\n"
        self.assertEqual(bytes(consumer.data), expected)
        self.assertIn(b"boundary=" + b, body.content_type)

    def test_batches(self):
        def f(size):
            return {"header": ("1.2", "1.3", "1.2.840.10008.1.2", 200, size - 200)}

        sizes = [10 << 20] * 30 + [300 << 20] + [1000] * 120
        batches = list(W._batches([f(s) for s in sizes]))
        self.assertEqual([len(b) for b in batches], [25, 5, 1, 50, 50, 20])


class OutcomeTests(TestCase):
    def answer(self, referenced=(), failed=()):
        body = {}
        if referenced:
            body["00081199"] = {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in referenced]}
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": [
                {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [code]}}
                for u, code in failed]}
        return json.dumps(body).encode()

    def test_per_file_states(self):
        uids = ["1.1", "1.2", "1.3", "1.4"]
        out = W.file_outcomes(202, self.answer(["1.1"], [("1.2", 0xA700), ("1.3", 0x0122)]), uids)
        self.assertEqual([o[0] for o in out], ["sent", "retry", "failed", "retry"])
        self.assertEqual(out[1], ("retry", 0xA700, "destination answered Failure Reason 0xA700"))
        self.assertIn("does not list it", out[3][2])
        self.assertEqual(W.file_outcomes(200, b"", uids), [("sent", None, None)] * 4)
        self.assertEqual({o[0] for o in W.file_outcomes(409, self.answer(failed=[(u, 0xC122) for u in uids]), uids)},
                         {"failed"})
        out = W.file_outcomes(500, b"boom", uids)
        self.assertEqual(out[0], ("retry", None, "HTTP 500: boom"))
        self.assertEqual(W.file_outcomes(415, b"", uids)[0][0], "failed")
        self.assertEqual(W.file_outcomes(200, b"not json", uids)[0][0], "sent")
        self.assertEqual(W.file_outcomes(200, b"[1, 2]", uids)[0][0], "sent")


class DescribeTests(TestCase):
    def test_a_failed_request_in_the_words_of_the_dimse_export(self):
        clock = Clock()
        watch = W._Progress(clock, 5, lambda: None)
        self.assertEqual(W._describe(error.ConnectionRefusedError(), watch), "connection refused")
        tls = ResponseNeverReceived([Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))])
        self.assertEqual(W._describe(tls, watch), "connection failed: TLS failure: certificate verify failed")
        clock.advance(5)  # nothing went out or came back for 5 s
        self.assertTrue(watch.fired)
        self.assertEqual(W._describe(error.ConnectionLost(), watch), "timeout: no progress for 5 s")

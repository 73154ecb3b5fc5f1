"""STOW-RS core: routing, media types, Part 10 parts, the receiver, the answer.

The receiver runs against the SCP's shared state over an in-memory storage
(gateway.testing): bytes in, stored data sets and outcomes out; real
storage and real clients are in tests/integration/test_dicomweb.py.
"""

from __future__ import annotations

import os
import random

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from gateway.config import config_from_string
from gateway.ingest import stow as S
from gateway.ingest.scp import AssociationInfo
from gateway.ingest.service import SCPService
from gateway.ingest.stow_receiver import StowReceiver
from gateway.testing import MemoryStorage, RecordingObserver
from tests.dicomfiles import ct_image, dataset_bytes, small_instance

BOUNDARY = b"b0undary-xyz"
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"


def multipart(parts, boundary=BOUNDARY, close=True) -> bytes:
    out = bytearray()
    for i, data in enumerate(parts):
        out += (b"\r\n" if i else b"") + b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + data
    if close:
        out += b"\r\n--" + boundary + b"--\r\n"
    return bytes(out)


def config(extra=""):
    return config_from_string(f"""
[[ae]]
title = "GW"
[[ae]]
title = "CTONLY"
allowed_sop_classes = ["{CT}"]
[[ae]]
title = "NOSC"
ignored_sop_classes = ["{SC}"]
[[ae]]
title = "EXPLICIT"
transfer_syntaxes = ["1.2.840.10008.1.2.1"]
{extra}
""")


class Files:
    def __init__(self, tc, n=3):
        d = os.path.abspath(tc.mktemp())
        os.makedirs(d)
        self.study = "1.2.826.0.1.3680043.10.543.99"
        self.cts = [ct_image(os.path.join(d, f"ct{i}.dcm"), study_uid=self.study, number=i + 1, rows=32, cols=32)
                    for i in range(n)]
        self.sc = small_instance(os.path.join(d, "sc.dcm"), size=3000)

    @staticmethod
    def read(path):
        with open(path, "rb") as f:
            return f.read()


class Harness:
    def __init__(self, ae="GW", study=None, max_parts=100, cfg=None):
        self.clock = Clock()
        self.cfg = cfg or config()
        self.storage = MemoryStorage()
        self.observer = RecordingObserver()
        self.ingest = SCPService(self.cfg, self.storage, self.clock, observers=[self.observer])
        self.paused = 0
        self.info = AssociationInfo("w1-test", "", ae, "127.0.0.1:1", 0.0)
        prefix = "/dicomweb" if ae == "GW" else f"/dicomweb/vae/{ae}"
        self.receiver = StowReceiver(self.ingest, self.cfg.ae_named(ae), S.Route(ae, study, prefix), BOUNDARY,
                                     self.info, max_parts=max_parts, pause=self.pause, resume=self.resume,
                                     reactor=self.clock)

    def pause(self):
        self.paused += 1

    def resume(self):
        pass

    def run(self, body: bytes, chunk=None):
        chunk = chunk or len(body) or 1
        for i in range(0, len(body), chunk):
            self.receiver.feed(body[i:i + chunk])
        results = []
        self.receiver.close().addCallback(results.append)
        return results[0]


class RouteTests(TestCase):
    def test_the_four_forms(self):
        self.assertEqual(S.route(b"/dicomweb/studies"), S.Route("", None, "/dicomweb"))
        self.assertEqual(S.route(b"/dicomweb/studies/1.2.3?x=1"), S.Route("", "1.2.3", "/dicomweb"))
        self.assertEqual(S.route(b"/dicomweb/vae/MY%20AE/studies/"), S.Route("MY AE", None, "/dicomweb/vae/MY%20AE"))
        self.assertEqual(S.route(b"/dicomweb/vae/CT/studies/1.2"), S.Route("CT", "1.2", "/dicomweb/vae/CT"))

    def test_unknown_paths_are_404_and_bad_uids_400(self):
        for path in (b"/", b"/dicomweb", b"/dicomweb/series", b"/dicomweb/vae/studies", b"/dicomweb/vae//studies",
                     b"/dicomweb/studies/1.2/series", b"/other/studies"):
            with self.assertRaises(S.Refusal) as e:
                S.route(path)
            self.assertEqual(e.exception.status, 404, path)
        for path in (b"/dicomweb/studies/1.2.x", b"/dicomweb/studies/..", b"/dicomweb/studies/" + b"1." * 40 + b"1"):
            with self.assertRaises(S.Refusal) as e:
                S.route(path)
            self.assertEqual(e.exception.status, 400, path)

    def test_media_type(self):
        self.assertEqual(S.check_media_type(b'multipart/related; type="application/dicom"; boundary=abc'), b"abc")
        self.assertEqual(S.check_media_type(b'Multipart/Related; boundary="a b"'), b"a b")
        self.assertEqual(S.check_media_type(b"multipart/related; boundary=" + b"u" * 73), b"u" * 73)  # Orthanc's
        for value, status in ((None, 415), (b"application/dicom", 415), (b"multipart/form-data; boundary=x", 415),
                              (b'multipart/related; type="application/dicom+json"; boundary=x', 415),
                              (b'multipart/related; type="application/dicom"', 400),
                              (b"multipart/related; boundary=" + b"x" * 201, 400)):
            with self.assertRaises(S.Refusal) as e:
                S.check_media_type(value)
            self.assertEqual(e.exception.status, status, value)


class ReceiverTests(TestCase):
    def test_instances_are_stored_as_sent_whatever_the_chunking(self):
        files = Files(self)
        body = multipart([Files.read(p) for p in files.cts])
        for chunk in (None, 1, 7, 143, 144, 145, 4096):
            h = Harness()
            result = h.run(body, chunk)
            self.assertEqual(result.status, 200, chunk)
            self.assertEqual(len(h.storage.files), 3)
            for p, o in zip(files.cts, result.outcomes):
                self.assertTrue(o.stored)
                self.assertEqual(o.study_uid, files.study)
                self.assertEqual(h.storage.files[f"GW/{o.sop_instance_uid}.dcm"], dataset_bytes(p))
            self.assertEqual(len(h.observer.stored), 3)
            self.assertEqual(h.observer.released, [h.info])

    def test_study_route_refuses_another_study(self):
        files = Files(self)
        h = Harness(study=files.study)
        result = h.run(multipart([Files.read(files.cts[0]), Files.read(files.sc)]))
        self.assertEqual(result.status, 202)
        self.assertTrue(result.outcomes[0].stored)
        self.assertEqual(result.outcomes[1].failure, S.STUDY_MISMATCH)
        self.assertEqual(len(h.storage.files), 1)
        self.assertEqual(len(h.storage.discarded), 1)

    def test_ae_rules(self):
        files = Files(self)
        sc = Files.read(files.sc)
        result = Harness("CTONLY").run(multipart([sc]))
        self.assertEqual((result.status, result.outcomes[0].failure), (409, S.SOP_CLASS_NOT_SUPPORTED))
        h = Harness("NOSC")
        result = h.run(multipart([sc, Files.read(files.cts[0])]))
        self.assertEqual(result.status, 200)
        self.assertTrue(result.outcomes[0].ignored)
        self.assertEqual(len(h.storage.files), 1)
        result = Harness("EXPLICIT").run(multipart([sc]))  # the SC file is implicit VR
        self.assertEqual((result.status, result.outcomes[0].failure), (409, S.TRANSFER_SYNTAX_NOT_SUPPORTED))

    def test_congestion_and_storage_failure(self):
        files = Files(self)
        h = Harness()
        h.ingest.congestion = "99% used"
        result = h.run(multipart([Files.read(files.cts[0])]))
        self.assertEqual((result.status, result.outcomes[0].failure), (409, S.OUT_OF_RESOURCES))
        h = Harness()
        h.storage.fail_with = OSError(28, "No space left on device")
        result = h.run(multipart([Files.read(p) for p in files.cts]))
        self.assertEqual(result.status, 409)
        self.assertEqual({o.failure for o in result.outcomes}, {S.OUT_OF_RESOURCES})

    def test_broken_bodies(self):
        files = Files(self)
        ct = Files.read(files.cts[0])
        cases = {
            "no closing boundary": multipart([ct], close=False),
            "not part 10": multipart([b"hello, world" * 20]),
            "short part": multipart([ct[:140]]),
            "empty": b"",
            "garbage": b"this is not multipart at all\r\n",
            "wrong part type": (b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom+json\r\n\r\n{}\r\n--"
                                + BOUNDARY + b"--\r\n"),
            "header too long": b"--" + BOUNDARY + b"\r\nX: " + b"a" * 2000 + b"\r\n\r\n" + ct,
        }
        for name, body in cases.items():
            h = Harness()
            result = h.run(body)
            self.assertEqual(result.status, 400, name)
        # A body broken after a good part: that part stays stored and is listed.
        h = Harness()
        result = h.run(multipart([ct], close=False) + b"\r\n--" + BOUNDARY + b"\r\nX: " + b"a" * 2000)
        self.assertEqual(result.status, 400)
        self.assertTrue(result.outcomes[0].stored)

    def test_part_count_cap(self):
        files = Files(self)
        result = Harness(max_parts=2).run(multipart([Files.read(p) for p in files.cts]))
        self.assertEqual(result.status, 413)

    def test_abort_discards_and_reports_lost(self):
        files = Files(self)
        h = Harness()
        body = multipart([Files.read(p) for p in files.cts])
        h.receiver.feed(body[:len(body) // 2])
        h.receiver.abort()
        self.assertTrue(h.storage.discarded)
        self.assertEqual(h.observer.ended, [(h.info, "lost")])

    @settings(max_examples=60, deadline=None)
    @given(st.data())
    def test_mutated_bodies_never_raise(self, data):
        files = Files(self, 1)
        body = bytearray(multipart([Files.read(files.cts[0])[:2000]]))
        rng = random.Random(data.draw(st.integers(0, 1 << 30)))
        for _ in range(data.draw(st.integers(1, 8))):
            body[rng.randrange(len(body))] = rng.randrange(256)
        result = Harness().run(bytes(body), data.draw(st.integers(1, 700)))
        self.assertIn(result.status, (200, 202, 400, 409))


class ResponseTests(TestCase):
    def test_sequences(self):
        ok = S.PartOutcome(1, CT, "1.2.3", "1.2", "1.2.9", stored=True)
        bad = S.PartOutcome(2, SC, "1.2.4", failure=S.SOP_CLASS_NOT_SUPPORTED)
        body = S.store_response(S.StowResult([ok, bad]), "http://h:1/dicomweb")
        self.assertEqual(body["00081190"], {"vr": "UR", "Value": ["http://h:1/dicomweb/studies/1.2"]})
        [ref] = body["00081199"]["Value"]
        self.assertEqual(ref["00081155"], {"vr": "UI", "Value": ["1.2.3"]})
        self.assertEqual(ref["00081190"]["Value"], ["http://h:1/dicomweb/studies/1.2/series/1.2.9/instances/1.2.3"])
        [failed] = body["00081198"]["Value"]
        self.assertEqual((failed["00081150"]["Value"], failed["00081197"]), ([SC], {"vr": "US", "Value": [0x0122]}))
        self.assertEqual(S.StowResult([ok, bad]).status, 202)
        self.assertEqual(S.StowResult([ok]).status, 200)
        self.assertEqual(S.StowResult([bad]).status, 409)


class InterfaceTests(TestCase):
    def test_providers_and_fakes(self):
        from zope.interface.verify import verifyObject

        from gateway.interfaces import IIngest, IInstanceStorage
        from gateway.store.writer import Storage

        storage = Storage(self.mktemp(), Clock(), None)
        self.assertTrue(verifyObject(IInstanceStorage, storage))
        self.assertTrue(verifyObject(IInstanceStorage, MemoryStorage()))
        self.assertTrue(verifyObject(IIngest, SCPService(config(), storage, Clock())))

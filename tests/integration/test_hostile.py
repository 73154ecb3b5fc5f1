"""Hostile input against a live gateway: exact A-ABORTs, a fuzz run over
captured real associations, path-like values, and hundreds of concurrent
associations.  After each, the gateway still serves a normal store."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import sys
import time

import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from gateway.dimse import commands as C
from gateway.dimse.message import fragment_message
from gateway.dimse import sop
from gateway.dimse.sop import is_valid_uid
from gateway.store.writer import RESERVE_FILE
from gateway.testing import partial_files
from gateway import ul as P
from tests import dicomfiles
from tests.integration.harness import in_thread, run, start_gateway
from tests.integration.recorder import RecordingRelay, rj_bytes
from tests.integration.test_policy import collect_events, wait_for

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def abort_bytes(source: int, reason: int) -> bytes:
    return bytes([0x07, 0, 0, 0, 0, 4, 0, 0, source, reason])


def rq(called="DICOMGW", calling="FUZZ", context_id=1) -> bytes:
    return P.encode_pdu(P.AssociateRQ(
        called, calling, (P.PresentationContextRQ(context_id, VERIFICATION, (IMPLICIT,)),),
        P.UserInformation(max_length=16384, implementation_class_uid="1.2.3"),
    ))


def _final(buf) -> bool:
    """``buf`` starts with a complete A-ASSOCIATE-RJ or A-ABORT PDU."""
    return len(buf) >= 10 and buf[0] in (0x03, 0x07)


def exchange(port: int, data: bytes, read_timeout=2.0, limit=1 << 16, half_close=True) -> bytes:
    """Send ``data``, half-close, and return what the gateway sent back (bounded).

    Like a real requestor, send the first PDU (if ``data`` starts with one
    that fits) and wait for the answer before sending the rest.  Without
    ``half_close``, stop reading at the first A-ASSOCIATE-RJ or A-ABORT
    (the gateway would otherwise wait ARTIM for us to close).
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    got = bytearray()
    first = len(data)
    if len(data) >= 6:
        first = min(len(data), 6 + struct.unpack_from(">BxL", data)[1])
    try:
        try:
            s.sendall(data[:first])
            if first < len(data):
                got += s.recv(65536)
                s.sendall(data[first:])
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the gateway may abort before it has read everything
        while len(got) < limit and (half_close or not _final(got)):
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    return bytes(got)


def after_ac(port: int, then: bytes) -> bytes:
    """Associate, then send ``then``; the bytes the gateway sent after its A-ASSOCIATE-AC."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(rq())
        buf = bytearray()
        while len(buf) < 6 or len(buf) < 6 + struct.unpack_from(">BxL", buf)[1]:
            chunk = s.recv(65536)
            if not chunk:
                raise AssertionError(f"no A-ASSOCIATE-AC: {bytes(buf)!r}")
            buf += chunk
        assert buf[0] == 0x02, bytes(buf[:10])
        del buf[:6 + struct.unpack_from(">BxL", buf)[1]]
        s.sendall(then)
        while not _final(buf):
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
        return bytes(buf)
    finally:
        s.close()


def files_under(root: str) -> list[str]:
    """Every file under the storage root but what the gateway writes for itself whatever
    peers send: the audit trail, the index and export databases and their reserve, and
    the empty temporary files it keeps ready."""
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(d, n), root) for n in names]
    tmp = os.path.join(root, "tmp")
    spare = set(os.listdir(tmp)) - set(partial_files(tmp)) if os.path.isdir(tmp) else set()
    return sorted(p for p in out if p not in ("audit.jsonl", os.path.join("tmp", RESERVE_FILE))
                  and not p.startswith(("exports.sqlite", "dicomgw.sqlite"))
                  and not (os.path.dirname(p) == "tmp" and os.path.basename(p) in spare))


class HostileTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def store_still_works(self, gw, name="after.dcm"):
        src = self.mktemp()
        os.makedirs(src)
        path = dicomfiles.small_instance(os.path.join(src, name), number=99)
        out, err, code = yield run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(gw.port), path)
        self.assertEqual(code, 0, err)
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        self.assertIn(uid + ".dcm", [os.path.basename(p) for p in gw.stored_files()])

    @defer.inlineCallbacks
    def test_protocol_violations_abort_exactly_and_others_are_served(self):
        gw = yield start_gateway(self)
        # A good association stays open throughout.
        good = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        self.addCleanup(good.close)
        good.sendall(rq(calling="GOOD"))
        answer = yield in_thread(good.recv, 65536)
        self.assertEqual(answer[:1], b"\x02")

        big = 0xFFFFFFFF
        cases = {
            # A declared length over our limit: aborted from the header alone.
            "P-DATA over max PDU length": (True, struct.pack(">BxL", 0x04, big), abort_bytes(2, 6)),
            "A-ASSOCIATE-RQ over 1 MiB": (False, struct.pack(">BxL", 0x01, 2 << 20), abort_bytes(2, 6)),
            "unknown PDU type": (False, struct.pack(">BxL", 0x55, 4) + b"\0" * 4, abort_bytes(2, 1)),
            # P-DATA on a presentation context that was not accepted.
            "P-DATA on context 99": (True, b"".join(fragment_message(99, C.encode_command(C.c_echo_rq(1)), 16384)),
                                     abort_bytes(2, 6)),
            # A DIMSE response: the SCP asked nothing; it must not wait for ever.
            "C-ECHO-RSP to the SCP": (True, b"".join(fragment_message(
                1, C.encode_command(C.c_echo_rsp(C.c_echo_rq(1))), 16384)), abort_bytes(2, 6)),
            # A second A-ASSOCIATE-RQ inside an association: unexpected PDU.
            "A-ASSOCIATE-RQ in Sta6": (True, rq(), abort_bytes(2, 2)),
            # Malformed item: a presentation context item whose length runs past the PDU.
            "malformed item": (False, rq()[:74] + b"\x20\x00\xff\xff" + rq()[78:], None),
        }
        for name, (associated, data, expected) in cases.items():
            if associated:
                got = yield in_thread(after_ac, gw.port, data)
            else:
                got = yield in_thread(exchange, gw.port, data, half_close=False)
            self.assertEqual(got[:1], b"\x07", f"{name}: {got[:16].hex()}")
            if expected is not None:
                self.assertEqual(got[:10], expected, f"{name}: {got[:10].hex()}")

        # Values that look like paths are refused: called AE (reason 7),
        # calling AE with a backslash or control character (reason 3).
        for called, calling, expected in (("../../etc", "FUZZ", rj_bytes(1, 1, 7)),
                                          ("DICOMGW", "..\\..\\x", rj_bytes(1, 1, 3)),
                                          ("DICOMGW", "A\x01B", rj_bytes(1, 1, 3))):
            got = yield in_thread(exchange, gw.port, rq(called, calling), half_close=False)
            self.assertEqual(got[:10], expected)

        # The good association is still there and answers a C-ECHO.
        def echo():
            for pdu in fragment_message(1, C.encode_command(C.c_echo_rq(7)), 16384):
                good.sendall(pdu)
            data = good.recv(65536)
            return C.decode_command(P.decode_pdu(0x04, data[6:]).pdvs[0].data)

        rsp = yield in_thread(echo)
        self.assertEqual((rsp.command_field, rsp.status), (C.C_ECHO_RSP, 0))
        self.assertEqual(files_under(gw.storage_root), [])
        yield self.store_still_works(gw)

    @defer.inlineCallbacks
    def test_fuzz_captured_association_then_normal_store(self):
        gw = yield start_gateway(self, max_pdu_length=16384, artim=2, pdu=2)
        relay = yield RecordingRelay.start(self, gw.port)
        src = self.mktemp()
        os.makedirs(src)
        sample = dicomfiles.small_instance(os.path.join(src, "sample.dcm"), size=20000)
        # Capture a real association: DCMTK storescu storing one instance.
        out, err, code = yield run("storescu", "-aet", "CAPTURE", "-aec", "DICOMGW",
                                   "127.0.0.1", str(relay.port), sample)
        self.assertEqual(code, 0, err)
        captured = bytes(relay.connections[0].from_peer)
        self.assertEqual(captured[:1], b"\x01")
        self.assertGreater(len(captured), 20000)
        closed = collect_events(self, "association.closed")
        answers = {}

        def record(got):
            answers[got[:1]] = answers.get(got[:1], 0) + 1
            # Whatever we sent, the gateway answers with PDUs only.
            assert got[:1] in (b"", b"\x02", b"\x03", b"\x04", b"\x06", b"\x07"), got[:16].hex()

        # 1. hypothesis: random bytes and random splices into the capture.
        @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.one_of(
            st.binary(max_size=512),
            st.tuples(st.integers(0, len(captured)), st.binary(min_size=1, max_size=64),
                      st.integers(0, 64)).map(lambda t: captured[:t[0]] + t[1] + captured[t[0] + t[2]:]),
        ))
        def fuzz(data):
            record(exchange(gw.port, data, read_timeout=3))

        yield in_thread(fuzz)

        # 2. a bounded mutation loop over the captured bytes.
        def mutate_loop(count=150, seconds=20.0):
            rng = random.Random(20261122)
            started = time.monotonic()
            done = 0
            pdu_starts = []
            i = 0
            while i + 6 <= len(captured):
                pdu_starts.append(i)
                i += 6 + struct.unpack_from(">BxL", captured, i)[1]
            for n in range(count):
                if time.monotonic() - started > seconds:
                    break
                data = bytearray(captured)
                kind = n % 6
                if kind == 0:  # flip a few bytes
                    for _ in range(rng.randint(1, 8)):
                        data[rng.randrange(len(data))] = rng.randrange(256)
                elif kind == 1:  # truncate
                    del data[rng.randrange(len(data)):]
                elif kind == 2:  # a PDU length field rewritten
                    at = rng.choice(pdu_starts)
                    data[at + 2:at + 6] = struct.pack(">L", rng.choice([0, 1, 5, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
                                                                          rng.randrange(1 << 32)]))
                elif kind == 3:  # a PDU type byte changed
                    data[rng.choice(pdu_starts)] = rng.randrange(256)
                elif kind == 4:  # a slice duplicated
                    a = rng.randrange(len(data))
                    data[a:a] = data[a:a + rng.randint(1, 200)]
                else:  # header bytes of the association request scrambled
                    for _ in range(3):
                        data[rng.randrange(min(len(data), 600))] ^= 1 << rng.randrange(8)
                record(exchange(gw.port, bytes(data), read_timeout=3))
                done += 1
            return done

        done = yield in_thread(mutate_loop)
        self.assertGreaterEqual(done, 100)
        self.assertIn(b"\x07", answers)  # some mutations were aborted ...
        self.assertIn(b"\x02", answers)  # ... and some still associated

        # Every connection ended, nothing written outside instances/, every
        # name there a UID, and a normal store still works.
        yield wait_for(lambda: not gw.scp.active, timeout=15)
        partial = partial_files(os.path.join(gw.storage_root, "tmp"))
        for rel in files_under(gw.storage_root):
            parts = rel.split(os.sep)
            if parts[0] == "tmp" and parts[1] not in partial:
                continue  # an empty spare temporary file
            self.assertEqual(parts[0], "instances", rel)
            self.assertTrue(is_valid_uid(parts[-1][:-4]) and parts[-1].endswith(".dcm"), rel)
        self.assertEqual(os.listdir(os.path.dirname(gw.storage_root)), [os.path.basename(gw.storage_root)])
        yield self.store_still_works(gw)
        self.assertTrue(closed)


class ConcurrencyTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_hundreds_of_concurrent_associations(self):
        """The benchmark script, with 300: all held at once, each echoed and
        released; the one over the limit rejected with 2/3/2."""
        script = os.path.join(ROOT, "bench", "concurrent_associations.py")
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, [script, "--associations", "300", "--json", "--time-limit", "60"], env=dict(os.environ))
        result = json.loads(out.decode().strip().splitlines()[-1])
        self.assertEqual(code, 0, (result, err.decode()[-2000:]))
        self.assertEqual((result["established"], result["echoed"], result["released"]), (300, 300, 300))
        self.assertEqual(result["one_more_rejected_bytes"], "03000000000400020302")
        self.assertLess(result["kib_per_association"], 200)


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(value)) + value


class AssociationRequestFuzzTests(unittest.TestCase):
    """A-ASSOCIATE-RQs with repeated context ids, strings that are not UIDs and
    items in every order: each is answered with a well-formed PDU, a context
    id is never negotiated twice, and what is not a storage SOP class UID is
    never accepted."""

    timeout = 180

    @defer.inlineCallbacks
    def test_generated_requests(self):
        gw = yield start_gateway(self, artim=2)
        syntaxes = st.sampled_from([
            "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", VERIFICATION, "1.2.3.4.5.6",
            "NOT-A-UID", "1.2.3..4", "01.2.3", "1.2.3.", "", IMPLICIT, P.DICOM_APPLICATION_CONTEXT,
            "1.2." + "9" * 70])
        contexts = st.lists(st.tuples(st.sampled_from([1, 3, 5, 255]), syntaxes,
                                      st.lists(syntaxes, min_size=1, max_size=3)), max_size=5)
        outcome = {"ac": 0, "abort": 0, "rj": 0}

        @settings(max_examples=120, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(contexts, st.randoms(use_true_random=False), st.booleans())
        def fuzz(pcs, rng, with_user_info):
            items = [_item(0x10, P.DICOM_APPLICATION_CONTEXT.encode())]
            for cid, abstract, transfers in pcs:
                value = bytes([cid, 0, 0, 0]) + _item(0x30, abstract.encode())
                value += b"".join(_item(0x40, t.encode()) for t in transfers)
                items.append(_item(0x20, value))
            if with_user_info:
                items.append(_item(0x50, _item(0x51, struct.pack(">L", 16384))))
            rng.shuffle(items)  # PS3.8 orders nothing: every order is an A-ASSOCIATE-RQ
            fixed = struct.pack(">H2x16s16s32x", 1, b"DICOMGW".ljust(16), b"FUZZ".ljust(16))
            body = fixed + b"".join(items)
            got = _first_pdu(gw.port, struct.pack(">BxL", 0x01, len(body)) + body)
            ids = [cid for cid, _a, _t in pcs]
            if len(set(ids)) != len(ids) or not ids:
                assert got[:10] == abort_bytes(2, 6), (pcs, got[:16].hex())
                outcome["abort"] += 1
                return
            assert got[:1] in (b"\x02", b"\x03"), (pcs, got[:16].hex())
            if got[:1] == b"\x03":
                outcome["rj"] += 1
                return
            outcome["ac"] += 1
            ac = P.decode_pdu(0x02, got[6:6 + struct.unpack_from(">BxL", got)[1]])
            answered = [pc.id for pc in ac.presentation_contexts]
            assert sorted(answered) == sorted(ids), (pcs, answered)
            for (cid, abstract, transfers), pc in zip(sorted(pcs), sorted(ac.presentation_contexts, key=lambda p: p.id)):
                if pc.result == P.PC_ACCEPTANCE:
                    assert abstract == VERIFICATION or sop.is_storage_sop_class(abstract), (abstract, pc)
                    assert pc.transfer_syntax in transfers and is_valid_uid(pc.transfer_syntax), (transfers, pc)

        yield in_thread(fuzz)
        self.assertGreater(outcome["ac"], 10)
        self.assertGreater(outcome["abort"], 10)
        yield wait_for(lambda: not gw.scp.active, timeout=10)
        self.assertEqual(files_under(gw.storage_root), [])


def _first_pdu(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send ``data``; the first whole PDU the gateway answers with (b"" if none)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        buf = bytearray()
        while len(buf) < 6 or len(buf) < 6 + struct.unpack_from(">BxL", buf)[1]:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        return bytes(buf)
    finally:
        s.close()


def _until_ended(port: int, data: bytes, tail: bytes, timeout: float = 4.0) -> bytes:
    """Associate (the first PDU of ``data``), send the rest and ``tail``; the
    last PDU the gateway sent (A-RELEASE-RP, A-ABORT...) once it ended the
    association or closed, or b"" on a timeout."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        first = 6 + struct.unpack_from(">BxL", data)[1]
        s.sendall(data[:first])
        buf = bytearray(s.recv(65536))
        try:
            s.sendall(data[first:] + tail)
        except OSError:
            pass
        last = b""
        while True:
            while len(buf) >= 6 and len(buf) >= 6 + struct.unpack_from(">BxL", buf)[1]:
                end = 6 + struct.unpack_from(">BxL", buf)[1]
                last, buf = bytes(buf[:end]), buf[end:]
                if last[0] in (0x03, 0x06, 0x07):
                    return last
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return b""
            except OSError:
                return last or b"closed"
            if not chunk:
                return last or b"closed"
            buf += chunk
    finally:
        s.close()


class ReleaseAndAbortAnywhereTests(unittest.TestCase):
    """A captured transfer cut at every point, followed by an A-RELEASE-RQ or an
    A-ABORT: the association ends at once either way, gives its slot back,
    and leaves no half-written file."""

    timeout = 240

    @defer.inlineCallbacks
    def test_every_cut_point(self):
        gw = yield start_gateway(self, max_pdu_length=4096, artim=2, pdu=2, dimse=2)
        relay = yield RecordingRelay.start(self, gw.port)
        src = self.mktemp()
        os.makedirs(src)
        sample = dicomfiles.small_instance(os.path.join(src, "sample.dcm"), size=100000)
        out, err, code = yield run("storescu", "-aet", "CAPTURE", "-aec", "DICOMGW", "-pdu", "4096",
                                   "127.0.0.1", str(relay.port), sample)
        self.assertEqual(code, 0, err)
        captured = bytes(relay.connections[0].from_peer)
        pdus, at = [], 0
        while at + 6 <= len(captured):
            end = at + 6 + struct.unpack_from(">BxL", captured, at)[1]
            pdus.append((at, end))
            at = end
        # The cut points: after each PDU up to the A-RELEASE-RQ storescu sent
        # last (so between the fragments of the command and of the data set),
        # and inside a few P-DATA-TF PDUs (the rest of the PDU never comes: the
        # PDU deadline ends those).
        cuts = [end for _start, end in pdus[:-1]]
        cuts += [start + (end - start) // 2 for start, end in pdus[1:-1:8]]
        release, abort = P.encode_pdu(P.ReleaseRQ()), P.encode_pdu(P.Abort(0, 0))
        stored_before = set(gw.stored_files())

        def run_cuts(deadline=120.0):
            started, answers = time.monotonic(), []
            for cut in sorted(set(cuts)):
                if time.monotonic() - started > deadline:
                    break
                whole_pdus = cut in {end for _s, end in pdus}
                for tail in (release, abort):
                    t0 = time.monotonic()
                    got = _until_ended(gw.port, captured[:cut], tail)
                    answers.append((cut, whole_pdus, tail is release, got, time.monotonic() - t0))
            return answers

        answers = yield in_thread(run_cuts)
        self.assertGreater(len(answers), 40)
        for cut, whole, released, got, took in answers:
            self.assertNotEqual(got, b"", (cut, whole, released))  # ended by the gateway, not our timeout
            if released and not whole:
                self.assertEqual(got[:1], b"\x07", (cut, got.hex()))  # half a PDU, then a release
        yield wait_for(lambda: not gw.scp.active, timeout=15)
        self.assertEqual(partial_files(os.path.join(gw.storage_root, "tmp")), [])
        # Only a transfer whose data set was whole may have stored the instance,
        # and then whole.
        for path in set(gw.stored_files()) - stored_before:
            self.assertEqual(dicomfiles.dataset_bytes(path), dicomfiles.dataset_bytes(sample))
        yield HostileTests.store_still_works(self, gw)

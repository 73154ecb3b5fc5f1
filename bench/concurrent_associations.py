#!/usr/bin/env python3
"""Hold many concurrent associations on a real gateway process and measure its memory.

    python bench/concurrent_associations.py [--associations 1000] [--tls] [--json]

Starts ``twistd -n dicomgw`` on a scratch configuration (loopback, an
ephemeral port, ``max_associations`` = the number asked for), then from this
process (Twisted, raw PDUs) opens that many associations and holds them all
open at once.  With every one established it reads the gateway's resident
memory (VmRSS from /proc), checks that one association more is rejected
(rejected-transient, service-provider presentation, reason 2: the A-ASSOCIATE-RJ
bytes), then sends a C-ECHO on each, releases them all and stops the
gateway.  With --tls the associations go to the TLS port (profile
bcp195-nd, a client certificate; development certificates made for the run).  Prints a summary (or JSON with --json); the exit status is 0 only
if every association was established, echoed and released.

Everything is bounded: connects run at most --window at a time, and the
whole run gives up after --time-limit seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import defer, protocol, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS  # noqa: E402

from bench.receivers import free_port  # noqa: E402
from gateway.dimse import commands as C  # noqa: E402
from gateway.dimse.message import fragment_message  # noqa: E402
from gateway import ul as P  # noqa: E402

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"
REJECT_LIMIT = bytes([0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2])


def associate_rq(called: str, calling: str) -> bytes:
    return P.encode_pdu(P.AssociateRQ(
        called, calling, (P.PresentationContextRQ(1, VERIFICATION, (IMPLICIT,)),),
        P.UserInformation(max_length=16384, implementation_class_uid="1.2.826.0.1.3680043.10.1.1"),
    ))


class Peer(protocol.Protocol):
    """One requestor speaking raw PDUs: associate, wait, echo, release."""

    def __init__(self, rq: bytes):
        self.rq = rq
        self.buf = bytearray()
        self.first_pdu = b""
        self.answered = defer.Deferred()  # fires with the PDU type of the answer
        self.echoed = defer.Deferred()
        self.released = defer.Deferred()
        self.lost = defer.Deferred()
        self.asked: tuple = ()

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.transport.write(self.rq)

    def dataReceived(self, data):
        self.buf += data
        while len(self.buf) >= 6:
            pdu_type, length = struct.unpack_from(">BxL", self.buf)
            if len(self.buf) < 6 + length:
                return
            pdu = bytes(self.buf[:6 + length])
            del self.buf[:6 + length]
            if not self.answered.called:
                self.first_pdu = pdu
                self.answered.callback(pdu_type)
            elif pdu_type == 0x04 and not self.echoed.called:
                self.echoed.callback(pdu)
            elif pdu_type == 0x06 and not self.released.called:
                self.released.callback(None)
                self.transport.loseConnection()

    def echo(self):
        for pdu_bytes in fragment_message(1, C.encode_command(C.c_echo_rq(1)), 16384):
            self.transport.write(pdu_bytes)
        self.asked += (self.echoed,)
        return self.echoed

    def release(self):
        self.transport.write(P.encode_pdu(P.ReleaseRQ()))
        self.asked += (self.released,)
        return self.released

    def connectionLost(self, reason):
        # Only what someone waits for: the answer always, the others once asked.
        for d in (self.answered,) + self.asked:
            if not d.called:
                d.errback(ConnectionError("connection lost"))
        self.lost.callback(None)


def rss_kib(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def start_gateway(workdir: str, associations: int, tls: bool) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = os.path.join(workdir, "dicomgw.toml")
    listen = f'dicom = "tcp:{port}:interface=127.0.0.1:backlog=1024"'
    if tls:
        from gateway.cli.devcerts import make_dev_certs

        make_dev_certs(os.path.join(workdir, "tls"))
        listen = (f'dicom = "tcp:{free_port()}:interface=127.0.0.1"\n'
                  f'dicom_tls = "tcp:{port}:interface=127.0.0.1:backlog=1024"\n'
                  f'[tls]\ncertificate = "{workdir}/tls/server.pem"\nprivate_key = "{workdir}/tls/server.key"\n'
                  f'ca_certificates = "{workdir}/tls/ca.pem"\nprofile = "bcp195-nd"')
    with open(config, "w") as f:
        f.write(f"""
[gateway]
storage = "{workdir}/var"
max_associations = {associations}
[listen]
{listen}
[timeouts]
artim = 60
dimse = 300
pdu = 60
[storage]
fsync = false
watermark_percent = 100
reserved_gb = 0
[[ae]]
title = "DICOMGW"
""")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    log = open(os.path.join(workdir, "gateway.log"), "wb")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([twistd, "-n", "--pidfile=", "dicomgw", "--config", config],
                            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}; see {workdir}/gateway.log")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the gateway did not start listening within 30 s")


@defer.inlineCallbacks
def run(reactor, args, port, pid, result, workdir):
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30)
    if args.tls:
        from twisted.internet import ssl

        def pem(name):
            with open(os.path.join(workdir, "tls", name), "rb") as f:
                return f.read()

        options = ssl.optionsForClientTLS(
            "localhost", trustRoot=ssl.Certificate.loadPEM(pem("ca.pem")),
            clientCertificate=ssl.PrivateCertificate.loadPEM(pem("client.key") + pem("client.pem")))
        endpoint = wrapClientTLS(options, endpoint)
    rq = associate_rq("DICOMGW", "BENCH")
    peers: list[Peer] = []
    result["rss_before_kib"] = rss_kib(pid)["VmRSS"]
    started = time.monotonic()

    # Connect and associate, at most `window` handshakes in flight.
    sem = defer.DeferredSemaphore(args.window)

    @defer.inlineCallbacks
    def one():
        peer = yield endpoint.connect(protocol.Factory.forProtocol(lambda: Peer(rq)))
        peers.append(peer)
        kind = yield peer.answered
        return kind

    kinds = yield defer.gatherResults([sem.run(one) for _ in range(args.associations)], consumeErrors=True)
    result["established"] = sum(1 for k in kinds if k == 0x02)
    result["associate_seconds"] = round(time.monotonic() - started, 3)
    yield task.deferLater(reactor, 0.5, lambda: None)  # let the gateway settle
    mem = rss_kib(pid)
    result["rss_held_kib"] = mem["VmRSS"]
    result["rss_peak_kib"] = mem["VmHWM"]
    held = max(1, result["established"])
    result["kib_per_association"] = round((mem["VmRSS"] - result["rss_before_kib"]) / held, 1)

    # One more than the limit: rejected-transient, presentation, reason 2.
    extra = yield endpoint.connect(protocol.Factory.forProtocol(lambda: Peer(rq)))
    yield extra.answered
    result["one_more_rejected_bytes"] = extra.first_pdu.hex()
    result["one_more_rejected"] = extra.first_pdu == REJECT_LIMIT
    extra.transport.loseConnection()

    t = time.monotonic()
    echoes = yield defer.gatherResults([p.echo() for p in peers], consumeErrors=True)
    statuses = [C.decode_command(P.decode_pdu(0x04, e[6:]).pdvs[0].data).status for e in echoes]
    result["echoed"] = sum(1 for s in statuses if s == 0)
    yield defer.gatherResults([p.release() for p in peers], consumeErrors=True)
    result["released"] = len(peers)
    result["echo_release_seconds"] = round(time.monotonic() - t, 3)
    yield defer.gatherResults([p.lost for p in peers])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--associations", type=int, default=1000)
    parser.add_argument("--window", type=int, default=100, help="handshakes in flight at once")
    parser.add_argument("--time-limit", type=float, default=120)
    parser.add_argument("--tls", action="store_true", help="use the TLS port (mutual TLS, bcp195-nd)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.associations <= 1000:
        parser.error("--associations must be 1..1000 (the gateway's max_associations range)")

    workdir = tempfile.mkdtemp(prefix="dicomgw-bench-")
    result = {"associations": args.associations, "tls": args.tls, "ok": False}
    proc = None
    try:
        proc, port = start_gateway(workdir, args.associations, args.tls)

        def go(reactor):
            d = run(reactor, args, port, proc.pid, result, workdir)
            timeout = reactor.callLater(args.time_limit, d.cancel)
            d.addBoth(lambda r: (timeout.active() and timeout.cancel(), r)[1])
            return d

        try:
            task.react(go)
        except SystemExit as e:
            if e.code:
                result["error"] = f"the run failed (exit {e.code}); see output above"
    except Exception as e:  # noqa: BLE001 - report any failure in the summary
        result["error"] = str(e)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    n = args.associations
    result["ok"] = (result.get("established") == n and result.get("echoed") == n
                    and result.get("released") == n and result.get("one_more_rejected") is True)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:24} {value}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

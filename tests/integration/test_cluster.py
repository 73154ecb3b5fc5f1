"""Several real daemons (``twistd -n dicomgw``) on one PostgreSQL index and
one storage root, HAProxy in front where the balancer matters.

Each test has a schema of its own in the run's throwaway database
(tests.pgtest), a storage root shared by its nodes, and a lease of a few
seconds so that a node's death is noticed soon.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pydicom
from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from tests import dicomfiles
from tests.integration import test_twistd as tw
from tests.integration.harness import free_port, gateway_config, in_thread, require_program, require_pynetdicom, run
from tests.integration.test_payloads import PY, toml_list
from tests.pgtest import database_url, fresh_schema

LEASE = 3
# Appends "<payload id> <instances> <attempt>" to handoff.log in the nodes' directory.
HANDOFF = ("import json, os\n"
           "m = json.load(open(os.environ['DICOMGW_MANIFEST']))\n"
           "with open('handoff.log', 'a') as f:\n"
           "    f.write(f\"{m['payload']} {len(m['instances'])} {os.environ['DICOMGW_ATTEMPT']}\\n\")\n")
# Notes its start, runs a while, notes its end (runs.log).
SLOW = ("import os, time\n"
        "p, a = os.environ['DICOMGW_PAYLOAD_ID'], os.environ['DICOMGW_ATTEMPT']\n"
        "open('runs.log', 'a').write(f'start {p} {a}\\n')\n"
        "time.sleep(4)\n"
        "open('runs.log', 'a').write(f'done {p} {a}\\n')\n")


def uid_of(path):
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


class Relay(protocol.Protocol):
    """One side of a TCP relay to PostgreSQL (the test cuts it)."""

    def __init__(self, relay, peer=None):
        self.relay, self.peer, self.buffer = relay, peer, []

    def connectionMade(self):
        self.relay.open.add(self)
        if self.peer is None:  # the client side: connect onwards
            self.transport.pauseProducing()
            factory = protocol.ClientFactory()
            factory.protocol = lambda: Relay(self.relay, self)
            factory.clientConnectionFailed = lambda c, r: self.transport.loseConnection()
            reactor.connectTCP("127.0.0.1", 5432, factory, timeout=5)
        else:
            self.peer.peer = self
            self.peer.transport.resumeProducing()

    def dataReceived(self, data):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def connectionLost(self, reason):
        self.relay.open.discard(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class PostgresRelay:
    def __init__(self):
        self.port = free_port()
        self.open = set()
        self.listening = None

    def start(self):
        factory = protocol.Factory()
        factory.protocol = lambda: Relay(self)
        self.listening = reactor.listenTCP(self.port, factory, interface="127.0.0.1")

    @defer.inlineCallbacks
    def cut(self):
        """No more connections, and the open ones dropped."""
        if self.listening is not None:
            yield self.listening.stopListening()
            self.listening = None
        for p in list(self.open):
            p.transport.abortConnection()


class ClusterCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.url = database_url()
        self.schema = fresh_schema()
        self.procs = {}
        self.ports = {}
        self.http = {}
        self.addCleanup(self._stop_all)

    def _stop_all(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                tw._stop(proc)

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)

    def config(self, node, url=None, timeout=2.0, command=HANDOFF, extra=""):
        port = self.ports.setdefault(node, free_port())
        http = self.http.setdefault(node, free_port())
        text = gateway_config(self.path("var", "dicomgw"), aes=(), fsync=True)
        text = text.replace("tcp:0:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1", 1)
        text = text.replace("[listen]\n", f'[listen]\nhttp = "tcp:{http}:interface=127.0.0.1"\n', 1)
        text = text.replace("[gateway]\n", f'[gateway]\nnode = "{node}"\n', 1)
        argv = command if isinstance(command, list) else [PY, "-c", command]
        text += (f'\n[index]\nurl = "{url or self.url}"\nschema = "{self.schema}"\n'
                 f'\n[cluster]\nlease = {LEASE}\n'
                 f'\n[pipeline.handoff]\ncommand = {toml_list(argv)}\n'
                 f'[[ae]]\ntitle = "DICOMGW"\ngrouping = "study"\ntimeout = {timeout}\npipelines = ["handoff"]\n'
                 + extra)
        return text

    @defer.inlineCallbacks
    def launch(self, node, **kw):
        with open(self.path(f"{node}.toml"), "w") as f:
            f.write(self.config(node, **kw))
        proc = subprocess.Popen(
            [tw.TWISTD, "-n", "--pidfile=", "--logfile", self.path(f"twistd-{node}.log"), "dicomgw",
             "--config", f"{node}.toml"], cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs[node] = proc
        yield tw._wait_for_port(self.ports[node], timeout=30)
        return proc

    def kill(self, node):
        self.procs[node].send_signal(signal.SIGKILL)
        self.procs[node].wait(10)

    def query(self, sql, *args, schema=None):
        import psycopg

        from gateway.store.dialect import postgres_sql

        with psycopg.connect(self.url, connect_timeout=5) as conn:
            conn.execute(f'SET search_path TO "{schema or self.schema}"')
            return [tuple(r) for r in conn.execute(postgres_sql(sql), args).fetchall()]

    def lines(self, name):
        try:
            with open(self.path(name)) as f:
                return [line.split() for line in f.read().splitlines()]
        except FileNotFoundError:
            return []

    @defer.inlineCallbacks
    def wait_for(self, predicate, what, timeout=40.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            yield task.deferLater(reactor, 0.2, lambda: None)
        raise AssertionError(f"timed out waiting for {what}")

    def send(self, node_or_port, files):
        port = self.ports[node_or_port] if isinstance(node_or_port, str) else node_or_port
        return run("storescu", "-aec", "DICOMGW", "127.0.0.1", str(port), *files)

    @defer.inlineCallbacks
    def get(self, node, path, method=b"GET", body=None):
        from twisted.web.client import Agent, FileBodyProducer, readBody

        import io

        producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode())) if body is not None else None
        response = yield Agent(reactor).request(method, f"http://127.0.0.1:{self.http[node]}{path}".encode(),
                                                None, producer)
        body = yield readBody(response)
        return response.code, json.loads(body)

    def payload_rows(self):
        return self.query("SELECT id, state, node FROM payloads ORDER BY created")

    def check_one_payload(self, files, handoffs=1):
        """The study is one done payload holding each file once; handed off ``handoffs`` time(s)."""
        [(pid, state, _node)] = [r for r in self.payload_rows()
                                 if r[0] in {h[0] for h in self.lines("handoff.log")}] or [(None, None, None)]
        self.assertEqual(state, "done")
        rows = self.query("SELECT sop_instance_uid FROM instances WHERE payload = ? AND state = 'payload'", pid)
        self.assertEqual(sorted(r[0] for r in rows), sorted(uid_of(p) for p in files))
        with open(self.path("var", "dicomgw", "payloads", pid, "manifest.json")) as f:
            manifest = json.load(f)
        self.assertEqual(sorted(i["sop_instance_uid"] for i in manifest["instances"]), sorted(uid_of(p) for p in files))
        self.assertEqual([h for h in self.lines("handoff.log") if h[0] == pid], [[pid, str(len(files)), "1"]] * handoffs)
        return pid


class SplitStudyTests(ClusterCase):
    @defer.inlineCallbacks
    def test_a_study_split_across_two_nodes_is_one_payload_run_once(self):
        require_program("storescu")
        yield defer.gatherResults([self.launch("a"), self.launch("b")])
        files = dicomfiles.make_series(self.mktemp(), 6, rows=16, cols=16)
        out, err, code = yield self.send("a", files[:3])
        self.assertEqual(code, 0, err)
        out, err, code = yield self.send("b", files[3:])
        self.assertEqual(code, 0, err)
        yield self.wait_for(lambda: self.lines("handoff.log"), "the hand-off")
        yield self.wait_for(lambda: [r[1] for r in self.payload_rows()] == ["done"], "the payload done")
        yield task.deferLater(reactor, 2.5, lambda: None)  # a second close would have come by now
        pid = self.check_one_payload(files)
        nodes = self.query("SELECT node, COUNT(*) FROM instances WHERE payload = ? GROUP BY node ORDER BY node", pid)
        self.assertEqual(nodes, [("a", 3), ("b", 3)])
        self.assertEqual(sorted(self.query("SELECT node, state FROM associations")),
                         [("a", "released"), ("b", "released")])
        # Any node answers for the cluster: B lists the payload and both nodes.
        code, payloads = yield self.get("b", "/payloads")
        self.assertEqual(code, 200)
        self.assertEqual([(p["id"], p["instances"]) for p in payloads["items"]], [(pid, 6)])
        code, status = yield self.get("b", "/status")
        self.assertEqual(sorted((n["node"], n["alive"]) for n in status["cluster"]["nodes"]),
                         [("a", True), ("b", True)])
        self.assertEqual(status["cluster"]["node"], "b")
        code, listed = yield self.get("b", "/associations")
        self.assertEqual(sorted((i["node"], i["result"], i["instances"]) for i in listed["items"]),
                         [("a", "released", 3), ("b", "released", 3)])
        code, health = yield self.get("a", "/health")
        self.assertEqual((code, health["status"]), (200, "ok"))
        # Each node's temporary files are its own.
        self.assertEqual(sorted(os.listdir(self.path("var", "dicomgw", "tmp"))), ["a", "b"])

    @defer.inlineCallbacks
    def test_four_concurrent_split_studies(self):
        require_program("storescu")
        yield defer.gatherResults([self.launch("a"), self.launch("b")])
        studies = [dicomfiles.make_series(self.mktemp(), 4, rows=16, cols=16) for _ in range(4)]
        sends = []
        for files in studies:
            sends.append(self.send("a", files[:2]))
            sends.append(self.send("b", files[2:]))
        results = yield defer.gatherResults(sends)
        self.assertEqual([code for _o, _e, code in results], [0] * 8)
        yield self.wait_for(lambda: len(self.lines("handoff.log")) >= 4, "four hand-offs")
        yield self.wait_for(lambda: [r[1] for r in self.payload_rows()] == ["done"] * 4, "four payloads done")
        yield task.deferLater(reactor, 2.5, lambda: None)
        handoffs = self.lines("handoff.log")
        self.assertEqual(len(handoffs), 4)
        self.assertEqual(sorted(h[1] for h in handoffs), ["4"] * 4)
        for files in studies:
            uids = [uid_of(p) for p in files]
            [(pid,)] = self.query("SELECT DISTINCT payload FROM instances WHERE sop_instance_uid = ANY(?)", uids)
            rows = self.query("SELECT sop_instance_uid FROM instances WHERE payload = ?", pid)
            self.assertEqual(sorted(r[0] for r in rows), sorted(uids))


class ShippedBalancerConfigTests(unittest.TestCase):
    def test_etc_haproxy_cfg_is_valid(self):
        haproxy = require_program("haproxy")
        path = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "haproxy.cfg")
        done = subprocess.run([haproxy, "-c", "-f", path], capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        with open(path) as f:
            text = f.read()
        for needed in ("mode tcp", "option redispatch", "bind :11112", "bind :2762", "http-check send meth GET uri /health"):
            self.assertIn(needed, text)


class NodeDeathTests(ClusterCase):
    @defer.inlineCallbacks
    def test_a_node_killed_while_its_pipeline_runs_is_taken_over_once(self):
        require_program("storescu")
        setpriv = require_program("setpriv")
        # The program dies with its node (as a unit's KillMode would see to).
        command = [setpriv, "--pdeathsig", "KILL", PY, "-c", SLOW]
        yield defer.gatherResults([self.launch("a", command=command), self.launch("b", command=command)])
        files = dicomfiles.make_series(self.mktemp(), 3, rows=16, cols=16)
        out, err, code = yield self.send("a", files)
        self.assertEqual(code, 0, err)
        yield self.wait_for(lambda: self.lines("runs.log"), "the pipeline to start on a")
        [(job, node, attempts, state)] = self.query("SELECT id, node, attempts, state FROM jobs")
        self.assertEqual((node, attempts, state), ("a", 1, "running"))
        self.kill("a")
        yield self.wait_for(lambda: self.query("SELECT state FROM jobs") == [("done",)], "b to finish the job")
        yield task.deferLater(reactor, 1.0, lambda: None)
        [(pid,)] = self.query("SELECT id FROM payloads")
        self.assertEqual(self.lines("runs.log"), [["start", pid, "1"], ["start", pid, "2"], ["done", pid, "2"]])
        self.assertEqual(self.query("SELECT node, attempts, state FROM jobs"), [("b", 2, "done")])
        self.assertEqual(self.query("SELECT state FROM payloads"), [("done",)])
        code, status = yield self.get("b", "/status")
        self.assertEqual({n["node"]: n["alive"] for n in status["cluster"]["nodes"]}, {"a": False, "b": True})

    @defer.inlineCallbacks
    def test_an_export_job_of_a_killed_node_is_finished_by_another(self):
        from tests.integration.peers import _spawn

        pacs = free_port()  # nothing listens there yet: the job waits, retrying, held by a
        extra = (f'\n[scu]\nae_title = "DICOMGW"\nretries = 20\nretry_delay = 0.5\nconnect_timeout = 1\n'
                 f'[[destination]]\nname = "pacs"\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {pacs}\n')
        yield defer.gatherResults([self.launch("a", extra=extra), self.launch("b", extra=extra)])
        source = self.path("var", "dicomgw", "to-send")
        files = dicomfiles.make_series(source, 4, rows=16, cols=16)
        code, body = yield self.get("a", "/exports", b"POST", {"destinations": ["pacs"], "paths": files})
        self.assertEqual(code, 202, body)
        [job] = body["jobs"]
        exports = f"{self.schema}_exports"
        yield self.wait_for(lambda: self.query("SELECT node, state FROM jobs", schema=exports) == [("a", "retrying")],
                            "the job retrying on a", timeout=20)
        self.kill("a")
        received = self.path("pacs")
        os.makedirs(received)
        yield _spawn(self, "storescp", ["-aet", "STORESCP", "+B", "-od", received, str(pacs)], pacs)
        yield self.wait_for(lambda: self.query("SELECT state FROM jobs", schema=exports) == [("done",)],
                            "b to finish the job", timeout=40)
        [(job_id, node, attempts)] = self.query("SELECT id, node, attempts FROM jobs", schema=exports)
        self.assertEqual((job_id, node), (job, "b"))
        self.assertGreaterEqual(attempts, 2)  # a's attempts, then b's, all counted
        self.assertEqual(self.query("SELECT state, COUNT(*) FROM files GROUP BY state", schema=exports),
                         [("sent", 4)])
        self.assertEqual(sorted(uid_of(os.path.join(received, n)) for n in os.listdir(received)),
                         sorted(uid_of(p) for p in files))

    @defer.inlineCallbacks
    def test_a_node_killed_mid_study_behind_haproxy_and_the_sender_retrying(self):
        require_program("storescu")
        haproxy = require_program("haproxy")
        pynetdicom = require_pynetdicom()
        yield defer.gatherResults([self.launch("a", timeout=2), self.launch("b", timeout=2)])
        front = free_port()
        with open(self.path("haproxy.cfg"), "w") as f:
            f.write(balancer_config(front, [("a", self.ports["a"]), ("b", self.ports["b"])]))
        lb = subprocess.Popen([haproxy, "-db", "-f", self.path("haproxy.cfg")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (lb.kill(), lb.wait()))
        yield tw._wait_for_port(front)
        files = dicomfiles.make_series(self.mktemp(), 6, rows=16, cols=16)
        out, err, code = yield self.send(front, files[:3])  # released on one node
        self.assertEqual(code, 0, err)

        two_stored, killed = threading.Event(), threading.Event()

        def send_rest():
            ae = pynetdicom.AE(ae_title="MODALITY")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
            ae.add_requested_context(pydicom.uid.CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", front, ae_title="DICOMGW")
            assert assoc.is_established
            for i, path in enumerate(files[3:]):
                if i == 2:
                    two_stored.set()
                    killed.wait(20)
                try:
                    assoc.send_c_store(path)
                except Exception:
                    pass
            assoc.release()
            return assoc.is_released

        d = in_thread(send_rest)
        yield self.wait_for(two_stored.is_set, "two instances acknowledged")
        yield self.wait_for(lambda: self.query("SELECT node FROM associations WHERE state = 'open'"),
                            "the open association indexed", timeout=10)
        [(victim,)] = self.query("SELECT node FROM associations WHERE state = 'open'")
        self.kill(victim)
        killed.set()
        self.assertFalse((yield d))  # the association broke: nothing of it was released
        # The sender retries what was not released, through the balancer.
        deadline = time.monotonic() + 20
        while True:
            out, err, code = yield self.send(front, files[3:])
            if code == 0 or time.monotonic() > deadline:
                break
            yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(code, 0, err)
        yield self.wait_for(lambda: self.lines("handoff.log"), "the hand-off")
        yield self.wait_for(lambda: [r[1] for r in self.payload_rows()] == ["done"], "the payload done")
        yield task.deferLater(reactor, 2.5, lambda: None)
        self.check_one_payload(files)
        survivor = "b" if victim == "a" else "a"
        states = dict(self.query("SELECT state, COUNT(*) FROM associations GROUP BY state"))
        self.assertEqual(states.get("broken"), 1)  # the victim's, ended by the survivor
        self.assertEqual(self.query("SELECT DISTINCT node FROM associations WHERE state = 'broken'"), [(victim,)])
        self.assertIn(survivor, {r[0] for r in self.query("SELECT node FROM associations WHERE state = 'released'")})


class DatabaseOutageTests(ClusterCase):
    @defer.inlineCallbacks
    def test_the_index_connection_cut_under_load_loses_nothing_acknowledged(self):
        pynetdicom = require_pynetdicom()
        relay = PostgresRelay()
        relay.start()
        self.addCleanup(relay.cut)
        url = self.url.replace(":5432/", f":{relay.port}/")
        yield defer.gatherResults([self.launch("a", url=url, timeout=1), self.launch("b", url=url, timeout=1)])
        studies = [dicomfiles.make_series(self.mktemp(), 3, rows=16, cols=16) for _ in range(16)]
        released, refused = [], []
        stop = threading.Event()

        def sender(node, todo):
            ae = pynetdicom.AE(ae_title="MODALITY")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
            ae.add_requested_context(pydicom.uid.CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
            for n, files in todo:
                deadline = time.monotonic() + 40
                while time.monotonic() < deadline and not stop.is_set():
                    assoc = ae.associate("127.0.0.1", self.ports[node], ae_title="DICOMGW")
                    if not assoc.is_established:
                        refused.append(n)
                        time.sleep(0.3)
                        continue
                    ok = all(getattr(assoc.send_c_store(p), "Status", None) == 0 for p in files)
                    if assoc.is_established:
                        assoc.release()
                    if ok and assoc.is_released:
                        released.append(n)
                        break
                    time.sleep(0.3)

        work = list(enumerate(studies))
        senders = [in_thread(sender, "a", work[0::2]), in_thread(sender, "b", work[1::2])]
        yield self.wait_for(lambda: len(released) >= 3, "some studies released")
        yield relay.cut()
        yield task.deferLater(reactor, 3.0, lambda: None)
        code, health = yield self.get("a", "/health")
        self.assertEqual(code, 503)
        self.assertTrue(any("index database unreachable" in r for r in health["reasons"]), health)
        relay.start()
        try:
            yield defer.gatherResults(senders)
        finally:
            stop.set()
        self.assertEqual(sorted(released), list(range(16)))
        self.assertTrue(refused, "no association was refused while the index was away")
        yield self.wait_for(lambda: len([r for r in self.payload_rows() if r[1] == "done"]) == 16,
                            "every study's payload done", timeout=60)
        for files in studies:
            uids = [uid_of(p) for p in files]
            rows = self.query("SELECT sop_instance_uid FROM instances WHERE state = 'payload' AND "
                              "sop_instance_uid = ANY(?)", uids)
            self.assertEqual(sorted(r[0] for r in rows), sorted(uids))  # each once, in a payload
        code, health = yield self.get("b", "/health")
        self.assertEqual((code, health["status"]), (200, "ok"))


def balancer_config(port, servers) -> str:
    """HAProxy in TCP mode, as etc/haproxy.cfg, on loopback ports."""
    lines = ["global", "    maxconn 200", "defaults", "    mode tcp", "    timeout connect 2s",
             "    timeout client 60s", "    timeout server 60s", "    retries 3", "    option redispatch",
             "frontend dicom", f"    bind 127.0.0.1:{port}", "    default_backend nodes",
             "backend nodes", "    balance roundrobin", "    default-server check inter 300ms fall 1 rise 2"]
    lines += [f"    server {name} 127.0.0.1:{p}" for name, p in servers]
    return "\n".join(lines) + "\n"


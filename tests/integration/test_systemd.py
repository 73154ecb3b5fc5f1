"""systemd: the shipped units, and socket activation of the real ``twistd -n dicomgw``.

Socket activation is tested the way systemd does it, without systemd: the
test opens the listening sockets, and a small exec wrapper puts them at file
descriptors 3 and 4 of the child, sets ``LISTEN_PID`` to the child's own pid
(it is the same process after ``exec``) and runs twistd with ``LISTEN_FDS``
and ``LISTEN_FDNAMES`` in its environment.

``systemd-analyze verify`` runs on the units where it is installed:

    systemd-analyze verify systemd/dicomgw.service systemd/dicomgw.socket systemd/dicomgw-tls.socket
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.integration.harness import gateway_config, in_thread, run

HERE = os.path.dirname(os.path.abspath(__file__))
UNITS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "systemd")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
TOKEN = "systemd-test-token-0123456789"

# argv: fd fd ... -- program args...; puts the fds at 3, 4, ... and execs.
WRAPPER = r"""
import fcntl, os, sys
split = sys.argv.index("--")
fds = [int(a) for a in sys.argv[1:split]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way of 3, 4, ...
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)                      # inheritable, like systemd's
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
os.execv(sys.argv[split + 1], sys.argv[split + 1:])
"""


def parse_unit(path):
    """A unit file as {section: [(key, value), ...]} (keys may repeat)."""
    sections, current = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], [])
                continue
            key, sep, value = line.partition("=")
            assert sep and current is not None, f"{path}: cannot parse {line!r}"
            current.append((key.strip(), value.strip()))
    return sections


def values(section, key):
    return [v for k, v in section if k == key]


class UnitFileTests(unittest.TestCase):
    def test_service_unit(self):
        s = parse_unit(os.path.join(UNITS, "dicomgw.service"))["Service"]
        (start,) = values(s, "ExecStart")
        self.assertTrue(start.endswith("/twistd -n --pidfile= dicomgw --config /etc/dicomgw/dicomgw.toml"))
        self.assertEqual(values(s, "ExecReload"), ["/bin/kill -HUP $MAINPID"])
        self.assertEqual(values(s, "Restart"), ["on-failure"])
        self.assertEqual(values(s, "User"), ["dicomgw"])
        self.assertEqual(values(s, "Sockets"), ["dicomgw.socket"])
        for key, value in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"),
                           ("ProtectHome", "yes"), ("CapabilityBoundingSet", ""),
                           ("ReadWritePaths", "/var/lib/dicomgw"), ("WorkingDirectory", "/var/lib/dicomgw")):
            self.assertEqual(values(s, key), [value], key)

    def test_socket_units(self):
        for unit, port, name in (("dicomgw.socket", "104", "dicom"), ("dicomgw-tls.socket", "2762", "dicom_tls")):
            s = parse_unit(os.path.join(UNITS, unit))["Socket"]
            self.assertEqual(values(s, "ListenStream"), [f"0.0.0.0:{port}"], unit)
            self.assertEqual(values(s, "FileDescriptorName"), [name], unit)
            self.assertEqual(values(s, "Service"), ["dicomgw.service"], unit)

    def test_systemd_analyze_verify(self):
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise unittest.SkipTest("systemd-analyze is not installed (no systemd here)")
        # verify checks that ExecStart exists: point it at this environment's twistd.
        tmp = self.mktemp()
        os.makedirs(tmp)
        names = sorted(n for n in os.listdir(UNITS) if n.endswith((".service", ".socket")))
        for n in names:
            with open(os.path.join(UNITS, n)) as f:
                text = f.read().replace("/opt/dicomgw/bin/twistd", TWISTD)
            with open(os.path.join(tmp, n), "w") as f:
                f.write(text)
        result = subprocess.run([analyze, "verify", *(os.path.join(tmp, n) for n in names)],
                                capture_output=True, text=True, timeout=60)
        if "Failed to" in result.stderr and "bus" in result.stderr.lower():
            raise unittest.SkipTest(f"systemd-analyze cannot run here: {result.stderr.strip()}")
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))


def _listening_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


class SocketActivationTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_twistd_adopts_inherited_sockets_and_reloads_on_sighup(self):
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        with open(os.path.join(workdir, "token"), "w") as f:
            f.write(TOKEN)
        config_path = os.path.join(workdir, "dicomgw.toml")

        def write_config(aes):
            text = gateway_config("var/dicomgw", aes=aes).replace(
                'dicom = "tcp:0:interface=127.0.0.1"',
                'dicom = "systemd:domain=INET:name=dicom"\nhttp = "systemd:domain=INET:name=http"')
            # A systemd: HTTP socket may be on any interface: a token is required.
            text += '\n[http]\ntoken_file = "token"\n'
            with open(config_path, "w") as f:
                f.write(text)

        write_config(("DICOMGW",))
        dicom, http = _listening_socket(), _listening_socket()
        dicom_port, http_port = dicom.getsockname()[1], http.getsockname()[1]
        env = dict(os.environ, LISTEN_FDS="2", LISTEN_FDNAMES="dicom:http")
        env.pop("LISTEN_PID", None)
        out_path = os.path.join(workdir, "stdout.jsonl")
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", WRAPPER, str(dicom.fileno()), str(http.fileno()), "--",
                 TWISTD, "-n", "--pidfile=", "--logger", "gateway.logs.json_observer",
                 "dicomgw", "--config", "dicomgw.toml"],
                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                pass_fds=(dicom.fileno(), http.fileno()))
        # Only the child holds the listening sockets now, as under systemd.
        dicom.close()
        http.close()
        self.addCleanup(_stop, proc)

        # Connections queue in the inherited socket's backlog until twistd accepts.
        out, err, code = yield run("echoscu", "-to", "20", "-aec", "DICOMGW", "127.0.0.1", str(dicom_port))
        self.assertEqual(code, 0, err + _read(out_path))

        status, body = yield in_thread(_get, http_port, "/status", TOKEN)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["listeners"]["dicom"]["address"], f"127.0.0.1:{dicom_port}")
        status, _ = yield in_thread(_get, http_port, "/health", None)
        self.assertEqual(status, 401)

        # SIGHUP: a second AE title, no restart, the same inherited sockets.
        write_config(("DICOMGW", "SECOND"))
        proc.send_signal(signal.SIGHUP)
        records = yield _wait_for_event(out_path, "config.reloaded")
        self.assertEqual(records["restart_needed"], [])
        out, err, code = yield run("echoscu", "-to", "20", "-aec", "SECOND", "127.0.0.1", str(dicom_port))
        self.assertEqual(code, 0, err + _read(out_path))
        self.assertIsNone(proc.poll())

        # Every line of output is JSON; the associations are in it as events.
        closed = [r for r in _records(out_path) if r.get("event") == "association.closed"]
        self.assertEqual([(r["called_ae"], r["result"]) for r in closed],
                         [("DICOMGW", "released"), ("SECOND", "released")])
        audit = os.path.join(workdir, "var", "dicomgw", "audit.jsonl")
        with open(audit) as f:
            self.assertEqual(len(f.readlines()), 2)


def _get(port, path, token):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


def _records(path):
    return [json.loads(line) for line in _read(path).splitlines() if line.strip()]


@defer.inlineCallbacks
def _wait_for_event(path, name, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in _records(path):
            if r.get("event") == name:
                return r
        yield task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"no {name} event in the log:\n{_read(path)}")


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

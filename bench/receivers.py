"""The receivers under test, each a separate process on 127.0.0.1.

A :class:`Receiver` starts fresh for every measured run (empty storage, a
fresh peak-RSS counter), reports its peak resident set size just before it
is stopped, and counts the instances it stored.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

BENCH_AE = "DICOMGW"
MAX_PDU = 131072

#: Each run's directory, under the work directory.  A run's files are emptied
#: after it (:meth:`Receiver.release_space`) and removed only when the bench
#: ends: on an ext4 file system without a journal, creating a file skips, one
#: lookup each, every inode of its block group freed in the last minutes, so
#: deleting one run's files slowed the next run's file creation ten to thirty
#: times (whichever receiver it was).  Emptying a file frees its blocks, not its inode.
RUNS = "runs"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"receiver did not listen on {port} within {timeout:g} s")


def peak_rss(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a live process, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process, all its threads."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _count_files(directory: str) -> int:
    total = 0
    for _, _, files in os.walk(directory):
        total += sum(1 for name in files if not name.endswith(".part"))
    return total


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


class Receiver:
    """Base: one receiver process in its own session (so a forking server's
    children go with it)."""

    name = "?"
    tls = False
    forks = False  # peak RSS of the parent only means little then

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.root = ""

    def command(self) -> list[str]:
        raise NotImplementedError

    def python_path(self) -> list[str]:
        """Directories searched for modules before this checkout's."""
        return []

    def store_dir(self) -> str:
        return self.root

    def prepare(self) -> None:
        pass

    #: A directory of this bench run's own under RUNS (bench.run --keep-runs): runs
    #: kept from before are never removed to make room for this one's.
    run_set = ""

    def start(self, run_id: str) -> None:
        self.root = os.path.join(self.workdir, RUNS, self.run_set, run_id)
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root)
        self.port = free_port()
        self.prepare()
        self.log = open(os.path.join(self.root, "receiver.log"), "wb")
        env = dict(os.environ, TCP_NODELAY="1")
        # The bench package must import in the receiver's directory too.
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*self.python_path(), repo, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(self.command(), cwd=self.root, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_for_port(self.port, self.proc)

    def stop(self) -> int | None:
        """Stop the process; return its peak RSS in bytes (None if unknown).

        Its CPU time is left in ``cpu`` (None if unknown).
        """
        rss = peak_rss(self.proc.pid)
        self.cpu = cpu_seconds(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        return rss

    def stored(self) -> int:
        return _count_files(self.store_dir())

    def release_space(self) -> None:
        """Empty every file of this run (see :data:`RUNS`): the disk space
        goes back at once, the files themselves when the bench ends."""
        for directory, _dirs, names in os.walk(self.root):
            for name in names:
                try:
                    os.truncate(os.path.join(directory, name), 0)
                except OSError:
                    pass


class Gateway(Receiver):
    """This project: ``twistd -n dicomgw`` with a bench configuration."""

    def __init__(self, workdir: str, *, fsync: bool = True, tls: "TLSFiles | None" = None, name=None,
                 source: str | None = None):
        super().__init__(workdir)
        self.fsync = fsync
        self.tls_files = tls
        self.tls = tls is not None
        #: Another checkout whose gateway package runs instead of this one's (bench.run --candidate).
        self.source = source
        self.name = name or ("dicomgw" + ("" if fsync else " fsync=false") + (" TLS" if tls else "")
                             + (f" @{os.path.basename(source.rstrip(os.sep))}" if source else ""))

    def python_path(self) -> list[str]:
        return [self.source] if self.source else []

    def config_text(self) -> str:
        listen = f'dicom = "tcp:{self.port}:interface=127.0.0.1"'
        tls_section = ""
        if self.tls_files is not None:
            # The TLS listener is listen.dicom_tls (issue 3).  The plain port
            # moves aside and the client is pointed at the TLS one.
            self.plain_port = free_port()
            tls_listen, tls_section = tls_config(self.port, self.tls_files)
            listen = f'dicom = "tcp:{self.plain_port}:interface=127.0.0.1"\n' + tls_listen
        return textwrap.dedent(f"""\
            [gateway]
            storage = "var/dicomgw"
            max_pdu_length = {MAX_PDU}
            {{gateway_extra}}

            [listen]
            {{listen}}

            [timeouts]
            artim = 30
            dimse = 120

            [storage]
            fsync = {"true" if self.fsync else "false"}

            [[ae]]
            title = "{BENCH_AE}"
            """).replace("{listen}", listen).replace("{gateway_extra}", gateway_extra()) + tls_section

    def prepare(self) -> None:
        with open(os.path.join(self.root, "dicomgw.toml"), "w") as f:
            f.write(self.config_text())

    #: When set, the gateway runs under cProfile and writes its stats here
    #: (one file per run, suffixed with the run id).
    profile_dir: str | None = None

    def command(self):
        prefix = [sys.executable]
        if self.profile_dir:
            os.makedirs(self.profile_dir, exist_ok=True)
            out = os.path.join(self.profile_dir, os.path.basename(self.root) + ".pstats")
            return prefix + ["-m", "bench.profiled_twistd", out, "-n", "--pidfile=", "--logfile",
                             "twistd.log", "dicomgw", "--config", "dicomgw.toml"]
        return prefix + [_bin("twistd"), "-n", "--pidfile=", "--logfile", "twistd.log", "dicomgw",
                "--config", "dicomgw.toml"]

    def store_dir(self):
        return os.path.join(self.root, "var", "dicomgw", "instances")


class DcmtkStorescp(Receiver):
    """DCMTK ``storescp``: bit-preserving (stores the dataset as received,
    like the gateway), no fsync (it has none).  ``fork`` serves
    associations in parallel, as DCMTK is deployed for concurrent peers."""

    def __init__(self, workdir: str, *, fork: bool = False, tls: "TLSFiles | None" = None):
        super().__init__(workdir)
        self.forks = fork
        self.tls_files = tls
        self.tls = tls is not None
        self.name = "DCMTK storescp" + (" TLS" if tls else "")

    def command(self):
        cmd = ["storescp", "-q", "-od", "out", "-pdu", str(MAX_PDU), "+B", "-aet", BENCH_AE]
        if self.forks:
            cmd.append("--fork")
        if self.tls_files is not None:
            cmd += ["+tls", self.tls_files.key, self.tls_files.cert, "-ic"]
        return cmd + [str(self.port)]

    def prepare(self):
        os.makedirs(os.path.join(self.root, "out"))

    def store_dir(self):
        return os.path.join(self.root, "out")


class Floor(Receiver):
    """The floor (bench/floor.py): the least a Twisted receiver does to store
    the instances, with ``digest`` inline and close and rename in a thread
    (``rename="thread"``) or on the reactor."""

    def __init__(self, workdir: str, *, digest: str = "blake3", rename: str = "reactor",
                 tls: "TLSFiles | None" = None):
        super().__init__(workdir)
        self.digest, self.rename, self.tls_files = digest, rename, tls
        self.tls = tls is not None
        self.name = f"floor ({digest}, rename on the {rename})" + (" TLS" if tls else "")

    def command(self):
        cmd = [sys.executable, "-m", "bench.floor", str(self.port), "out", "--digest", self.digest,
               "--rename", self.rename]
        if self.tls_files is not None:
            cmd += ["--tls", self.tls_files.cert, self.tls_files.key]
        return cmd

    def prepare(self):
        os.makedirs(os.path.join(self.root, "out"))

    def store_dir(self):
        return os.path.join(self.root, "out")


class PynetdicomStorescp(Receiver):
    name = "pynetdicom storescp"

    def command(self):
        return [sys.executable, "-m", "pynetdicom", "storescp", "-q", "-od", "out",
                "-pdu", str(MAX_PDU), "-aet", BENCH_AE, str(self.port)]

    def prepare(self):
        os.makedirs(os.path.join(self.root, "out"))

    def store_dir(self):
        return os.path.join(self.root, "out")


# ---- TLS -------------------------------------------------------------------


class TLSFiles:
    """A self-signed key and certificate for 127.0.0.1 (made with openssl)."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self.key = os.path.join(directory, "key.pem")
        self.cert = os.path.join(directory, "cert.pem")
        if not (os.path.exists(self.key) and os.path.exists(self.cert)):
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                 "-keyout", self.key, "-out", self.cert],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tls_config(port: int, files: TLSFiles) -> tuple[str, str]:
    """The gateway's TLS port: its ``[listen]`` line and its ``[tls]`` table.

    The one place that knows how the TLS listener is configured (issue 3):
    ``listen.dicom_tls`` is an endpoint with TLS layered on top from
    ``[tls]``.  The client presents the same self-signed certificate the
    gateway trusts as its CA, so mutual TLS is exercised too.
    """
    listen = f'dicom_tls = "tcp:{port}:interface=127.0.0.1"'
    section = textwrap.dedent(f"""
        [tls]
        certificate = "{files.cert}"
        private_key = "{files.key}"
        ca_certificates = "{files.cert}"
        require_client_certificate = true
        """)
    return listen, section


def _accepted(text: str) -> str | None:
    """None if the gateway's configuration parser accepts ``text``, else the problem."""
    from gateway.config import ConfigError, config_from_string

    try:
        config_from_string(text + f'\n[[ae]]\ntitle = "{BENCH_AE}"\n')
    except ConfigError as e:
        return " ".join(str(e).split())
    return None


def gateway_extra() -> str:
    """``[gateway]`` lines for keys this version of the gateway knows.

    ``max_associations`` (issue 3) limits associations open at once; the
    bench lifts it to its maximum so that scenario 4 measures serving, not
    refusing.
    """
    line = "max_associations = 1000"
    return line if _accepted(f"[gateway]\n{line}\n") is None else ""


def gateway_tls_support(files: TLSFiles) -> str | None:
    """None when the gateway's configuration accepts a TLS listener, else why not."""
    listen, section = tls_config(0, files)
    why = _accepted(f'[listen]\ndicom = "tcp:0:interface=127.0.0.1"\n{listen}\n{section}')
    if why is not None:
        return f"the gateway configuration has no TLS listener yet ({why})"
    return None

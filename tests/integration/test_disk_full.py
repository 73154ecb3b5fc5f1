"""A storage file system that fills up: nothing answered Success goes missing from the index.

The gateway's storage is a small tmpfs mounted for the test (root only).
Several DCMTK storescu associations send more than it holds; every instance
the gateway answered with Success must have its file and its index row
afterwards, every association must end in release (none aborted at release
for want of room for the index), and the rest is refused with A700.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess

from twisted.internet import defer
from twisted.trial import unittest

from gateway.part10 import read_meta
from tests import dicomfiles
from tests.integration.harness import IN_CI, run, start_gateway
from tests.integration.test_policy import wait_for

TMPFS_MB = 40


def mount_tmpfs(testcase, size_mb: int) -> str:
    if os.geteuid() != 0:
        if IN_CI:
            raise AssertionError("the disk-full test mounts a tmpfs: CI runs as root")
        raise unittest.SkipTest("mounting a small tmpfs needs root")
    path = os.path.abspath(testcase.mktemp())
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", path], check=True)
    testcase.addCleanup(subprocess.run, ["umount", "-l", path], check=False)
    return path


def statuses(log: str) -> list[str]:
    """storescu -v: the status of each C-STORE, in the order the files were sent."""
    return re.findall(r"Received Store Response \(([^)]*)\)", log)


class DiskFullTests(unittest.TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def test_no_acknowledged_instance_is_missing_from_the_index(self):
        root = mount_tmpfs(self, TMPFS_MB)
        gw = yield start_gateway(self, storage=os.path.join(root, "gw"), fsync=True, check_interval=0.5)
        senders, per_sender = 4, 130  # 130 KB each: about 68 MB for a 40 MB file system
        batches = []
        for n in range(senders):
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
            batches.append([dicomfiles.ct_image(os.path.join(directory, f"{i}.dcm"), rows=256, cols=256,
                                                number=n * 1000 + i) for i in range(per_sender)])
        runs = yield defer.gatherResults([run("storescu", "-v", "-aet", f"FILL{n}", "-aec", "DICOMGW",
                                              "127.0.0.1", str(gw.port), *files)
                                          for n, files in enumerate(batches)])
        yield wait_for(lambda: not gw.scp.active, timeout=30)

        acked, refused = set(), []
        for (out, err, _code), files in zip(runs, batches):
            log = out + err
            answers = statuses(log)
            self.assertIn("Releasing Association", log)  # not aborted at release
            self.assertNotIn("Aborting Association", log)
            for path, status in zip(files, answers):
                if status == "Success":
                    acked.add(read_meta(path)[1])
                else:
                    refused.append(status)
        self.assertTrue(acked, "nothing was stored")
        self.assertTrue(refused, "the file system never filled")
        self.assertEqual(set(refused), {"Refused: OutOfResources"})

        conn = sqlite3.connect(os.path.join(gw.storage_root, "dicomgw.sqlite"))
        try:
            indexed = {r[0] for r in conn.execute(
                "SELECT sop_instance_uid FROM instances WHERE state IN ('received', 'kept', 'payload')")}
            ended = {r[0] for r in conn.execute("SELECT state FROM associations")}
        finally:
            conn.close()
        self.assertEqual(acked - indexed, set(), "answered Success, missing from the index")
        self.assertEqual(ended, {"released"})
        stored = {os.path.basename(p)[:-4] for p in gw.stored_files()}
        self.assertEqual(acked - stored, set(), "answered Success, no file")

"""The benchmark still works: its report logic, and a tiny run end to end.

Nothing here times anything: timing belongs to the benchmark itself.  These
tests only make sure a broken bench is caught by CI.
"""

from __future__ import annotations

import json
import os

from twisted.trial import unittest

from bench import run as B
from bench.receivers import RUNS
from tests.integration.harness import require_program, require_pynetdicom


def _scenario(key, unit, names):
    class R:
        forks = False

        def __init__(self, name):
            self.name = name

    return B.Scenario(key, f"scenario {key}", B.Workload([]), [R(n) for n in names], unit)


class ReportTests(unittest.TestCase):
    names = ["dicomgw", "DCMTK storescp", "pynetdicom storescp"]

    def runs(self, key, seconds, instances=500, size=250_000_000, stored=None, failed=0, rss=50 << 20):
        out = []
        for name, times in zip(self.names, seconds):
            for rep, t in enumerate(times):
                out.append(B.Run(key, name, rep, t, instances, size,
                                 instances if stored is None else stored, failed, rss))
        return out

    def test_medians_ratios_and_targets(self):
        self.names = ["dicomgw", "dicomgw fsync=false", "DCMTK storescp", "floor (blake3, rename on the reactor)"]
        scenarios = [_scenario("1", "MB/s", self.names), _scenario("2", "inst/s", self.names)]
        runs = (self.runs("1", [[3.0, 3.2, 3.1], [1.0, 3.0, 1.2], [1.0, 0.9, 0.8], [1.0, 1.0, 1.0]])
                + self.runs("2", [[4.0, 4.0, 4.0], [2.5, 2.4, 2.6], [1.0, 1.0, 1.0], [1.1, 1.1, 1.1]],
                            instances=2000))
        for run in runs:
            run.disk_fsync_s = 0.001 if run.scenario == "2" else 0.004
        rows = B.summarize(scenarios, runs)
        gw1 = rows[1]
        self.assertEqual((gw1.receiver, gw1.median_s), ("dicomgw fsync=false", 1.2))  # median, not mean
        self.assertAlmostEqual(gw1.ratio_to_dcmtk, 1.2 / 0.9)
        self.assertAlmostEqual(gw1.rate, 250 / 1.2)
        self.assertAlmostEqual(rows[5].rate, 2000 / 2.5)
        targets = [(text, ok, figures) for text, ok, figures in B.targets(rows, False)]
        by_start = {text.split(",")[0].split(":")[0]: (ok, figures) for text, ok, figures in targets}
        self.assertEqual([ok for _t, ok, _f in targets[:2]], [False, False])  # 1.33 > 1.3; 2.5 > 1.4
        self.assertIn("the floor 1.11 x", targets[0][2])
        # fsync: (3.1 - 1.2) / 500 = 3.8 ms <= 1.2 x 4 ms; (4.0 - 2.5) / 2000 = 0.75 ms <= 1.2 ms.
        fsync = [(ok, f) for text, ok, f in targets if "what fsync adds" in text]
        self.assertEqual([ok for ok, _f in fsync], [True, True])
        self.assertIn("3.800 ms per instance = 0.95 x the disk's 4.000 ms", fsync[0][1])
        self.assertTrue(by_start)

    def test_missing_instances_are_reported(self):
        scenarios = [_scenario("1", "MB/s", self.names)]
        rows = B.summarize(scenarios, self.runs("1", [[1.0], [1.0], [1.0]], stored=499))
        self.assertFalse(rows[0].stored_ok)

        class Args:
            argv, note = ["--quick"], "a note"

        text = B.markdown(rows, B.targets(rows, False), {"cores": 2}, Args, "2026-01-01 00:00")
        self.assertIn("| 1: scenario 1 | dicomgw | 1.000 |", text)
        self.assertIn("| NO |", text)
        self.assertIn("a note", text)
        self.assertIn("with `python -m bench.run --quick`.", text)

    def test_the_host_is_reported_per_scenario(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 3 17 0 0\n")
        self.assertEqual(B.host_times(path), (1000, 35))
        self.assertIsNone(B.host_times(path + ".missing"))
        self.assertAlmostEqual(B.stolen((1000, 35), (1400, 55)), 0.05)
        self.assertIsNone(B.stolen(None, (1400, 55)))
        scenarios = [_scenario("2", "inst/s", self.names)]
        runs = self.runs("2", [[2.0, 2.2], [1.0, 1.1], [9.0, 9.0]], instances=2000)
        for run, (probe, steal) in zip(runs, [(300, 0.0), (180, 0.02), (250, 0.001), (260, 0.0),
                                              (240, 0.0), (255, 0.0)]):
            run.sha256_probe, run.steal = probe, steal
        rows = B.summarize(scenarios, runs)

        class Args:
            argv, note = [], ""

        text = B.markdown(rows, B.targets(rows, False), {"cores": 2}, Args, "2026-01-01 00:00", runs)
        # Weighted by duration: (0.02 * 2.2 + 0.001 * 1.0) / (2.0 + 2.2 + 1.0 + 1.1 + 9.0 + 9.0)
        self.assertIn("- 2: SHA-256 180-300 MB/s before its runs (median 252); CPU time taken by the "
                      "hypervisor during its runs 0.2%", text)
        # Without probes (results from elsewhere), no such section.
        self.assertNotIn("## The host", B.markdown(rows, [], {}, Args, "2026-01-01 00:00"))

    def test_local_paths_are_not_recorded(self):
        self.assertEqual(B.shown_argv(["--big", "--workdir", "/x/y", "--note", "n", "--out=/z", "--reps", "2"]),
                         ["--big", "--reps", "2"])


class ClientTests(unittest.TestCase):
    def test_a_client_still_running_at_the_deadline_is_killed_and_counted(self):
        self.patch(B, "storescu_command", lambda port, files, tls=None: ["sleep", files[0]])
        seconds, failed, _cpu = B.run_clients(0, B.Workload([["0"], ["60"]]), timeout=0.5)
        self.assertEqual(failed, 1)
        self.assertLess(seconds, 30)


class SpaceTests(unittest.TestCase):
    def test_a_run_gives_its_space_back_and_keeps_its_files(self):
        from bench.receivers import Receiver

        receiver = Receiver(os.path.abspath(self.mktemp()))
        receiver.root = os.path.join(receiver.workdir, RUNS, "s1-r0-0")
        os.makedirs(os.path.join(receiver.root, "a", "b"))
        for path in ("x.dcm", "a/b/y.dcm"):
            with open(os.path.join(receiver.root, path), "wb") as f:
                f.write(b"z" * 10000)
        receiver.release_space()
        sizes = {path: os.path.getsize(os.path.join(receiver.root, path)) for path in ("x.dcm", "a/b/y.dcm")}
        self.assertEqual(sizes, {"x.dcm": 0, "a/b/y.dcm": 0})


class QuickRunTests(unittest.TestCase):
    """``python -m bench.run --quick`` for one scenario, gateway and DCMTK."""

    timeout = 120

    def test_quick_scenario_1(self):
        require_program("storescu")
        require_program("storescp")
        require_program("openssl")
        require_pynetdicom()
        workdir, out = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        code = B.main(["--quick", "--only", "1", "--reps", "1", "--receivers", "dicomgw,DCMTK",
                       "--workdir", workdir, "--out", out])
        self.assertEqual(code, 0)
        with open(os.path.join(out, "results.json")) as f:
            result = json.load(f)
        receivers = sorted(r["receiver"] for r in result["runs"])
        self.assertEqual(receivers, ["DCMTK storescp", "dicomgw", "dicomgw fsync=false"])
        for r in result["runs"]:
            self.assertEqual(r["stored"], B.QUICK.ct_single, r)
            self.assertEqual(r["failed_clients"], 0, r)
            self.assertGreater(r["sha256_probe"], 0, r)
        with open(os.path.join(out, "results.md")) as f:
            text = f.read()
        self.assertIn("| 1: 20 CT 512x512, one association | dicomgw |", text)
        self.assertIn("- 1: SHA-256 ", text)
        # The receivers' files stay until the bench ends, and go then; the
        # generated data stay in a given work directory.
        self.assertFalse(os.path.exists(os.path.join(workdir, RUNS)))
        self.assertTrue(os.listdir(os.path.join(workdir, "data")))

    def test_a_candidate_checkout_runs_beside_and_kept_runs_stay(self):
        require_program("storescu")
        require_program("openssl")
        require_pynetdicom()
        repo = os.path.dirname(os.path.dirname(os.path.abspath(B.__file__)))
        workdir, out = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        code = B.main(["--quick", "--only", "1", "--reps", "1", "--receivers", "dicomgw fsync=false",
                       "--candidate", repo, "--keep-runs", "--workdir", workdir, "--out", out])
        self.assertEqual(code, 0)
        with open(os.path.join(out, "results.json")) as f:
            runs = json.load(f)["runs"]
        self.assertEqual(sorted(r["receiver"] for r in runs),
                         ["dicomgw fsync=false", f"dicomgw fsync=false @{os.path.basename(repo)}"])
        self.assertTrue(all(r["stored"] == B.QUICK.ct_single for r in runs), runs)
        [run_set] = os.listdir(os.path.join(workdir, RUNS))
        self.assertEqual(len(os.listdir(os.path.join(workdir, RUNS, run_set))), 2 + 1)  # two runs, the disk probe


class MessagingBenchTests(unittest.TestCase):
    timeout = 180

    def test_messaging_bench_runs_end_to_end(self):
        from bench import messaging
        from tests.integration.rabbit import require_rabbitmq

        require_program("storescu")
        require_rabbitmq()
        out = os.path.abspath(self.mktemp())
        code = messaging.main(["--reps", "1", "--ct", "3", "--studies", "3", "--per-study", "2",
                               "--workdir", os.path.abspath(self.mktemp()), "--out", out])
        self.assertEqual(code, 0)
        with open(os.path.join(out, "messaging.json")) as f:
            scale = json.load(f)["scale"]
        self.assertEqual((scale["requests"], scale["distinct_message_ids"], scale["files_in_requests"]), (3, 3, 6))

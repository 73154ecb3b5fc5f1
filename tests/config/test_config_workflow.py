"""Configuration of payloads, pipelines, the reclaimer and observers."""

from __future__ import annotations

import os

from twisted.trial import unittest

from gateway.config import ConfigError, config_from_string, load_config

from tests import ROOT

ETC = os.path.join(ROOT, "etc")


class WorkflowConfigTests(unittest.TestCase):
    def problems(self, text):
        with self.assertRaises(ConfigError) as cm:
            config_from_string(text, "test.toml")
        return cm.exception.problems

    def test_defaults_of_the_shipped_file(self):
        c = load_config(os.path.join(ETC, "dicomgw.toml"))
        ae = c.ae_named("DICOMGW")
        self.assertEqual((ae.grouping, ae.timeout, ae.pipelines), ("study", 5, ()))
        self.assertEqual((c.storage.retention, c.storage.aborted_retention, c.reclaimer.interval), (0, 0, 60))
        self.assertEqual((c.pipeline, c.notify.observers), ((), ()))

    def test_example_pipeline_config(self):
        c = load_config(os.path.join(ETC, "pipeline-example.toml"))
        p = c.pipeline_named("summary")
        self.assertEqual(p.command, ("etc/pipelines/summarize.py", "{manifest}", "{output}"))
        self.assertEqual((p.timeout, p.retries, p.backoff, p.concurrency), (60, 2, 5, 1))
        self.assertEqual(c.ae_named("PIPELINE").pipelines, ("summary",))
        self.assertTrue(os.access(os.path.join(ETC, "pipelines", "summarize.py"), os.X_OK))

    def test_full_pipeline_tables(self):
        c = config_from_string(
            '[storage]\nretention = 10\naborted_retention = 60\n[reclaimer]\ninterval = 5\n'
            '[notify]\nobservers = ["pkg.mod.Obs"]\n'
            '[pipeline.a]\ncommand = ["/bin/true", "{payload}"]\nconcurrency = 2\ntimeout = 9\n'
            'retries = 1\nbackoff = 0.5\nexport = ["pacs"]\n'
            '[pipeline.b]\nwebhook = "https://example.org/hook"\n'
            '[[destination]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n'
            '[[ae]]\ntitle = "X"\ngrouping = "series"\ntimeout = 2\npipelines = ["a", "b"]\n')
        self.assertEqual(c.ae_named("X").pipelines, ("a", "b"))
        self.assertEqual(c.ae_named("X").grouping, "series")
        a = c.pipeline_named("a")
        self.assertEqual((a.concurrency, a.timeout, a.retries, a.backoff, a.export), (2, 9, 1, 0.5, ("pacs",)))
        self.assertEqual(c.pipeline_named("b").webhook, "https://example.org/hook")
        self.assertEqual((c.storage.retention, c.storage.aborted_retention, c.reclaimer.interval, c.notify.observers),
                         (10, 60, 5, ("pkg.mod.Obs",)))

    def test_errors_name_their_keys(self):
        problems = self.problems(
            '[storage]\naborted_retention = -1\n[reclaimer]\ninterval = 0\nbogus = 1\n'
            '[notify]\nobservers = ["not a name"]\n'
            '[pipeline.both]\ncommand = ["x"]\nwebhook = "http://h/"\n'
            '[pipeline.none]\nretries = -1\n'
            '[pipeline.hook]\nwebhook = "ftp://h/"\nextra = 1\nexport = ["nowhere"]\n'
            '[[ae]]\ntitle = "X"\ngrouping = "instance"\ntimeout = 0\npipelines = ["missing", "both"]\n')
        for key in ("pipeline.hook.export: no [[destination]] named 'nowhere'",
                    "storage.aborted_retention", "reclaimer.interval", "reclaimer.bogus: unknown key",
                    "notify.observers[0]", "pipeline.both: needs exactly one", "pipeline.none: needs exactly one",
                    "pipeline.none.retries", "pipeline.hook.webhook", "pipeline.hook.extra: unknown key",
                    "ae[0].grouping", "ae[0].timeout", "ae[0].pipelines: no [pipeline.missing]"):
            self.assertTrue(any(key in p for p in problems), f"{key!r} not in {problems}")
        self.assertFalse(any("pipeline.both]" in p for p in problems))

    def test_pipelines_must_be_strings(self):
        problems = self.problems('[pipeline.a]\ncommand = ["x", 1]\n[[ae]]\ntitle = "X"\n')
        self.assertTrue(any(p.startswith("pipeline.a.command: expected an array") for p in problems), problems)


class ObserverLoadingTests(unittest.TestCase):
    def write(self, observers):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f'[notify]\nobservers = {observers}\n[[ae]]\ntitle = "X"\n')
        return path

    def test_unimportable_observer_stops_start_up_naming_the_key(self):
        from gateway.tap import load_checked_config

        path = self.write('["gateway.testing.RecordingObserver", "nosuch.module.Factory"]')
        with self.assertRaises(ConfigError) as cm:
            load_checked_config(path)
        self.assertIn("notify.observers[1]: cannot import 'nosuch.module.Factory'", str(cm.exception))
        self.assertIn(path, str(cm.exception))

    def test_factory_must_make_an_observer(self):
        from gateway.ingest.observers import load_observer

        config = load_config(self.write('["gateway.config.Pipeline"]'))
        with self.assertRaises(ConfigError) as cm:
            load_observer("os.path.join", config, 0)
        self.assertIn("notify.observers[0]", str(cm.exception))
        observer = load_observer("gateway.testing.RecordingObserver", config, 0)
        self.assertEqual(observer.stored, [])

    def test_check_config_imports_observers(self):
        import contextlib
        import io

        from gateway.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["check-config", self.write('["nosuch.module.Factory"]')])
        self.assertEqual(code, 1)
        self.assertIn("notify.observers[0]: cannot import", err.getvalue())

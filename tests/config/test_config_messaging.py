"""The [messaging] table and the per-AE workflows."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from twisted.trial import unittest

from gateway.config import ConfigError, Messaging, config_from_string
from gateway.ops.reload import changed_keys

BASE = '[[ae]]\ntitle = "DICOMGW"\n'
# Every key, none at its default.
EVERY_KEY = textwrap.dedent('''
    [messaging]
    url = "amqps://u:p@broker.example.org/prod"
    exchange = "ex"
    bucket = "b"
    workflow_request = "a.b"
    export_complete = "c.d"
    export_request_prefix = "e.f"
    export_agents = ["one", "two"]
    prefetch = 2
    app_id = "gw2"
    [[ae]]
    title = "DICOMGW"
    workflows = ["wf1", "wf2"]
    ''')


class MessagingConfigTests(unittest.TestCase):
    def test_absent_or_empty_url_is_off(self):
        self.assertFalse(config_from_string(BASE).messaging.enabled)
        self.assertFalse(config_from_string('[messaging]\nurl = ""\n' + BASE).messaging.enabled)

    def test_defaults_are_monai_deploys(self):
        m = config_from_string('[messaging]\nurl = "amqp://guest:guest@127.0.0.1:5672/%2F"\n' + BASE).messaging
        self.assertTrue(m.enabled)
        self.assertEqual((m.exchange, m.bucket, m.workflow_request, m.export_complete, m.export_request_prefix,
                          m.export_agents),
                         ("monaideploy", "dicomgw", "md.workflow.request", "md.export.complete",
                          "md.export.request", ("monaiscu",)))
        self.assertEqual(m.export_queue("monaiscu"), "md.export.request.monaiscu")
        self.assertEqual(m.safe_url(), "amqp://guest@127.0.0.1:5672/%2F")  # no password

    def test_every_key_and_workflows(self):
        c = config_from_string(EVERY_KEY)
        self.assertEqual(c.messaging.export_agents, ("one", "two"))
        self.assertEqual((c.messaging.prefetch, c.messaging.app_id, c.messaging.export_queue("one")),
                         (2, "gw2", "e.f.one"))
        self.assertEqual(c.ae_named("DICOMGW").workflows, ("wf1", "wf2"))

    def test_problems_name_their_keys(self):
        with self.assertRaises(ConfigError) as e:
            config_from_string(textwrap.dedent('''
                [messaging]
                url = "http://127.0.0.1/"
                exchange = "has space"
                export_agents = ["ok", "b/ad"]
                prefetch = 0
                colour = "blue"
                [[ae]]
                title = "DICOMGW"
                workflows = "wf"
                '''))
        text = "\n".join(e.exception.problems)
        for key in ("messaging.url", "messaging.exchange", "messaging.export_agents", "messaging.prefetch",
                    "messaging.colour: unknown key", "ae[0].workflows"):
            self.assertIn(key, text)
        for url in ("amqp:///%2F", "amqp://h:99999/", "amqp://h/a/b", "amqp://h/?heartbeat=x"):
            with self.assertRaises(ConfigError, msg=url) as e:
                config_from_string(f'[messaging]\nurl = "{url}"\n' + BASE)
            self.assertTrue(e.exception.problems[0].startswith("messaging.url:"), e.exception.problems)

    def test_a_reload_applies_what_goes_into_each_message_and_says_restart_for_the_rest(self):
        old = config_from_string('[messaging]\nurl = "amqp://h/"\n' + BASE)
        changed, restart = changed_keys(old, config_from_string(EVERY_KEY))
        restart_only = {"messaging.url", "messaging.exchange", "messaging.export_request_prefix",
                        "messaging.export_agents", "messaging.prefetch", "messaging.app_id"}
        self.assertEqual(set(restart), restart_only)
        self.assertEqual(set(changed), restart_only | {"messaging.bucket", "messaging.workflow_request",
                                                       "messaging.export_complete", "ae"})

    def test_what_a_reload_applies_to_a_running_table(self):
        from gateway.config.options import reloaded

        old = config_from_string('[messaging]\nurl = "amqp://h/"\n' + BASE).messaging
        new = config_from_string('[messaging]\nurl = "amqp://other/"\nbucket = "b2"\nprefetch = 9\n'
                                 'export_complete = "e.c"\n' + BASE).messaging
        applied = reloaded(old, new)
        self.assertEqual((applied.url, applied.prefetch), ("amqp://h/", 4))
        self.assertEqual((applied.bucket, applied.export_complete), ("b2", "e.c"))

    def test_ca_certificates_only_with_amqps_and_only_a_file(self):
        pem = os.path.abspath(self.mktemp())
        with open(pem, "w") as f:
            f.write("x")
        ok = config_from_string(f'[messaging]\nurl = "amqps://h/"\nca_certificates = "{pem}"\n' + BASE)
        self.assertEqual(ok.messaging.ca_certificates, pem)
        for url, path, why in (("amqp://h/", pem, "only used with an amqps:// url"),
                               ("amqps://h/", pem + ".missing", "is not a readable file")):
            with self.assertRaises(ConfigError) as e:
                config_from_string(f'[messaging]\nurl = "{url}"\nca_certificates = "{path}"\n' + BASE)
            self.assertEqual(len(e.exception.problems), 1)
            self.assertTrue(e.exception.problems[0].startswith("messaging.ca_certificates:"))
            self.assertIn(why, e.exception.problems[0])

    def test_a_ca_file_without_a_certificate_is_refused_before_start(self):
        from gateway.tap import load_checked_config

        pem, path = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        with open(pem, "w") as f:
            f.write("not a certificate")
        with open(path, "w") as f:
            f.write(f'[messaging]\nurl = "amqps://h/"\nca_certificates = "{pem}"\n' + BASE)
        with self.assertRaises(ConfigError) as e:
            load_checked_config(path)
        self.assertIn("messaging.ca_certificates", str(e.exception))
        self.assertIn("no PEM certificate", str(e.exception))

    def test_check_config_validates_without_connecting(self):
        path = os.path.abspath(self.mktemp())
        # Port 1 on loopback: nothing listens, and nothing must try.
        with open(path, "w") as f:
            f.write('[messaging]\nurl = "amqp://guest:guest@127.0.0.1:1/%2F"\n' + BASE)
        ok = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", path], capture_output=True,
                            text=True, timeout=60)
        self.assertEqual(ok.returncode, 0, ok.stderr)
        with open(path, "w") as f:
            f.write('[messaging]\nurl = "amqp://guest:guest@127.0.0.1:1/%2F"\nexport_agents = [""]\n' + BASE)
        bad = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", path], capture_output=True,
                             text=True, timeout=60)
        self.assertEqual(bad.returncode, 1)
        self.assertIn("messaging.export_agents", bad.stderr)


class ShippedExampleTests(unittest.TestCase):
    def test_the_commented_table_in_the_shipped_file_is_the_defaults(self):
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(here, "etc", "dicomgw.toml")) as f:
            text = f.read()
        block = text[text.index("# [messaging]"):].split("\n\n")[0]
        lines = [line[2:] for line in block.splitlines() if line.startswith("# ") and not line.startswith("# #")]
        config = config_from_string("\n".join(lines) + "\n" + BASE)
        self.assertEqual(config.messaging, Messaging(url="amqp://guest:guest@127.0.0.1:5672/%2F"))
        self.assertIn('# workflows = ["ct-lung"]', text)

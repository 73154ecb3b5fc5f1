from __future__ import annotations

import os

from twisted.trial import unittest

from gateway.config import ConfigError, config_from_string, load_config

from tests import ROOT

SHIPPED = os.path.join(ROOT, "etc", "dicomgw.toml")


class ConfigTests(unittest.TestCase):
    def assertProblems(self, text, *expected):
        with self.assertRaises(ConfigError) as cm:
            config_from_string(text, "test.toml")
        message = str(cm.exception)
        self.assertIn("test.toml", message)
        for fragment in expected:
            self.assertTrue(any(fragment in p for p in cm.exception.problems),
                            f"{fragment!r} not in {cm.exception.problems}")
        return cm.exception

    def test_shipped_file_is_valid_and_matches_the_contract(self):
        c = load_config(SHIPPED)
        self.assertEqual(c.gateway.storage, "var/dicomgw")
        self.assertEqual(c.gateway.max_pdu_length, 131072)
        self.assertEqual(c.gateway.implementation_version_name, "DICOMGW_0_1")
        self.assertEqual(c.listen.dicom, "tcp:11112")
        self.assertEqual((c.timeouts.artim, c.timeouts.dimse, c.storage.fsync), (30, 60, True))
        self.assertEqual([a.title for a in c.ae], ["DICOMGW"])

    def test_unknown_keys_and_sections_are_named(self):
        self.assertProblems(
            '[gateway]\nstorage = "x"\nstorge = 1\n[timeouts]\nartimm = 3\n[bogus]\n[[ae]]\ntitle = "A"\nfoo = 1\n',
            "gateway.storge: unknown key", "timeouts.artimm: unknown key", "bogus: unknown section",
            "ae[0].foo: unknown key",
        )

    def test_bad_values_name_the_key(self):
        e = self.assertProblems(
            '[gateway]\nmax_pdu_length = 100\nimplementation_version_name = "THIS IS FAR TOO LONG"\n'
            '[timeouts]\nartim = "thirty"\ndimse = 0\n[storage]\nfsync = 1\n[[ae]]\ntitle = "A/B"\n',
            "gateway.max_pdu_length", "gateway.implementation_version_name", "timeouts.artim",
            "timeouts.dimse", "storage.fsync", "ae[0].title",
        )
        self.assertEqual(len(e.problems), 6)

    def test_cluster_keys(self):
        c = config_from_string('[gateway]\nnode = "gw-1.a"\n[index]\nurl = "postgresql://u:secret@db/x"\n'
                               'schema = "site_a"\n[cluster]\nlease = 12\n[[ae]]\ntitle = "A"\n')
        self.assertEqual((c.gateway.node, c.index.url, c.index.schema, c.cluster.lease),
                         ("gw-1.a", "postgresql://u:secret@db/x", "site_a", 12.0))
        self.assertTrue(c.index.shared)
        self.assertEqual(c.index.safe_url(), "postgresql://u:***@db/x")
        self.assertNotIn("secret", repr(c))
        self.assertFalse(config_from_string('[[ae]]\ntitle = "A"\n').index.shared)  # SQLite by default
        self.assertProblems('[gateway]\nnode = "a/b"\n[index]\nurl = "mysql://db"\nschema = "Bad-Name"\n'
                            '[cluster]\nlease = 1\n[[ae]]\ntitle = "A"\n',
                            "gateway.node", "index.url", "index.schema", "cluster.lease")

    def test_ae_titles(self):
        self.assertProblems("", "ae: at least one")
        self.assertProblems('[[ae]]\ntitle = "A"\n[[ae]]\ntitle = "A"\n', "ae[1].title: 'A' is configured twice")
        self.assertProblems('[[ae]]\ntitle = ".."\n', "ae[0].title")
        self.assertProblems('[[ae]]\n', "ae[0].title: required")
        c = config_from_string('[[ae]]\ntitle = "CT_1"\n[[ae]]\ntitle = "MR-2"\n')
        self.assertIsNotNone(c.ae_named("MR-2"))
        self.assertIsNone(c.ae_named("CT_2"))

    def test_toml_syntax_error(self):
        self.assertProblems("[gateway\n", "not valid TOML")

    def test_missing_file(self):
        with self.assertRaises(ConfigError) as cm:
            load_config("/nonexistent/dicomgw.toml")
        self.assertIn("/nonexistent/dicomgw.toml", str(cm.exception))

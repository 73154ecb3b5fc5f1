"""The progress bar of ``dicomgw send``: drawn on a terminal only."""

from __future__ import annotations

import io

from twisted.trial.unittest import TestCase

from gateway.cli.scu import _Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


class ProgressTests(TestCase):
    def test_draws_on_a_terminal(self):
        out = Terminal()
        p = _Progress(4, out)
        p({"event": "export.file.finished", "state": "sent"})
        p({"event": "export.file", "state": "retry"})  # not final: not counted
        p({"event": "export.file.finished", "state": "failed"})
        p({"event": "export.job.finished", "state": "done"})
        p.finish()
        lines = out.getvalue().split("\r")
        self.assertEqual(lines[-1], "[" + "#" * 15 + "." * 15 + "] 2/4 (1 sent, 1 failed)\n")

    def test_silent_when_not_a_terminal(self):
        out = io.StringIO()
        p = _Progress(4, out)
        p({"event": "export.file", "state": "sent"})
        p.finish()
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(p.sent, 1)

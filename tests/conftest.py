"""pytest only: run every test from a scratch directory.

Trial-style tests make their temporary files with ``TestCase.mktemp()``,
which is relative to the current directory.  ``trial`` runs from its own
``_trial_temp``; under pytest that would be the project root, so move there.
"""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _scratch_directory(tmp_path_factory):
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("trial"))
    yield
    os.chdir(previous)

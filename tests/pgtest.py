"""A throwaway PostgreSQL database for one test run, and tests run on it.

The first test that asks creates ``dicomgw_test_<pid>_<random>`` on the
server of ``DICOMGW_TEST_POSTGRES`` (default: ``postgresql://postgres@127.0.0.1:5432/postgres``,
trust authentication as Debian's package gives on loopback); the end of the
process drops it.  Each test gets a schema of its own in it, so tests never
see each other's rows.  Without a server that answers, the PostgreSQL
variants are skipped, unless ``CI=true``: then they fail.

:func:`on_postgres` makes the PostgreSQL variant of a test case whose
databases are opened with :meth:`Backend.index_options` (or whose config
carries :meth:`Backend.index_toml`).
"""

from __future__ import annotations

import atexit
import itertools
import os
import secrets
from urllib.parse import urlsplit, urlunsplit

from twisted.trial.unittest import SkipTest

ADMIN_URL = os.environ.get("DICOMGW_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")

_state: dict = {}
_schemas = itertools.count(1)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def _drop(name):
    import psycopg

    try:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception:
        pass


def database_url() -> str:
    """The URL of this run's database, created on first use."""
    if "url" in _state:
        return _state["url"]
    if "error" in _state:
        _unavailable(_state["error"])
    try:
        import psycopg

        name = f"dicomgw_test_{os.getpid()}_{secrets.token_hex(3)}"
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except Exception as e:
        _state["error"] = f"no PostgreSQL at {ADMIN_URL}: {e}"
        _unavailable(_state["error"])
    atexit.register(_drop, name)
    _state["url"] = _with_database(ADMIN_URL, name)
    return _state["url"]


def _unavailable(why):
    if os.environ.get("CI") == "true":
        raise AssertionError(why + " (CI=true: PostgreSQL must be there)")
    raise SkipTest(why)


def fresh_schema() -> str:
    return f"t{os.getpid()}_{next(_schemas)}_{secrets.token_hex(2)}"


class Backend:
    """Mixin: which index back end this test case runs on (SQLite unless made by on_postgres)."""

    backend = "sqlite"

    def index_options(self) -> dict:
        """Keyword arguments for open_index (url, namespace): one schema per test."""
        if self.backend != "postgresql":
            return {}
        if not hasattr(self, "_pg_schema"):
            self._pg_url = database_url()
            self._pg_schema = fresh_schema()
        return {"url": self._pg_url, "namespace": self._pg_schema}

    def with_index(self, config):
        """``config`` on this back end."""
        from dataclasses import replace

        from gateway.config.sections import Index

        options = self.index_options()
        if not options:
            return config
        return replace(config, index=Index(url=options["url"], schema=options["namespace"]))

    def index_toml(self) -> str:
        """The [index] table of a config on this back end ("" for SQLite)."""
        options = self.index_options()
        if not options:
            return ""
        return f'\n[index]\nurl = "{options["url"]}"\nschema = "{options["namespace"]}"\n'


def on_postgres(cls):
    """The variant of test case ``cls`` on PostgreSQL."""
    return type(cls.__name__ + "OnPostgres", (cls,), {"backend": "postgresql", "__module__": cls.__module__})

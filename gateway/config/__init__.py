"""The gateway's configuration: one validated, immutable object parsed from TOML.

:class:`Config` mirrors the file: one frozen section per table
(``config.storage.fsync`` is ``[storage] fsync``, see
:mod:`gateway.config.sections`) and a tuple per array of tables
(``config.ae`` is ``[[ae]]``, ``config.pipeline`` is ``[pipeline.NAME]``,
see :mod:`gateway.config.tables`).  ``load_config(path)`` reads a file,
``config_from_string(text)`` a string (for tests).  Unknown keys and bad
values are rejected with :class:`ConfigError`, which lists every problem
found, each naming its key (``timeouts.artim``, ``ae[2].title``) and the
file.  Each option says whether a reload may apply it
(:func:`gateway.config.options.changes`).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from gateway.config import sections as S
from gateway.config.options import ConfigError, changes, parse_array, parse_named, parse_table
from gateway.config.sections import TLS_PROFILES, Messaging
from gateway.config.tables import GROUPINGS, AETitle, Destination, Pipeline, Source

__all__ = ["Config", "ConfigError", "load_config", "config_from_string", "parse_config", "changes",
           "DEFAULT_CONFIG_PATH", "AETitle", "Destination", "Pipeline", "Source", "GROUPINGS",
           "TLS_PROFILES", "Messaging"]

DEFAULT_CONFIG_PATH = "etc/dicomgw.toml"


@dataclass(frozen=True)
class Config:
    gateway: S.Gateway = S.Gateway()
    listen: S.Listen = S.Listen()
    tls: S.TLS = S.TLS()
    timeouts: S.Timeouts = S.Timeouts()
    storage: S.Storage = S.Storage()
    reclaimer: S.Reclaimer = S.Reclaimer()
    notify: S.Notify = S.Notify()
    http: S.HTTP = S.HTTP()
    dicomweb: S.DicomWeb = S.DicomWeb()
    scu: S.SCU = S.SCU()
    messaging: S.Messaging = S.Messaging()
    index: S.Index = S.Index()
    cluster: S.Cluster = S.Cluster()
    ae: tuple[AETitle, ...] = (AETitle("DICOMGW"),)
    source: tuple[Source, ...] = ()
    destination: tuple[Destination, ...] = ()
    pipeline: tuple[Pipeline, ...] = ()
    path: str = field(default="<string>", compare=False)  # the file it was read from

    def ae_named(self, title: str) -> AETitle | None:
        return next((a for a in self.ae if a.title == title), None)

    def destination_named(self, name: str) -> Destination | None:
        return next((d for d in self.destination if d.name == name), None)

    def pipeline_named(self, name: str) -> Pipeline | None:
        return next((p for p in self.pipeline if p.name == name), None)

    def dicomweb_ae(self) -> AETitle | None:
        """The [[ae]] whose rules plain ``/dicomweb/studies`` follows:
        ``dicomweb.ae``, or the first [[ae]] when that is ""."""
        if self.dicomweb.ae:
            return self.ae_named(self.dicomweb.ae)
        return self.ae[0] if self.ae else None


#: The TOML tables, each with how it is read.
_SECTIONS = {"gateway": S.Gateway, "listen": S.Listen, "tls": S.TLS, "timeouts": S.Timeouts,
             "storage": S.Storage, "reclaimer": S.Reclaimer, "notify": S.Notify, "http": S.HTTP,
             "dicomweb": S.DicomWeb, "scu": S.SCU, "messaging": S.Messaging,
             "index": S.Index, "cluster": S.Cluster}
_ARRAYS = {"ae": (AETitle, "title"), "source": (Source, None), "destination": (Destination, "name")}


def parse_config(doc: dict[str, Any], path: str = "<string>", checks=()) -> Config:
    """The Config of a TOML document, or ConfigError listing every problem.

    ``checks`` are functions ``f(config) -> [problem]`` run on what was
    read, after the tables' own rules: what the configuration names outside
    itself (certificate files, observer modules: gateway.tap).  A problem
    they find about a key whose value was refused already is dropped (the
    default that stands in for it is not what the file says).
    """
    problems: list[str] = []
    doc = dict(doc)
    parts: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        parts[name] = parse_table(cls, doc.pop(name, {}), name, problems) or cls()
    for name, (cls, unique) in _ARRAYS.items():
        if name in doc:
            parts[name] = parse_array(cls, doc.pop(name), name, problems, unique)
    if "ae" not in parts:
        problems.append("ae: at least one [[ae]] table is required")
    parts["pipeline"] = parse_named(Pipeline, doc.pop("pipeline", {}), "pipeline", problems)
    problems.extend(f"{name}: unknown section" for name in sorted(doc))
    config = Config(**parts, path=path)
    problems.extend(cross_checks(config))
    refused = [p.partition(":")[0] for p in problems]
    for check in checks:
        problems.extend(p for p in check(config) if not _about(p.partition(":")[0], refused))
    if problems:
        raise ConfigError(problems, path)
    return config


def _about(key: str, keys) -> bool:
    """Whether ``key`` is one of ``keys`` or inside one (``tls`` holds ``tls.certificate``)."""
    return any(key == k or key.startswith((k + ".", k + "[")) for k in keys)


def cross_checks(config: Config) -> list[str]:
    """What one table says about another."""
    problems = S.check_listen_http(config.listen, config.http)
    problems += S.check_listen_dicomweb(config.listen, config.dicomweb, config.tls)
    if config.dicomweb.ae and config.ae_named(config.dicomweb.ae) is None:
        problems.append(f"dicomweb.ae: {config.dicomweb.ae!r} is not the title of any [[ae]]")
    pipelines = {p.name for p in config.pipeline}
    sources = {s.ae_title for s in config.source}
    destinations = {d.name for d in config.destination}
    for i, ae in enumerate(config.ae):
        problems += [f"ae[{i}].pipelines: no [pipeline.{name}] table" for name in ae.pipelines
                     if name not in pipelines]
        problems += [f"ae[{i}].sources: {name!r} is not the ae_title of any [[source]]"
                     for name in ae.sources or () if name not in sources][:1]
        if ae.tls_only and config.listen.dicom_tls is None:
            problems.append(f"ae[{i}].tls_only: {ae.title!r} is TLS-only but listen.dicom_tls is not set")
    for p in config.pipeline:
        problems += [f"pipeline.{p.name}.export: no [[destination]] named {name!r}" for name in p.export
                     if name not in destinations]
    return problems


def config_from_string(text: str, path: str = "<string>", checks=()) -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"not valid TOML: {e}"], path) from None
    return parse_config(doc, path, checks)


def load_config(path: str, checks=()) -> Config:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError([f"cannot read the file: {e.strerror}"], path) from None
    except UnicodeDecodeError:
        raise ConfigError(["the file is not UTF-8"], path) from None
    return config_from_string(text, os.fspath(path), checks)

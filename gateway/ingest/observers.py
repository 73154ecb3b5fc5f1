"""Observers named in ``[notify] observers``: other code told of stored instances.

Each name is a factory (a dotted Python name) called with the configuration;
it must return an :class:`~gateway.interfaces.IInstanceStoredObserver`.  A
name that does not import, a factory that fails, or an object that is not
an observer is a configuration error naming the key.
"""

from __future__ import annotations

import importlib

from gateway.config import ConfigError
from gateway.interfaces import IInstanceStoredObserver


def _factory(name: str, config, index: int):
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as e:
        raise ConfigError([f"notify.observers[{index}]: cannot import {name!r}: {type(e).__name__}: {e}"],
                          config.path) from None


def check_observers(config):
    """Raise ConfigError naming the key if an observer factory cannot be imported."""
    problems = observer_problems(config)
    if problems:
        raise ConfigError(problems, config.path)


def observer_problems(config) -> list[str]:
    """Each observer factory that cannot be imported, by its key."""
    problems = []
    for i, name in enumerate(config.notify.observers):
        try:
            _factory(name, config, i)
        except ConfigError as e:
            problems.extend(e.problems)
    return problems


def load_observer(name: str, config, index: int):
    factory = _factory(name, config, index)
    try:
        observer = factory(config)
    except Exception as e:
        raise ConfigError([f"notify.observers[{index}]: cannot load {name!r}: {type(e).__name__}: {e}"],
                          config.path) from None
    if not IInstanceStoredObserver.providedBy(observer):
        raise ConfigError([f"notify.observers[{index}]: {name!r} did not make an IInstanceStoredObserver"],
                          config.path)
    return observer


def load_observers(config) -> list:
    return [load_observer(name, config, i) for i, name in enumerate(config.notify.observers)]

"""The seams between layers and services (zope.interface).

Services depend on these, not on each other's classes; in-memory fakes of
them live in :mod:`gateway.testing`.
"""

from __future__ import annotations

from zope.interface import Interface  # noqa: F401

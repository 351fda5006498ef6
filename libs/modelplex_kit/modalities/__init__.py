"""The modality registry: the one table of what Modelplex serves.

Each row (a :class:`Modality`, defined in the modality's own module next to its
catalog capabilities and request check) says which backend package serves the
modality, its settings prefix, its gRPC stub, its port and how requests are
checked. The catalog's validation, ``make run``'s launcher, the edge's routing
and the container images (``modelplex_kit.container``) read this table; the
deployment files are checked against it (tests/deploy). Adding a modality adds
one module here holding a ``MODALITY`` row: every module of this package that
defines one is a row, in the order of its catalog ``Modality`` enum value.
"""

from __future__ import annotations

import importlib
import pkgutil

from modelplex_kit.modalities.base import CapabilitySpec, Modality


def _discover() -> tuple[Modality, ...]:
    """Every ``MODALITY`` defined by a module of this package (``base`` defines none)."""
    rows = []
    for module in pkgutil.iter_modules(__path__):
        row = getattr(importlib.import_module(f"{__name__}.{module.name}"), "MODALITY", None)
        if isinstance(row, Modality):
            rows.append(row)
    return tuple(sorted(rows, key=lambda row: row.proto))


REGISTRY: dict[str, Modality] = {row.name: row for row in _discover()}
_BY_PROTO = {row.proto: row for row in REGISTRY.values()}


def by_proto(value: int) -> Modality | None:
    return _BY_PROTO.get(value)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


__all__ = ["REGISTRY", "CapabilitySpec", "Modality", "by_proto", "names"]

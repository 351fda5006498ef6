"""An immutable, indexed view of the catalog.

The catalog service builds one per revision of its file; the edge keeps the
latest one it was sent, so resolving a model on the request path is a dict
lookup.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from modelplex.v1 import catalog_pb2


@dataclass(frozen=True, slots=True)
class CatalogView:
    models: tuple[catalog_pb2.Model, ...] = ()
    revision: int = 0
    _index: dict[str, catalog_pb2.Model] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, models: Iterable[catalog_pb2.Model], revision: int) -> CatalogView:
        models = tuple(models)
        index: dict[str, catalog_pb2.Model] = {}
        for model in models:
            for name in (model.id, *model.aliases):
                if name in index:
                    raise ValueError(f"model name {name!r} is used twice in the catalog")
                index[name] = model
        return cls(models, revision, index)

    def resolve(self, name: str) -> catalog_pb2.Model | None:
        return self._index.get(name)

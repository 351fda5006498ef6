"""The engine registry of a backend: engine name -> adapter class and the settings it reads.

Every backend chooses its adapter the same way: ``MODELPLEX_<SERVICE>_ENGINE`` names a row;
the row's adapter module is imported only then (each pulls in its own runtime's libraries),
and it is built from its own settings model, read from the same environment. An unknown
name stops startup with the list of known ones.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple


class EngineEntry(NamedTuple):
    #: "module:Class", imported only when chosen.
    adapter: str
    #: The engine's own settings model (same env prefix); None: the service's settings as they are.
    settings: type | None = None


class UnknownEngine(SystemExit):
    """A startup error that names the engines there are (SystemExit: no traceback for a typo)."""


class EngineRegistry(dict[str, EngineEntry]):
    def __init__(self, service: str, entries: dict[str, EngineEntry]) -> None:
        super().__init__(entries)
        self.service = service

    def entry(self, name: str) -> EngineEntry:
        try:
            return self[name]
        except KeyError:
            variable = f"MODELPLEX_{self.service.upper()}_ENGINE"
            raise UnknownEngine(f"{variable}={name!r} is not an engine; choose one of: {', '.join(self)}") from None

    def settings(self, settings: Any) -> Any:
        """The chosen engine's own settings model (``settings`` itself when it already is one)."""
        model = self.entry(settings.engine).settings
        return settings if model is None or isinstance(settings, model) else model()

    def load(self, settings: Any) -> Any:
        """The engine ``settings.engine`` names, built from its own settings."""
        module, _, cls = self.entry(settings.engine).adapter.partition(":")
        return getattr(importlib.import_module(module), cls)(self.settings(settings))

"""One folder per OpenAI endpoint: its router, wire protocol (pydantic) and translator.

Every folder here whose ``router.py`` defines ``router`` is mounted (alphabetically; no two
endpoints share a path), so a new endpoint adds its folder and nothing else. A router that
takes file uploads names its path ``UPLOAD_PATH``: the edge's body limit there is
``max_upload_bytes`` instead of ``max_body_bytes``.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from fastapi import APIRouter


def _router_modules() -> tuple[ModuleType, ...]:
    modules = []
    for folder in sorted(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg):
        module = importlib.import_module(f"{__name__}.{folder}.router")
        if isinstance(getattr(module, "router", None), APIRouter):
            modules.append(module)
    return tuple(modules)


_MODULES = _router_modules()
ROUTERS: tuple[APIRouter, ...] = tuple(module.router for module in _MODULES)
# Endpoints taking file uploads: the edge's body limit for them is max_upload_bytes.
UPLOAD_PATHS = frozenset(module.UPLOAD_PATH for module in _MODULES if hasattr(module, "UPLOAD_PATH"))
# Upload endpoints with a body limit of their own (``body_limit(settings)``, e.g. /v1/files' 200 MB).
BODY_LIMITS = {module.UPLOAD_PATH: module.body_limit for module in _MODULES if hasattr(module, "body_limit")}

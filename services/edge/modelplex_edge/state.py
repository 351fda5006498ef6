"""What the routes depend on, built once at startup and injected with Depends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from modelplex_edge.auth import Authorizer, Caller
from modelplex_edge.backends import Backends
from modelplex_edge.catalog_client import CatalogWatcher
from modelplex_edge.settings import EdgeSettings


@dataclass(slots=True)
class EdgeState:
    settings: EdgeSettings
    catalog: CatalogWatcher
    backends: Backends
    authorizer: Authorizer


async def _state(request: Request) -> EdgeState:
    return request.app.state.edge


async def _caller(request: Request) -> Caller:
    return request.app.state.edge.authorizer.authorize(request.headers.get("authorization"))


State = Annotated[EdgeState, Depends(_state)]
Authorized = Annotated[Caller, Depends(_caller)]

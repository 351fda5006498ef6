"""Exact-path dispatch for the hot endpoints, ahead of the router.

For every request the router tries each mounted route's path regex in turn (through FastAPI's
included-router layers), then FastAPI solves the endpoint's parameters and opens two exit stacks,
even for an endpoint whose one parameter is the Request: about a quarter of the edge's CPU per
request (bench/cpu_per_request.py, docs/benchmarks.md). The hot endpoints' paths are fixed, so one
dict lookup finds them, and their endpoint function (the very one the router mounts: one pipeline,
one folder per endpoint) is called directly. Everything else (other paths, other methods: a 405)
goes to the router as before; errors still reach the app's exception handlers, which sit outside the
router, and the middleware still sees the route in ``scope["route"]`` (its metrics label).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

#: POST paths dispatched here: the endpoints that carry nearly all of the traffic.
HOT_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})


class HotRoutes:
    """Wraps the router: a POST to one of ``routes``' paths calls its endpoint; the rest, the router."""

    def __init__(self, router: ASGIApp, routes: dict[str, APIRoute]) -> None:
        self.router = router
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        # Behind a root_path the router matches a stripped path: left to it.
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            route = self.routes.get(scope["path"])
        if route is None:
            await self.router(scope, receive, send)
            return
        scope["route"] = route  # what the router would have set (the middleware labels metrics by it)
        scope["endpoint"] = route.endpoint
        scope["path_params"] = {}
        response = await route.endpoint(Request(scope, receive, send))
        await response(scope, receive, send)


def hot_routes(routers: Iterable[APIRouter]) -> dict[str, APIRoute]:
    """The POST routes of HOT_PATHS, each checked to need nothing of FastAPI but the Request."""
    found: dict[str, APIRoute] = {}
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute) and route.path in HOT_PATHS and "POST" in route.methods:
                _check_plain(route)
                found[route.path] = route
    return found


def _check_plain(route: APIRoute) -> None:
    """Called directly, an endpoint gets only the Request: one that grew a dependency or a typed
    parameter would silently lose it here, so that is refused at startup instead."""
    params = list(inspect.signature(route.endpoint).parameters.values())
    plain = (
        len(params) == 1
        and params[0].annotation in (Request, "Request")
        and not route.dependencies
        and not route.dependant.dependencies
        and inspect.iscoroutinefunction(route.endpoint)
    )
    if not plain:
        raise TypeError(f"hot route {route.path} must be `async def f(http: Request)` without dependencies")


def install(app: FastAPI, routers: Iterable[APIRouter]) -> None:
    """Puts the hot routes in front of ``app``'s router, inside its exception handlers."""
    app.router.middleware_stack = HotRoutes(app.router.middleware_stack, hot_routes(routers))

"""Every edge failure becomes OpenAI's error envelope, here and nowhere else.

Handlers are registered once on the app; routers raise ``ServiceError`` (or
let gRPC errors be converted by ``ServiceError.from_rpc_error``) and never build error
bodies themselves.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import grpc
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from modelplex_kit.errors import HTTP_ONLY, HttpError, ServiceError, envelope, invalid

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

# pydantic-core's JSON parser refuses deeper documents (a guard against stack exhaustion).
JSON_NESTING_LIMIT = 200

# Where FastAPI says a parameter came from: the first part of its error locations, not a parameter name.
_SOURCES = {"query", "path", "header", "cookie", "body"}

# Location parts pydantic adds for union members; they are not request fields.
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "json-or-python"}


class BodyTimeout(Exception):
    def __init__(self, seconds: float, what: str = "The next piece of the request body") -> None:
        super().__init__(f"{what} was not received within {seconds:g} seconds.")


class BodyTooLarge(Exception):
    def __init__(self, limit: int, what: str = "Request body") -> None:
        super().__init__(f"{what} too large: the limit is {limit} bytes.")


def error_response(error: ServiceError) -> Response:
    return Response(
        orjson.dumps(error.envelope()),
        status_code=error.http.status,
        media_type="application/json",
        headers=error.headers,
    )


def internal_error() -> Response:
    return error_response(
        ServiceError(
            grpc.StatusCode.INTERNAL, "The server had an error while processing your request. Sorry about that!"
        )
    )


def http_only_error(status: int, message: str, close: bool = False) -> Response:
    """An HTTP-level failure (405, 408, 413, ...) that no gRPC status describes."""
    http = HTTP_ONLY.get(status, HttpError(status, "invalid_request_error", None))
    body = envelope(message, http.type, None, http.code)
    headers = {"connection": "close"} if close else None
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def openai_param(loc: tuple[int | str, ...]) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content' (OpenAI's notation)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or part in _TYPE_TAGS or part[:1].isupper():
            continue
        else:
            path += f".{part}" if path else part
    return path or None


def array_too_long(param: str, limit: int, length: int | None, counted: str = "") -> ServiceError:
    """OpenAI's 400 for a list beyond its limit (``tools`` beyond 128, say), in its words; ``counted`` names
    what was counted when it is not the list's own items."""
    got = f", but got {length} instead" if length is not None else ""
    if counted:
        message = f"Invalid '{param}': too many {counted}. Expected at most {limit}{got}."
    else:
        got = got.replace("got", "got an array with length")
        message = f"Invalid '{param}': array too long. Expected an array with maximum length {limit}{got}."
    return invalid(message, param, code="array_above_max_length")


def validation_error(exc: ValidationError) -> ServiceError:
    return _first_error(exc.errors(include_url=False)[0])


def _first_error(first: Any) -> ServiceError:
    if first["type"] == "json_invalid" and "recursion limit" in str((first.get("ctx") or {}).get("error", "")):
        return invalid(
            f"The JSON body is nested too deeply: at most {JSON_NESTING_LIMIT} levels of arrays and objects."
        )
    if first["type"] == "json_invalid":
        return invalid(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
        )
    if first["type"] == "model_type" and not first["loc"]:
        return invalid("The request body must be a JSON object.")
    param = (first.get("ctx") or {}).get("param") or openai_param(tuple(first["loc"]))
    if first["type"] == "extra_forbidden":
        # The last part is the client's own key, whatever it looks like (openai_param would take a key
        # such as "None" or "Model" for one of pydantic's type tags and drop it).
        parent, key = openai_param(tuple(first["loc"][:-1])), str(first["loc"][-1])
        param = f"{parent}.{key}" if parent else key
        return invalid(f"Unrecognized request argument supplied: {param}", param)
    if first["type"] == "missing":
        return invalid(f"Missing required parameter: '{param}'.", param)
    ctx = first.get("ctx") or {}
    if first["type"] == "too_long" and ctx.get("field_type") == "List":
        return array_too_long(param or "", ctx["max_length"], ctx.get("actual_length"), ctx.get("counted", ""))
    message = first["msg"].removeprefix("Value error, ")
    return invalid(f"Invalid value for '{param}': {message}" if param else message, param)


def parse_body(model: type[M], body: bytes) -> M:
    """Validates a JSON body straight from bytes (pydantic-core's parser, no dict step)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def install_error_handlers(app: FastAPI) -> None:
    async def on_service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc)

    async def on_rpc_error(request: Request, exc: grpc.aio.AioRpcError) -> Response:
        return error_response(ServiceError.from_rpc_error(exc))

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(
                ServiceError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Unknown request URL: {request.method} {request.url.path}. Please check the URL for typos, "
                    "or see the docs at https://platform.openai.com/docs/api-reference/.",
                    code="unknown_url",
                )
            )
        if exc.status_code == 405:
            return http_only_error(405, f"Method {request.method} is not allowed for {request.url.path}.")
        return http_only_error(exc.status_code, str(exc.detail))

    async def on_too_large(request: Request, exc: BodyTooLarge) -> Response:
        return http_only_error(413, str(exc))

    async def on_request_validation(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's own parameter parsing (a typed path or query parameter): its 422 `{"detail": [...]}`
        # is not OpenAI's shape. Endpoints parse query strings with pipeline.query; this is the net.
        first = dict(exc.errors()[0])
        first["loc"] = tuple(part for i, part in enumerate(first.get("loc", ())) if i or part not in _SOURCES)
        return error_response(_first_error(first))

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(grpc.aio.AioRpcError, on_rpc_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(BodyTooLarge, on_too_large)
    app.add_exception_handler(RequestValidationError, on_request_validation)

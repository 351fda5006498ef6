from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.types import FailFast
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    """A request object: unknown fields are a 400, as OpenAI does."""

    model_config = ConfigDict(extra="forbid")


class Lenient(BaseModel):
    """An object clients echo back from responses (messages): extra fields ignored."""

    model_config = ConfigDict(extra="ignore")


class Query(BaseModel):
    """A query string's parameters (pipeline.query): unknown ones are ignored, as OpenAI does."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


MAX_STOP = 4


def _stop_rule(value: object) -> object:
    # Checked before the union is tried, so the message names the real rule instead of
    # "Input should be a valid string" from the union's first member.
    if isinstance(value, list) and len(value) > MAX_STOP:
        raise param_error("stop", f"at most {MAX_STOP} stop sequences are allowed; {len(value)} were given.")
    return value


Stop = Annotated[str | list[str] | None, BeforeValidator(_stop_rule)]
# Integers travel to the backends as protobuf uint32/int64: a value beyond those ranges is a 400 here,
# not a ValueError (a 500) when the backend request is built.
UINT32_MAX = 2**32 - 1
Seed = Annotated[int | None, Field(ge=-(2**63), le=2**63 - 1)]
OutputTokens = Annotated[int | None, Field(ge=1, le=UINT32_MAX)]
Temperature = Annotated[float | None, Field(ge=0, le=2)]
TopP = Annotated[float | None, Field(ge=0, le=1)]
Penalty = Annotated[float | None, Field(ge=-2, le=2)]


# Our bounds on the lists of a request (OpenAI's where it states one: 128 tools, 128 tool calls in a
# message), so validating one request holds the edge's loop a few milliseconds at most (README: Input
# limits). Typed lists stop at their first bad item (FailFast): a body of 4,000 bad items costs one error.
#: Chat messages; Responses input items (the stored chain's included).
MAX_ITEMS = 4096
#: Content parts of all the messages or items of a request together.
MAX_CONTENT_PARTS = 4096
MAX_TOOLS = 128
#: Tool calls of one assistant message.
MAX_TOOL_CALLS = 128


class _FailFast(FailFast):
    """pydantic's FailFast, hashable, so that it can mark a list inside a union."""

    def __hash__(self) -> int:
        return hash(FailFast)


#: Marks a typed list that stops at its first bad item.
FAIL_FAST = _FailFast()


def too_long(param: str, limit: int, length: int, counted: str = "") -> PydanticCustomError:
    """A list beyond its bound (errors.array_too_long words it as OpenAI does)."""
    ctx = {"field_type": "List", "max_length": limit, "actual_length": length, "param": param, "counted": counted}
    return PydanticCustomError("too_long", "too many items", ctx)


def count_parts(param: str, items: object) -> object:
    """Before a list of messages or items is validated: its length, and its content parts summed, within
    their bounds (one pass over the raw items, each checked without being built)."""
    if not isinstance(items, list):
        return items
    if len(items) > MAX_ITEMS:
        raise too_long(param, MAX_ITEMS, len(items))
    parts = sum(_parts_of(item) for item in items)
    if parts > MAX_CONTENT_PARTS:
        raise too_long(param, MAX_CONTENT_PARTS, parts, "content parts (summed over all of them)")
    return items


def _parts_of(item: object) -> int:
    """A raw message's or item's parts: its content's (a function call output's output may be parts too)."""
    if not isinstance(item, dict):
        return 0
    return sum(len(value) for key in ("content", "output") if isinstance(value := item.get(key), list))


def param_error(param: str, message: str) -> PydanticCustomError:
    """A cross-field validation failure that names the parameter at fault."""
    return PydanticCustomError("invalid_parameter", message, {"param": param})

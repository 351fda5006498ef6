from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
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


def param_error(param: str, message: str) -> PydanticCustomError:
    """A cross-field validation failure that names the parameter at fault."""
    return PydanticCustomError("invalid_parameter", message, {"param": param})

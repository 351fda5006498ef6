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
Temperature = Annotated[float | None, Field(ge=0, le=2)]
TopP = Annotated[float | None, Field(ge=0, le=1)]
Penalty = Annotated[float | None, Field(ge=-2, le=2)]


def param_error(param: str, message: str) -> PydanticCustomError:
    """A cross-field validation failure that names the parameter at fault."""
    return PydanticCustomError("invalid_parameter", message, {"param": param})

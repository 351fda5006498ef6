from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
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


Stop = str | Annotated[list[str], Field(max_length=4)] | None
Temperature = Annotated[float | None, Field(ge=0, le=2)]
TopP = Annotated[float | None, Field(ge=0, le=1)]
Penalty = Annotated[float | None, Field(ge=-2, le=2)]


def param_error(param: str, message: str) -> PydanticCustomError:
    """A cross-field validation failure that names the parameter at fault."""
    return PydanticCustomError("invalid_parameter", message, {"param": param})

"""One check of a text request against what a model can do.

The edge runs it with the catalog's advertised capabilities, the text backend
with its engine's real ones, so a request is refused with the same clear 400
wherever the gap is found.
"""

from __future__ import annotations

from modelplex.v1 import catalog_pb2, text_pb2
from modelplex_kit.errors import invalid, unsupported

_SCHEMA = text_pb2.ResponseFormat.TYPE_JSON_SCHEMA
_JSON_OBJECT = text_pb2.ResponseFormat.TYPE_JSON_OBJECT


def check_text_request(request: text_pb2.GenerateRequest, caps: catalog_pb2.Capabilities) -> None:
    """Raises a 400 ServiceError naming the parameter the model cannot serve.

    A ``json_schema`` response format on a model without schema support is
    downgraded in place to ``json_object`` (the documented fallback).
    """
    kind = request.WhichOneof("input")
    if kind == "chat" and not caps.chat:
        raise invalid("This model does not support chat completions; use /v1/completions.", "model")
    if kind == "completion" and not caps.completions:
        raise invalid("This model does not support legacy completions; use /v1/chat/completions.", "model")
    if request.n > 1 and not caps.multiple_choices:
        raise unsupported("n", "Generating more than one choice (`n` > 1)")
    if request.logprobs and not caps.logprobs:
        raise unsupported("logprobs", "`logprobs`")
    if request.tools and not caps.tool_use:
        raise unsupported("tools", "Tool calling")
    if request.response_format.type == _SCHEMA and not caps.json_schema:
        request.response_format.type = _JSON_OBJECT
        request.response_format.schema_json = ""
    if kind == "chat" and not caps.vision:
        _refuse_images(request.chat.messages)


def _refuse_images(messages) -> None:
    for i, message in enumerate(messages):
        for j, part in enumerate(message.content):
            if part.WhichOneof("part") == "image":
                raise invalid(
                    "Image content is not supported by this model; choose a model with vision.",
                    f"messages[{i}].content[{j}]",
                    code="image_not_supported",
                )

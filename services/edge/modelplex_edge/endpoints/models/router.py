from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from google.protobuf.json_format import MessageToDict
from starlette.responses import Response

from modelplex.v1 import catalog_pb2
from modelplex_edge.admission import Ask
from modelplex_edge.pipeline import authorization
from modelplex_edge.responses import json_response
from modelplex_kit.errors import model_not_found
from modelplex_kit.modalities import by_proto

router = APIRouter()


def model_object(model: catalog_pb2.Model) -> dict[str, Any]:
    listed = {"id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by}
    if model.HasField("adapter"):
        # As vLLM lists its LoRA adapters: the model it is an adapter of (never the weights' path).
        listed["parent"] = listed["root"] = model.adapter.base
    return listed


def model_details(model: catalog_pb2.Model) -> dict[str, Any]:
    """The OpenAI model object plus what Modelplex knows of it (extra fields the SDKs keep)."""
    row = by_proto(model.modality)
    kind = model.capabilities.WhichOneof("modality")
    details = {
        **model_object(model),
        "modality": row.name if row else "unknown",
        "context_length": model.context_length or None,
    }
    if model.HasField("default_max_tokens"):
        # Output tokens a request that sets no max_tokens gets (vLLM's generation-config override).
        details["default_max_tokens"] = model.default_max_tokens
    if kind is not None:
        details["capabilities"] = MessageToDict(getattr(model.capabilities, kind), preserving_proto_field_name=True)
    return details


@router.get("/v1/models")
async def list_models(http: Request) -> Response:
    state = http.app.state.edge
    admitted = await state.admission.admit(Ask(authorization(http), "models"))
    models = [model_object(m) for m in state.catalog.view.models if admitted.may_use(m.id)]
    return json_response({"object": "list", "data": models}, headers=admitted.headers or None)


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, http: Request) -> Response:
    state = http.app.state.edge
    admitted = await state.admission.admit(Ask(authorization(http), "models"))
    entry = state.catalog.view.resolve(model)
    if entry is None or not admitted.may_use(entry.id):
        raise model_not_found(model)
    return json_response(model_details(entry), headers=admitted.headers or None)

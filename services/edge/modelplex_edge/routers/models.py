from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from modelplex.v1 import catalog_pb2
from modelplex_edge.state import Authorized, State
from modelplex_edge.text_calls import json_response
from modelplex_kit.errors import model_not_found

router = APIRouter()


def model_object(model: catalog_pb2.Model) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by}


@router.get("/v1/models")
async def list_models(caller: Authorized, state: State) -> Response:
    return json_response({"object": "list", "data": [model_object(m) for m in state.catalog.view.models]})


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, caller: Authorized, state: State) -> Response:
    entry = state.catalog.view.resolve(model)
    if entry is None:
        raise model_not_found(model)
    return json_response(model_object(entry))

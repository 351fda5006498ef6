"""Embeddings: the model's vector size and limits, and the one request check."""

from __future__ import annotations

from pydantic import Field

from modelplex.v1 import catalog_pb2, embeddings_pb2, embeddings_pb2_grpc
from modelplex_kit.errors import invalid
from modelplex_kit.modalities.base import CapabilitySpec, Modality

# OpenAI's own limit on inputs per request.
OPENAI_MAX_INPUTS = 2048


class EmbeddingsCapabilitySpec(CapabilitySpec):
    """``capabilities: {dimensions: 384, matryoshka: true, max_inputs: 2048, max_input_tokens: 256}``."""

    dimensions: int = Field(ge=1)
    matryoshka: bool = False
    max_inputs: int = Field(OPENAI_MAX_INPUTS, ge=1)
    max_input_tokens: int = Field(0, ge=0)

    def to_proto(self) -> catalog_pb2.Capabilities:
        return catalog_pb2.Capabilities(embeddings=catalog_pb2.EmbeddingsCapabilities(**self.model_dump()))


def check_embed_request(request: embeddings_pb2.EmbedRequest, capabilities: catalog_pb2.Capabilities) -> None:
    caps = capabilities.embeddings
    if not request.inputs:
        raise invalid("'input' must not be empty.", "input")
    if caps.max_inputs and len(request.inputs) > caps.max_inputs:
        raise invalid(
            f"'input' has {len(request.inputs)} items; this model accepts at most {caps.max_inputs} per request.",
            "input",
        )
    for i, item in enumerate(request.inputs):
        kind = item.WhichOneof("input")
        if kind is None or (kind == "text" and not item.text) or (kind == "tokens" and not item.tokens.ids):
            raise invalid(f"'input[{i}]' must not be empty.", f"input[{i}]")
    _check_dimensions(request.dimensions, caps)


def _check_dimensions(wanted: int, caps: catalog_pb2.EmbeddingsCapabilities) -> None:
    if not wanted or wanted == caps.dimensions:
        return
    if not caps.matryoshka:
        raise invalid(
            f"This model does not support 'dimensions' other than its native {caps.dimensions}.",
            "dimensions",
            code="unsupported_parameter",
        )
    if wanted > caps.dimensions:
        raise invalid(f"'dimensions' must be at most {caps.dimensions} for this model.", "dimensions")


MODALITY = Modality(
    name="embeddings",
    proto=catalog_pb2.MODALITY_EMBEDDINGS,
    package="modelplex_embeddings",
    env_prefix="MODELPLEX_EMBEDDINGS_",
    stub=embeddings_pb2_grpc.EmbeddingsServiceStub,
    capabilities=EmbeddingsCapabilitySpec,
    check=check_embed_request,
    port=50062,
)

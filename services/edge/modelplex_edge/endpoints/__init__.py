"""One folder per OpenAI endpoint: its router, wire protocol (pydantic) and translator.

A new endpoint adds its folder and one line here.
"""

from __future__ import annotations

from fastapi import APIRouter

from modelplex_edge.endpoints.chat.router import router as chat
from modelplex_edge.endpoints.completions.router import router as completions
from modelplex_edge.endpoints.embeddings.router import router as embeddings
from modelplex_edge.endpoints.images.router import router as images
from modelplex_edge.endpoints.models.router import router as models
from modelplex_edge.endpoints.responses.router import router as responses
from modelplex_edge.endpoints.speech.router import router as speech
from modelplex_edge.endpoints.transcriptions.router import PATH as TRANSCRIPTIONS
from modelplex_edge.endpoints.transcriptions.router import router as transcriptions
from modelplex_edge.endpoints.translations.router import PATH as TRANSLATIONS
from modelplex_edge.endpoints.translations.router import router as translations
from modelplex_edge.endpoints.unsupported.router import router as unsupported
from modelplex_edge.endpoints.videos.router import router as videos

ROUTERS: tuple[APIRouter, ...] = (
    chat,
    completions,
    responses,
    embeddings,
    images,
    videos,
    models,
    speech,
    transcriptions,
    translations,
    unsupported,
)
# Endpoints taking file uploads: the edge's body limit for them is max_upload_bytes.
UPLOAD_PATHS = frozenset({TRANSCRIPTIONS, TRANSLATIONS})
